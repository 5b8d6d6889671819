package bench

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// UsageConfig configures RunUsage: SummarizeUsage timed against a running
// tallyd whose rollups bench/usage.sql filled.
type UsageConfig struct {
	Addr   string
	APIKey string
	// From and To are the range queried (YYYY-MM-DD, To excluded).
	From, To string
	// ExternalRef and AccountID are the selections of the narrow queries.
	ExternalRef string
	AccountID   string
	// Repeats is how many timed calls each query gets (after one untimed
	// first call, reported on its own).
	Repeats int
	Log     func(format string, a ...any)
}

// UsageRepeatsDefault is the timed calls per query.
const UsageRepeatsDefault = 5

// UsageQueryResult is one query's timings.
type UsageQueryResult struct {
	Name    string   `json:"name"`
	GroupBy []string `json:"group_by"`
	Rows    int      `json:"rows"`
	// Charges is the sum of the rows' charge counts (a check on the fill).
	Charges int64         `json:"charges"`
	First   time.Duration `json:"first_ns"`
	Min     time.Duration `json:"min_ns"`
	Median  time.Duration `json:"median_ns"`
	Max     time.Duration `json:"max_ns"`
}

// RunUsage times each query Repeats times through the real client.
func RunUsage(ctx context.Context, cfg UsageConfig) ([]UsageQueryResult, error) {
	if cfg.Repeats <= 0 {
		cfg.Repeats = UsageRepeatsDefault
	}
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	cl, err := client.New(client.Config{Addr: cfg.Addr, APIKey: cfg.APIKey})
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	queries := []struct {
		name string
		req  *tallyv1.SummarizeUsageRequest
	}{
		{"all accounts by product and month", &tallyv1.SummarizeUsageRequest{GroupBy: []string{"product", "month"}}},
		{"all accounts by sku and month", &tallyv1.SummarizeUsageRequest{GroupBy: []string{"sku", "month"}}},
		{"all accounts by product, team, sku and month", &tallyv1.SummarizeUsageRequest{GroupBy: []string{"product", "team", "sku", "month"}}},
		{"all accounts by product and day", &tallyv1.SummarizeUsageRequest{GroupBy: []string{"product", "day"}}},
		{"all accounts by account and month", &tallyv1.SummarizeUsageRequest{GroupBy: []string{"account", "month"}}},
		{"one external_ref by product and day", &tallyv1.SummarizeUsageRequest{ExternalRef: cfg.ExternalRef, GroupBy: []string{"product", "day"}}},
		{"one account by sku and month", &tallyv1.SummarizeUsageRequest{AccountId: cfg.AccountID, GroupBy: []string{"sku", "month"}}},
	}
	var out []UsageQueryResult
	for _, q := range queries {
		if (q.req.ExternalRef == "" && strings.Contains(q.name, "external_ref")) || (q.req.AccountId == "" && strings.Contains(q.name, "one account")) {
			continue
		}
		q.req.FromDay, q.req.ToDay = cfg.From, cfg.To
		r := UsageQueryResult{Name: q.name, GroupBy: q.req.GroupBy}
		var times []time.Duration
		for i := 0; i <= cfg.Repeats; i++ {
			start := time.Now()
			resp, err := cl.SummarizeUsage(ctx, q.req)
			d := time.Since(start)
			if err != nil {
				return out, fmt.Errorf("%s: %w", q.name, err)
			}
			if i == 0 {
				r.First = d
				r.Rows = len(resp.GetRows())
				for _, row := range resp.GetRows() {
					r.Charges += row.GetCharges()
				}
				continue
			}
			times = append(times, d)
		}
		slices.Sort(times)
		r.Min, r.Median, r.Max = times[0], times[len(times)/2], times[len(times)-1]
		cfg.Log("%s: %d rows, median %s", q.name, r.Rows, r.Median)
		out = append(out, r)
	}
	return out, nil
}

// PrintUsage writes RunUsage's results as a table.
func PrintUsage(w io.Writer, rs []UsageQueryResult) {
	fmt.Fprintf(w, "%-45s %7s %12s %10s %10s %10s %10s\n", "query", "rows", "charges", "first", "min", "median", "max")
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }
	for _, r := range rs {
		fmt.Fprintf(w, "%-45s %7d %12d %10s %10s %10s %10s\n", r.Name, r.Rows, r.Charges, ms(r.First), ms(r.Min), ms(r.Median), ms(r.Max))
	}
}
