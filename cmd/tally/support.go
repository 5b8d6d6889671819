package main

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// currencyExponents are the ISO 4217 minor-unit exponents of common
// currencies; any other currency is shown in minor units.
var currencyExponents = map[string]int{
	"USD": 2, "EUR": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "NZD": 2, "SEK": 2, "NOK": 2, "DKK": 2,
	"PLN": 2, "CZK": 2, "INR": 2, "CNY": 2, "HKD": 2, "SGD": 2, "BRL": 2, "MXN": 2, "ZAR": 2, "ILS": 2,
	"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0,
	"BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3,
}

// money renders minor units in the currency's units ("12.34 USD"), or as
// minor units for currencies without a known exponent ("1234 CREDITS").
func money(minor int64, currency string) string {
	exp, ok := currencyExponents[currency]
	if !ok || exp == 0 {
		return strconv.FormatInt(minor, 10) + " " + currency
	}
	neg := minor < 0
	u := uint64(minor)
	if neg {
		u = uint64(-minor) // two's complement also covers MinInt64
	}
	s := strconv.FormatUint(u, 10)
	if len(s) <= exp {
		s = strings.Repeat("0", exp-len(s)+1) + s
	}
	s = s[:len(s)-exp] + "." + s[len(s)-exp:]
	if neg {
		s = "-" + s
	}
	return s + " " + currency
}

// show is the support agent's view of a customer: the account, its balance,
// held and available amounts, and its latest entries.
func show(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally show", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("account", "", "account id")
	ref := fs.String("external-ref", "", "the customer's id in your system")
	n := fs.Int("entries", 20, "how many of the latest entries to show")
	if err := parse(fs, args); err != nil {
		return err
	}
	if (*id == "") == (*ref == "") {
		return fmt.Errorf("give --account or --external-ref")
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	var accts []*tallyv1.Account
	if *id != "" {
		a, err := cl.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: *id})
		if err != nil {
			return err
		}
		accts = append(accts, a)
	} else {
		res, err := cl.FindAccounts(ctx, &tallyv1.FindAccountsRequest{ExternalRef: *ref, PageSize: 20})
		if err != nil {
			return err
		}
		if len(res.GetAccounts()) == 0 {
			return fmt.Errorf("no account has external_ref %q", *ref)
		}
		accts = res.GetAccounts()
	}
	type view struct {
		Account *tallyv1.Account `json:"account"`
		Balance *tallyv1.Balance `json:"balance"`
		Entries []*tallyv1.Entry `json:"entries"`
	}
	var views []view
	for _, a := range accts {
		b, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a.GetAccountId(), Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
		if err != nil {
			return err
		}
		es, err := cl.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a.GetAccountId(), PageSize: int32(*n), NewestFirst: true})
		if err != nil {
			return err
		}
		views = append(views, view{a, b, es.GetEntries()})
	}
	if c.json {
		m := protojson.MarshalOptions{UseProtoNames: true}
		fmt.Fprint(out, "[")
		for i, v := range views {
			if i > 0 {
				fmt.Fprint(out, ",")
			}
			a, _ := m.Marshal(v.Account)
			b, _ := m.Marshal(v.Balance)
			var es []string
			for _, e := range v.Entries {
				j, _ := m.Marshal(e)
				es = append(es, string(j))
			}
			fmt.Fprintf(out, `{"account":%s,"balance":%s,"entries":[%s]}`, a, b, strings.Join(es, ","))
		}
		fmt.Fprintln(out, "]")
		return nil
	}
	for i, v := range views {
		if i > 0 {
			fmt.Fprintln(out)
		}
		a, b, cur := v.Account, v.Balance, v.Account.GetCurrency()
		fmt.Fprintf(out, "Account   %s  (%s, %s)\n", a.GetAccountId(), enumName(a.GetType(), "ACCOUNT_TYPE_"), enumName(a.GetStatus(), "ACCOUNT_STATUS_"))
		if a.GetExternalRef() != "" {
			fmt.Fprintf(out, "Customer  %s\n", a.GetExternalRef())
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
	return nil
}
