package main

import (
	"flag"
	"fmt"
	"io"
	"time"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// topupCmd runs `tally topup set|get|list`: an account's auto top-up rule
// and its top-ups.
//
//	tally topup set  --account ID --threshold N --target N --amount-max N --per-day-max N --customer cus_... --payment-method pm_... [--disabled]
//	tally topup get  --account ID
//	tally topup list --account ID [--page-size N] [--all]
func topupCmd(sub string, args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally topup "+sub, flag.ContinueOnError)
	c.register(fs)
	account := fs.String("account", "", "the account (required)")
	var set tallyv1.SetAutoTopUpRequest
	disabled := fs.Bool("disabled", false, "set: store the rule disabled")
	pageSize := fs.Int("page-size", 0, "list: top-ups per page (default: the server's)")
	all := fs.Bool("all", false, "list: follow every page")
	if sub == "set" {
		fs.Int64Var(&set.Threshold, "threshold", 0, "a debit that leaves available below this starts a top-up")
		fs.Int64Var(&set.TargetBalance, "target", 0, "a top-up brings available back to this (> threshold)")
		fs.Int64Var(&set.AmountMax, "amount-max", 0, "the most one top-up charges (> 0)")
		fs.Int64Var(&set.PerDayMax, "per-day-max", 0, "the most the top-ups of one UTC day add up to (> 0)")
		fs.StringVar(&set.ProviderCustomerId, "customer", "", "the provider's customer (Stripe cus_...)")
		fs.StringVar(&set.PaymentMethodId, "payment-method", "", "the customer's saved payment method (Stripe pm_...)")
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("tally topup %s: unexpected argument %q", sub, fs.Arg(0))
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	switch sub {
	case "set", "get":
		var rule *tallyv1.AutoTopUp
		if sub == "set" {
			set.AccountId, set.Enabled = *account, !*disabled
			rule, err = cl.SetAutoTopUp(ctx, &set)
		} else {
			rule, err = cl.GetAutoTopUp(ctx, &tallyv1.GetAutoTopUpRequest{AccountId: *account})
		}
		if err != nil {
			return err
		}
		if c.json {
			return printJSON(out, rule)
		}
		table(out, "ACCOUNT\tENABLED\tTHRESHOLD\tTARGET\tAMOUNT_MAX\tPER_DAY_MAX\tCUSTOMER\tPAYMENT_METHOD\tFAILURES\tDISABLED_REASON",
			fmt.Sprintf("%s\t%t\t%d\t%d\t%d\t%d\t%s\t%s\t%d\t%s", rule.GetAccountId(), rule.GetEnabled(), rule.GetThreshold(),
				rule.GetTargetBalance(), rule.GetAmountMax(), rule.GetPerDayMax(), rule.GetProviderCustomerId(),
				rule.GetPaymentMethodId(), rule.GetConsecutiveFailures(), rule.GetDisabledReason()))
		return nil
	}
	req := &tallyv1.ListTopUpsRequest{AccountId: *account, PageSize: int32(*pageSize)}
	resp := &tallyv1.ListTopUpsResponse{}
	for {
		page, err := cl.ListTopUps(ctx, req)
		if err != nil {
			return err
		}
		resp.Topups = append(resp.Topups, page.GetTopups()...)
		resp.NextPageToken = page.GetNextPageToken()
		if !*all || page.GetNextPageToken() == "" {
			break
		}
		req.PageToken = page.GetNextPageToken()
	}
	if c.json {
		return printJSON(out, resp)
	}
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
	return nil
}
