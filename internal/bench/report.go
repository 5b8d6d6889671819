package bench

import (
	"fmt"
	"io"
	"sort"
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
