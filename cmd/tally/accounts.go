package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

var (
	accountTypes = protoEnum(tallyv1.AccountType_value, "ACCOUNT_TYPE_")
	floors       = protoEnum(tallyv1.Floor_value, "FLOOR_")
)

func (a *app) newAccountCmd() *cobra.Command {
	cmd := group(&cobra.Command{Use: "account", Short: "Manage accounts and their lifecycle (recorded with who did it)"})
	cmd.AddCommand(a.newAccountCreateCmd(), a.newAccountGetCmd(), a.newAccountFindCmd(), a.newAccountUpdateCmd(),
		a.newAccountLifecycleCmd("freeze", "Freeze an account: it can no longer be debited or credited"),
		a.newAccountLifecycleCmd("unfreeze", "Unfreeze a frozen account"),
		a.newAccountLifecycleCmd("close", "Close an account (its balance and holds must be zero)"))
	return cmd
}

type accountCreateOpts struct {
	id, currency, typ, externalRef, floor string
	creditLimit                           int64
	quiet                                 bool
	meta                                  []string
	metadata                              map[string]string
}

// Validate parses --meta.
func (o *accountCreateOpts) Validate() (err error) {
	o.metadata, err = parseMeta(o.meta)
	return err
}

func (a *app) newAccountCreateCmd() *cobra.Command {
	o := &accountCreateOpts{}
	cmd := &cobra.Command{Use: "create", Short: "Create an account", Args: cobra.NoArgs, RunE: a.runE(o),
		Example: "  tally account create --currency USD --external-ref cust-42 --quiet"}
	f := cmd.Flags()
	f.StringVar(&o.id, "id", "", "account id (UUID); default: a new UUIDv7, which makes retries safe")
	f.StringVar(&o.currency, "currency", "", "currency code, e.g. USD")
	enumFlag(cmd, &o.typ, "type", "customer", accountTypes, "account type")
	f.StringVar(&o.externalRef, "external-ref", "", "the customer's id in your system")
	enumFlag(cmd, &o.floor, "floor", "", floors, "how low the balance may go (default by type)")
	f.Int64Var(&o.creditLimit, "credit-limit", 0, "how far below zero a non_negative account may go")
	f.BoolVar(&o.quiet, "quiet", false, "print only the account id")
	f.StringArrayVar(&o.meta, "meta", nil, "metadata key=value (repeatable)")
	require(cmd, "currency")
	a.conn.register(cmd)
	return cmd
}

func (o *accountCreateOpts) run(a *app) error {
	req := &tallyv1.CreateAccountRequest{
		AccountId: o.id, Currency: o.currency, ExternalRef: o.externalRef, CreditLimit: o.creditLimit, Metadata: o.metadata,
		Type:  tallyv1.AccountType(tallyv1.AccountType_value["ACCOUNT_TYPE_"+strings.ToUpper(o.typ)]),
		Floor: tallyv1.Floor(tallyv1.Floor_value["FLOOR_"+strings.ToUpper(o.floor)]),
	}
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	acct, err := cl.CreateAccount(ctx, req)
	if err != nil {
		return err
	}
	if o.quiet {
		_, err := fmt.Fprintln(a.out, acct.GetAccountId())
		return err
	}
	return a.printAccount(acct)
}

type accountGetOpts struct{ id string }

// Validate has nothing to check: cobra enforces --account.
func (o *accountGetOpts) Validate() error { return nil }

func (a *app) newAccountGetCmd() *cobra.Command {
	o := &accountGetOpts{}
	cmd := &cobra.Command{Use: "get", Short: "Show an account", Args: cobra.NoArgs, RunE: a.runE(o)}
	cmd.Flags().StringVar(&o.id, "account", "", "account id")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *accountGetOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	acct, err := cl.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: o.id})
	if err != nil {
		return err
	}
	return a.printAccount(acct)
}

type accountFindOpts struct {
	externalRef, currency, typ, pageToken string
	pageSize                              int
}

// Validate has nothing to check: cobra checks --type, the server the rest.
func (o *accountFindOpts) Validate() error { return nil }

