package main

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"os"
	"strconv"
	"strings"

	"github.com/tallyledger/tally/ledger"
)

// debugHandler adds /debug/stats (group commit counters and the process's
// peak RSS, read by `tally bench`) to h, and net/http/pprof under
// /debug/pprof/ when withPprof is set.
func debugHandler(h http.Handler, l *ledger.Ledger, withPprof bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("/debug/stats", func(w http.ResponseWriter, r *http.Request) {
		s := l.BatchStats()
		out := map[string]any{
			"batch": map[string]int64{
				"batches": s.Batches, "items": s.Items, "items_peak": s.ItemsPeak, "splits": s.Splits,
			},
			"peak_rss_bytes": peakRSS(),
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
	if withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// peakRSS returns this process's VmHWM in bytes, 0 where /proc has none.
func peakRSS() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			if fields := strings.Fields(rest); len(fields) > 0 {
				kb, _ := strconv.ParseInt(fields[0], 10, 64)
				return kb * 1024
			}
		}
	}
	return 0
}
