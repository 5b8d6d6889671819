package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// newTopUpCmd is `tally topup set|get|list`: an account's auto top-up rule
// (tallyd --topup-provider) and its top-ups.
func (a *app) newTopUpCmd() *cobra.Command {
	cmd := group(&cobra.Command{Use: "topup", Short: "An account's auto top-up rule and its top-ups"})
	cmd.AddCommand(a.newTopUpSetCmd(), a.newTopUpGetCmd(), a.newTopUpListCmd())
	return cmd
}

type topUpSetOpts struct {
	req      tallyv1.SetAutoTopUpRequest
	disabled bool
}

// Validate has nothing to check: the server checks the rule (and says
// which field is wrong).
func (o *topUpSetOpts) Validate() error { return nil }

func (a *app) newTopUpSetCmd() *cobra.Command {
	o := &topUpSetOpts{}
	cmd := &cobra.Command{Use: "set", Short: "Create or replace an account's auto top-up rule (support, admin)",
		Args: cobra.NoArgs, RunE: a.runE(o),
		Example: "  tally topup set --account ID --threshold 500 --target 2000 --amount-max 1500 --per-day-max 5000 " +
			"--customer cus_... --payment-method pm_..."}
	f := cmd.Flags()
	f.StringVar(&o.req.AccountId, "account", "", "account id")
	f.Int64Var(&o.req.Threshold, "threshold", 0, "a debit that leaves available below this starts a top-up")
	f.Int64Var(&o.req.TargetBalance, "target", 0, "a top-up brings available back to this (above --threshold)")
	f.Int64Var(&o.req.AmountMax, "amount-max", 0, "the most one top-up charges (> 0)")
	f.Int64Var(&o.req.PerDayMax, "per-day-max", 0, "the most the top-ups of one UTC day add up to (> 0)")
	f.StringVar(&o.req.ProviderCustomerId, "customer", "", "the provider's customer (Stripe cus_...)")
	f.StringVar(&o.req.PaymentMethodId, "payment-method", "", "the customer's saved payment method (Stripe pm_...)")
	f.BoolVar(&o.disabled, "disabled", false, "store the rule disabled")
	require(cmd, "account", "threshold", "target", "amount-max", "per-day-max", "customer", "payment-method")
	a.conn.register(cmd)
	return cmd
}

func (o *topUpSetOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	o.req.Enabled = !o.disabled
	rule, err := cl.SetAutoTopUp(ctx, &o.req)
	if err != nil {
		return err
	}
	return printRule(a, rule)
}

type topUpGetOpts struct{ account string }

// Validate has nothing to check.
func (o *topUpGetOpts) Validate() error { return nil }

func (a *app) newTopUpGetCmd() *cobra.Command {
	o := &topUpGetOpts{}
	cmd := &cobra.Command{Use: "get", Short: "Read an account's auto top-up rule", Args: cobra.NoArgs, RunE: a.runE(o)}
	cmd.Flags().StringVar(&o.account, "account", "", "account id")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *topUpGetOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	rule, err := cl.GetAutoTopUp(ctx, &tallyv1.GetAutoTopUpRequest{AccountId: o.account})
	if err != nil {
		return err
	}
	return printRule(a, rule)
}

func printRule(a *app, r *tallyv1.AutoTopUp) error {
	if a.conn.json {
		return printJSON(a.out, r)
	}
	table(a.out, "ACCOUNT\tENABLED\tTHRESHOLD\tTARGET\tAMOUNT_MAX\tPER_DAY_MAX\tCUSTOMER\tPAYMENT_METHOD\tFAILURES\tDISABLED_REASON",
		fmt.Sprintf("%s\t%t\t%d\t%d\t%d\t%d\t%s\t%s\t%d\t%s", r.GetAccountId(), r.GetEnabled(), r.GetThreshold(),
			r.GetTargetBalance(), r.GetAmountMax(), r.GetPerDayMax(), r.GetProviderCustomerId(), r.GetPaymentMethodId(),
			r.GetConsecutiveFailures(), r.GetDisabledReason()))
	return nil
}

type topUpListOpts struct {
	account  string
	pageSize int32
	all      bool
}

// Validate checks --page-size.
func (o *topUpListOpts) Validate() error {
	if o.pageSize < 0 {
		return fmt.Errorf("--page-size must not be negative")
	}
	return nil
}

func (a *app) newTopUpListCmd() *cobra.Command {
	o := &topUpListOpts{}
	cmd := &cobra.Command{Use: "list", Short: "List an account's top-ups, newest first", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.account, "account", "", "account id")
	f.Int32Var(&o.pageSize, "page-size", 0, "top-ups per page (default: the server's)")
	f.BoolVar(&o.all, "all", false, "follow every page")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *topUpListOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	req := &tallyv1.ListTopUpsRequest{AccountId: o.account, PageSize: o.pageSize}
	resp := &tallyv1.ListTopUpsResponse{}
	for {
		page, err := cl.ListTopUps(ctx, req)
		if err != nil {
			return err
		}
		resp.Topups = append(resp.Topups, page.GetTopups()...)
		resp.NextPageToken = page.GetNextPageToken()
		if !o.all || page.GetNextPageToken() == "" {
			break
		}
		req.PageToken = page.GetNextPageToken()
	}
	if a.conn.json {
		return printJSON(a.out, resp)
	}
	printTopUps(a.out, resp)
	return nil
}

func printTopUps(out io.Writer, resp *tallyv1.ListTopUpsResponse) {
	rows := make([]string, 0, len(resp.GetTopups()))
	for _, x := range resp.GetTopups() {
		rows = append(rows, fmt.Sprintf("%s\t%s\t%d\t%s\t%s\t%s\t%d\t%s\t%s", x.GetTopupId(),
			enumName(x.GetStatus(), "TOP_UP_STATUS_"), x.GetAmount(), x.GetCurrency(), x.GetProviderPaymentId(),
			x.GetCreditTransferId(), x.GetAttempts(), x.GetCreatedAt().AsTime().Format(time.RFC3339),
			x.GetFailureCode()+" "+x.GetFailureReason()))
	}
	table(out, "TOPUP\tSTATUS\tAMOUNT\tCURRENCY\tPAYMENT\tCREDIT\tATTEMPTS\tCREATED\tFAILURE", rows...)
	if resp.GetNextPageToken() != "" {
		fmt.Fprintln(out, "(more: --all)")
	}
}