func (a *app) newAccountFindCmd() *cobra.Command {
	o := &accountFindOpts{}
	cmd := &cobra.Command{Use: "find", Short: "Find accounts by external ref, currency or type", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.externalRef, "external-ref", "", "external ref")
	f.StringVar(&o.currency, "currency", "", "currency")
	enumFlag(cmd, &o.typ, "type", "", accountTypes, "only this account type")
	f.IntVar(&o.pageSize, "page-size", 100, "page size")
	f.StringVar(&o.pageToken, "page-token", "", "page token from a previous call")
	a.conn.register(cmd)
	return cmd
}

func (o *accountFindOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	resp, err := cl.FindAccounts(ctx, &tallyv1.FindAccountsRequest{
		ExternalRef: o.externalRef, Currency: o.currency, PageSize: int32(o.pageSize), PageToken: o.pageToken,
		Type: tallyv1.AccountType(tallyv1.AccountType_value["ACCOUNT_TYPE_"+strings.ToUpper(o.typ)]),
	})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, resp)
	}
	rows := make([]string, 0, len(resp.GetAccounts()))
	for _, acct := range resp.GetAccounts() {
		rows = append(rows, accountRow(acct))
	}
	table(a.out, accountHeader, rows...)
	if resp.GetNextPageToken() != "" {
		fmt.Fprintln(a.out, "next page: --page-token", resp.GetNextPageToken())
	}
	return nil
}

type accountLifecycleOpts struct{ action, id string }

// Validate has nothing to check: cobra enforces --account.
func (o *accountLifecycleOpts) Validate() error { return nil }

func (a *app) newAccountLifecycleCmd(action, short string) *cobra.Command {
	o := &accountLifecycleOpts{action: action}
	cmd := &cobra.Command{Use: action, Short: short, Args: cobra.NoArgs, RunE: a.runE(o)}
	cmd.Flags().StringVar(&o.id, "account", "", "account id")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *accountLifecycleOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	var acct *tallyv1.Account
	switch o.action {
	case "freeze":
		acct, err = cl.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: o.id})
	case "unfreeze":
		acct, err = cl.UnfreezeAccount(ctx, &tallyv1.UnfreezeAccountRequest{AccountId: o.id})
	default:
		acct, err = cl.CloseAccount(ctx, &tallyv1.CloseAccountRequest{AccountId: o.id})
	}
	if err != nil {
		return err
	}
	return a.printAccount(acct)
}

type accountUpdateOpts struct {
	id, threshold string
	creditLimit   int64
	replaceMeta   bool
	meta          []string
	req           *tallyv1.UpdateAccountRequest
}

// Validate builds the request: --low-balance-threshold is an integer or
// none, --meta needs --replace-meta.
func (o *accountUpdateOpts) Validate() error {
	req := &tallyv1.UpdateAccountRequest{AccountId: o.id, UpdateMetadata: o.replaceMeta}
	if o.creditLimit >= 0 {
		req.CreditLimit = &o.creditLimit
	}
	switch o.threshold {
	case "":
	case "none":
		req.ClearLowBalanceThreshold = true
	default:
		v, err := strconv.ParseInt(o.threshold, 10, 64)
		if err != nil {
			return errors.New("--low-balance-threshold wants an integer or none")
		}
		req.LowBalanceThreshold = &v
	}
	if !o.replaceMeta && len(o.meta) > 0 {
		return errors.New("--meta needs --replace-meta (metadata is replaced as a whole)")
	}
	var err error
	req.Metadata, err = parseMeta(o.meta)
	o.req = req
	return err
}

func (a *app) newAccountUpdateCmd() *cobra.Command {
	o := &accountUpdateOpts{}
	cmd := &cobra.Command{Use: "update", Short: "Change an account's credit limit, low-balance threshold or metadata",
		Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.id, "account", "", "account id")
	f.Int64Var(&o.creditLimit, "credit-limit", -1, "new credit limit (-1: unchanged)")
	f.StringVar(&o.threshold, "low-balance-threshold", "",
		`available amount below which debits report threshold_crossed ("none" clears it)`)
	f.BoolVar(&o.replaceMeta, "replace-meta", false, "replace all metadata with the --meta given")
	f.StringArrayVar(&o.meta, "meta", nil, "metadata key=value (repeatable, with --replace-meta)")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *accountUpdateOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	acct, err := cl.UpdateAccount(ctx, o.req)
	if err != nil {
		return err
	}
	return a.printAccount(acct)
}
