package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

type usageOpts struct {
	from, to, account, externalRef, groupBy string
	groups                                  []string
}

// Validate splits --group-by (the server checks the names: the tracked
// metadata keys are its configuration).
func (o *usageOpts) Validate() error {
	o.groups = nil
	for _, g := range strings.Split(o.groupBy, ",") {
		if g = strings.TrimSpace(g); g != "" {
			o.groups = append(o.groups, g)
		}
	}
	return nil
}

// newUsageCmd is `tally usage`: a spend breakdown (SummarizeUsage) as a
// table with a total per currency, or --json.
func (a *app) newUsageCmd() *cobra.Command {
	o := &usageOpts{}
	cmd := &cobra.Command{Use: "usage", Short: "Spend breakdown: charges minus refunds by metadata key, revenue account, day or month",
		Args: cobra.NoArgs, RunE: a.runE(o),
		Example: "  tally usage --from 2026-11-01 --to 2026-12-01 --external-ref cust-42 --group-by product,month"}
	now := time.Now().UTC()
	monthStart := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	f := cmd.Flags()
	f.StringVar(&o.from, "from", monthStart.Format(time.DateOnly), "first UTC day (YYYY-MM-DD), included")
	f.StringVar(&o.to, "to", monthStart.AddDate(0, 1, 0).Format(time.DateOnly), "UTC day (YYYY-MM-DD) the range ends before")
	f.StringVar(&o.account, "account", "", "one account")
	f.StringVar(&o.externalRef, "external-ref", "", "the accounts with this external_ref")
	f.StringVar(&o.groupBy, "group-by", "", "comma-separated: tracked metadata keys, revenue_account, account, day or month")
	a.conn.register(cmd)
	return cmd
}

func (o *usageOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	res, err := cl.SummarizeUsage(ctx, &tallyv1.SummarizeUsageRequest{AccountId: o.account, ExternalRef: o.externalRef,
		FromDay: o.from, ToDay: o.to, GroupBy: o.groups})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, res)
	}
	printUsage(a.out, o, res)
	return nil
}

// printUsage prints the usage rows as a table, with a total row per
// currency when grouped.
func printUsage(out io.Writer, o *usageOpts, res *tallyv1.SummarizeUsageResponse) {
	type total struct{ charged, refunded, net, charges, refunds int64 }
	totals := map[string]*total{}
	var currencies []string
	rows := make([]string, 0, len(res.GetRows())+2)
	for _, r := range res.GetRows() {
		cells := append(usageGroupCells(r, o.groups), fmt.Sprint(r.GetCharged()), fmt.Sprint(r.GetRefunded()),
			fmt.Sprint(r.GetNet()), fmt.Sprint(r.GetCharges()), fmt.Sprint(r.GetRefunds()))
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
	if len(o.groups) > 0 {
		for _, cur := range currencies {
			t := totals[cur]
			cells := []string{cur}
			for range o.groups {
				cells = append(cells, "TOTAL")
			}
			cells = append(cells, fmt.Sprint(t.charged), fmt.Sprint(t.refunded), fmt.Sprint(t.net), fmt.Sprint(t.charges), fmt.Sprint(t.refunds))
			rows = append(rows, strings.Join(cells, "\t"))
		}
	}
	fmt.Fprintf(out, "usage %s to %s (UTC days, end excluded), amounts in minor units; tracked dimensions: %s\n",
		o.from, o.to, orNone(strings.Join(res.GetDimensions(), ", ")))
	table(out, usageHeader(o.groups), rows...)
	if len(res.GetRows()) == 0 {
		fmt.Fprintln(out, "no charges or refunds in this range")
	}
}

// usageHeader is the header of the usage table grouped by groups.
func usageHeader(groups []string) string {
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
	return strings.Join(append(header, "CHARGED", "REFUNDED", "NET", "CHARGES", "REFUNDS"), "\t")
}

// usageGroupCells are a row's currency and group values.
func usageGroupCells(r *tallyv1.UsageRow, groups []string) []string {
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
	return cells
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
