package bench

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// Print writes r for a person.
func Print(w io.Writer, r Result) {
	fmt.Fprintf(w, "scenario     %s  (%d clients, %d conns, %d accounts, %.1fs measured, setup %.1fs)\n",
		r.Scenario, r.Clients, r.Conns, r.Accounts, r.DurationS, r.SetupS)
	fmt.Fprintf(w, "throughput   %.0f ops/s  (%d ok)\n", r.Throughput, r.Ops)
	l := r.Latency
	fmt.Fprintf(w, "latency ms   p50 %.2f  p95 %.2f  p99 %.2f  max %.2f  avg %.2f\n", l.P50, l.P95, l.P99, l.Max, l.Avg)
	if len(r.Errors) == 0 {
		fmt.Fprintln(w, "errors       none")
	} else {
		fmt.Fprintf(w, "errors       %s\n", kv(r.Errors))
	}
	if len(r.Sources) > 0 {
		fmt.Fprintf(w, "reads from   %s\n", kv(r.Sources))
	}
	s := r.Server
	if s.BatchStatsKnown {
		fmt.Fprintf(w, "batches      %d batches, %.1f items/batch avg, peak %d since start, %d splits\n",
			s.Batches, s.BatchItemsAvg, s.BatchItemsPeak, s.BatchSplits)
	} else {
		fmt.Fprintln(w, "batches      unknown (pass --server-http HOST:PORT of tallyd's --http-addr)")
	}
	if s.PeakRSSBytes > 0 {
		fmt.Fprintf(w, "server RSS   peak %.1f MB\n", float64(s.PeakRSSBytes)/1e6)
	} else {
		fmt.Fprintln(w, "server RSS   unknown (pass --server-pid or --server-http)")
	}
	if s.CPUCores > 0 {
		fmt.Fprintf(w, "cpu          server %.2f cores, bench %.2f cores\n", s.CPUCores, r.ClientCPUCores)
	} else {
		fmt.Fprintf(w, "cpu          bench %.2f cores\n", r.ClientCPUCores)
	}
	printCost(w, r.Cost)
	fmt.Fprintf(w, "load average %.2f at the start of the window\n", r.LoadAvg1)
}

// printCost writes the cost lines of Print.
func printCost(w io.Writer, c Cost) {
	fmt.Fprintf(w, "cpu µs/op    tallyd %s, bench %s\n", num(c.TallydCPUUsPerOp, 0), num(c.ClientCPUUsPerOp, 0))
	if c.PGBackendsCPUUsPerOp == nil {
		fmt.Fprintln(w, "postgres     unknown (pass --database-url of the bench database)")
		return
	}
	fmt.Fprintf(w, "pg cpu µs/op %s: %s\n", num(c.PGBackendsCPUUsPerOp, 0), c.PGBackendsScope)
	if c.PGServerCPUUsPerOp != nil {
		fmt.Fprintf(w, "pg cpu µs/op %s: %s\n", num(c.PGServerCPUUsPerOp, 0), c.PGServerScope)
	}
	fmt.Fprintf(w, "commits      %s/s (%s, pg_stat_database.xact_commit), %s items/batch (%s committed batches, %s)\n",
		num(c.CommitsPerS, 0), numi(c.Commits), num(c.ItemsPerBatch, 1), num(c.Batches, 0), BatchSizeMetric)
	if len(c.SeqScans) == 0 {
		fmt.Fprintln(w, "seq scans    none")
		return
	}
	tables := make([]string, 0, len(c.SeqScans))
	for t := range c.SeqScans {
		tables = append(tables, t)
	}
	sort.Strings(tables)
	parts := make([]string, len(tables))
	for i, t := range tables {
		parts[i] = fmt.Sprintf("%s %d (%d rows)", t, c.SeqScans[t].Scans, c.SeqScans[t].TupRead)
	}
	fmt.Fprintf(w, "seq scans    %s\n", strings.Join(parts, ", "))
}

// num formats an optional figure with prec decimals ("?" when unknown).
func num(v *float64, prec int) string {
	if v == nil {
		return "?"
	}
	return strconv.FormatFloat(*v, 'f', prec, 64)
}

func numi(v *int64) string {
	if v == nil {
		return "?"
	}
	return strconv.FormatInt(*v, 10)
}

func kv(m map[string]int64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}
