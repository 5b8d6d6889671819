package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/statement"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// money renders minor units in the currency's units ("12.34 USD"), or as
// minor units for currencies without a known exponent ("1234 CREDITS").
func money(minor int64, currency string) string { return statement.Money(minor, currency) }

type showOpts struct {
	account, externalRef string
	entries              int
}

// Validate has nothing to check: cobra enforces one of --account and
// --external-ref.
func (o *showOpts) Validate() error { return nil }

// newShowCmd is the support agent's view of a customer: the account, its
// balance, held and available amounts, and its latest entries.
func (a *app) newShowCmd() *cobra.Command {
	o := &showOpts{}
	cmd := &cobra.Command{Use: "show", Short: "A customer at a glance: balance, held, available, latest entries",
		Args: cobra.NoArgs, RunE: a.runE(o), Example: "  tally show --external-ref cust-42"}
	f := cmd.Flags()
	f.StringVar(&o.account, "account", "", "account id")
	f.StringVar(&o.externalRef, "external-ref", "", "the customer's id in your system")
	f.IntVar(&o.entries, "entries", 20, "how many of the latest entries to show")
	cmd.MarkFlagsOneRequired("account", "external-ref")
	cmd.MarkFlagsMutuallyExclusive("account", "external-ref")
	a.conn.register(cmd)
	return cmd
}

// accounts finds the account of --account, or those of --external-ref.
func (o *showOpts) accounts(ctx context.Context, cl *client.Client) ([]*tallyv1.Account, error) {
	if o.account != "" {
		acct, err := cl.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: o.account})
		if err != nil {
			return nil, err
		}
		return []*tallyv1.Account{acct}, nil
	}
	res, err := cl.FindAccounts(ctx, &tallyv1.FindAccountsRequest{ExternalRef: o.externalRef, PageSize: 20})
	if err != nil {
		return nil, err
	}
	if len(res.GetAccounts()) == 0 {
		return nil, fmt.Errorf("no account has external_ref %q", o.externalRef)
	}
	return res.GetAccounts(), nil
}

func (o *showOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	accts, err := o.accounts(ctx, cl)
	if err != nil {
		return err
	}
	var views []customerView
	for _, acct := range accts {
		b, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct.GetAccountId(), Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
		if err != nil {
			return err
		}
		es, err := cl.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: acct.GetAccountId(), PageSize: int32(o.entries), NewestFirst: true})
		if err != nil {
			return err
		}
		views = append(views, customerView{acct, b, es.GetEntries()})
	}
	if a.conn.json {
		return printViewsJSON(a.out, views)
	}
	for i, v := range views {
		if i > 0 {
			fmt.Fprintln(a.out)
		}
		v.print(a.out)
	}
	return nil
}

// customerView is what tally show prints of one account.
type customerView struct {
	Account *tallyv1.Account
	Balance *tallyv1.Balance
	Entries []*tallyv1.Entry
}

// printViewsJSON prints the views as a JSON array of {account, balance,
// entries}, with the proto field names.
func printViewsJSON(out io.Writer, views []customerView) error {
	m := protojson.MarshalOptions{UseProtoNames: true}
	fmt.Fprint(out, "[")
	for i, v := range views {
		if i > 0 {
			fmt.Fprint(out, ",")
		}
		acct, _ := m.Marshal(v.Account)
		bal, _ := m.Marshal(v.Balance)
		var es []string
		for _, e := range v.Entries {
			j, _ := m.Marshal(e)
			es = append(es, string(j))
		}
		fmt.Fprintf(out, `{"account":%s,"balance":%s,"entries":[%s]}`, acct, bal, strings.Join(es, ","))
	}
	_, err := fmt.Fprintln(out, "]")
	return err
}

// print prints the view for a person, amounts in the currency's units.
func (v customerView) print(out io.Writer) {
	acct, b, cur := v.Account, v.Balance, v.Account.GetCurrency()
	fmt.Fprintf(out, "Account   %s  (%s, %s)\n", acct.GetAccountId(), enumName(acct.GetType(), "ACCOUNT_TYPE_"), enumName(acct.GetStatus(), "ACCOUNT_STATUS_"))
	if acct.GetExternalRef() != "" {
		fmt.Fprintf(out, "Customer  %s\n", acct.GetExternalRef())
	}
	fmt.Fprintf(out, "Balance   %s\nHeld      %s\nAvailable %s", money(b.GetBalance(), cur), money(b.GetHeld(), cur), money(b.GetAvailable(), cur))
	if b.GetCreditLimit() != 0 {
		fmt.Fprintf(out, "  (credit limit %s)", money(b.GetCreditLimit(), cur))
	}
	fmt.Fprintf(out, "\nVersion   %d, read %s\n\n", b.GetVersion(), b.GetAsOf().AsTime().Format(time.RFC3339))
	rows := make([]string, 0, len(v.Entries))
	for _, e := range v.Entries {
		rows = append(rows, fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s", e.GetCreatedAt().AsTime().Format("2006-01-02 15:04:05"),
			enumName(e.GetKind(), "TRANSFER_KIND_"), money(e.GetAmount(), cur), money(e.GetBalanceAfter(), cur), e.GetTransferId(),
			createdBy(e.GetCreatedByClientId(), e.GetCreatedByKeyId())))
	}
	fmt.Fprintf(out, "Latest %d entries, newest first:\n", len(rows))
	table(out, "WHEN (UTC)\tKIND\tAMOUNT\tBALANCE\tTRANSFER\tBY", rows...)
}
