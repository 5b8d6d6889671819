package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// usageCmd runs `tally usage`: a spend breakdown (SummarizeUsage) as a
// table with a total per currency, or --json.
func usageCmd(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally usage", flag.ContinueOnError)
	c.register(fs)
	now := time.Now().UTC()
	monthStart := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	from := fs.String("from", monthStart.Format(time.DateOnly), "first UTC day (YYYY-MM-DD), included")
	to := fs.String("to", monthStart.AddDate(0, 1, 0).Format(time.DateOnly), "UTC day (YYYY-MM-DD) the range ends before")
	account := fs.String("account", "", "one account")
	ref := fs.String("external-ref", "", "the accounts with this external_ref")
	groupBy := fs.String("group-by", "", "comma-separated: tracked metadata keys, revenue_account, account, day or month")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("tally usage: unexpected argument %q", fs.Arg(0))
	}
	var groups []string
	for _, g := range strings.Split(*groupBy, ",") {
		if g = strings.TrimSpace(g); g != "" {
			groups = append(groups, g)
		}
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	res, err := cl.SummarizeUsage(ctx, &tallyv1.SummarizeUsageRequest{AccountId: *account, ExternalRef: *ref,
		FromDay: *from, ToDay: *to, GroupBy: groups})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, res)
	}
	header := []string{"CURRENCY"}
	for _, g := range groups {
		switch g {
		case "day", "month":
			header = append(header, strings.ToUpper(g))
		case "account":
			header = append(header, "ACCOUNT")
		case "revenue_account":
			header = append(header, "REVENUE_ACCOUNT")
		default:
			header = append(header, g)
		}
	}
	header = append(header, "CHARGED", "REFUNDED", "NET", "CHARGES", "REFUNDS")
	type total struct{ charged, refunded, net, charges, refunds int64 }
	totals := map[string]*total{}
	var currencies []string
	rows := make([]string, 0, len(res.GetRows())+2)
	for _, r := range res.GetRows() {
		cells := []string{r.GetCurrency()}
		for _, g := range groups {
			switch g {
			case "day", "month":
				cells = append(cells, r.GetPeriod())
			case "account":
				cells = append(cells, r.GetAccountId())
			case "revenue_account":
				cells = append(cells, r.GetRevenueAccountId())
			default:
				v, ok := r.GetDimensions()[g]
				switch {
				case !ok:
					v = "(not tracked)"
				case v == "":
					v = "(none)"
				}
				cells = append(cells, v)
			}
		}
		cells = append(cells, fmt.Sprint(r.GetCharged()), fmt.Sprint(r.GetRefunded()), fmt.Sprint(r.GetNet()),
			fmt.Sprint(r.GetCharges()), fmt.Sprint(r.GetRefunds()))
		rows = append(rows, strings.Join(cells, "\t"))
		t := totals[r.GetCurrency()]
		if t == nil {
			t = &total{}
			totals[r.GetCurrency()] = t
			currencies = append(currencies, r.GetCurrency())
		}
		t.charged += r.GetCharged()
		t.refunded += r.GetRefunded()
		t.net += r.GetNet()
		t.charges += r.GetCharges()
		t.refunds += r.GetRefunds()
	}
	if len(groups) > 0 {
		for _, cur := range currencies {
			t := totals[cur]
			cells := []string{cur}
			for range groups {
				cells = append(cells, "TOTAL")
			}
			cells = append(cells, fmt.Sprint(t.charged), fmt.Sprint(t.refunded), fmt.Sprint(t.net), fmt.Sprint(t.charges), fmt.Sprint(t.refunds))
			rows = append(rows, strings.Join(cells, "\t"))
		}
	}
	fmt.Fprintf(out, "usage %s to %s (UTC days, end excluded), amounts in minor units; tracked dimensions: %s\n",
		*from, *to, orNone(strings.Join(res.GetDimensions(), ", ")))
	table(out, strings.Join(header, "\t"), rows...)
	if len(res.GetRows()) == 0 {
		fmt.Fprintln(out, "no charges or refunds in this range")
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
