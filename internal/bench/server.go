package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// StatsPath is where tallyd serves its counters on --http-addr.
const StatsPath = "/debug/stats"

// Stats is the JSON tallyd serves at StatsPath.
type Stats struct {
	Batch struct {
		Batches   int64 `json:"batches"`
		Items     int64 `json:"items"`
		ItemsPeak int64 `json:"items_peak"`
		Splits    int64 `json:"splits"`
	} `json:"batch"`
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
}

type serverSample struct {
	stats   Stats
	statsOK bool
	cpu     time.Duration
	cpuOK   bool
	peakRSS int64
	hist    promHist // tally_batch_size_items, summed over the servers
	histOK  bool
}

// serverSample reads what it can about the server: its counters and its
// batch-size histogram over HTTP, and its CPU time and peak RSS from /proc.
func (e *env) serverSample(ctx context.Context) serverSample {
	var s serverSample
	if hosts := splitList(e.cfg.ServerHTTP); len(hosts) > 0 {
		s.statsOK = true
		for _, h := range hosts {
			st, err := FetchStats(ctx, h)
			if err != nil {
				e.cfg.Log("server stats: %v", err)
				s.statsOK = false
				continue
			}
			s.stats.Batch.Batches += st.Batch.Batches
			s.stats.Batch.Items += st.Batch.Items
			s.stats.Batch.Splits += st.Batch.Splits
			s.stats.Batch.ItemsPeak = max(s.stats.Batch.ItemsPeak, st.Batch.ItemsPeak)
			s.peakRSS = max(s.peakRSS, st.PeakRSSBytes)
		}
		s.histOK = true
		for _, h := range hosts {
			hist, err := fetchBatchHist(ctx, h)
			if err != nil {
				e.cfg.Log("server metrics: %v", err)
				s.histOK = false
				continue
			}
			s.hist.Sum += hist.Sum
			s.hist.Count += hist.Count
		}
	}
	var pids []int
	if e.cfg.ServerPID > 0 {
		pids = append(pids, e.cfg.ServerPID)
	}
	pids = append(pids, e.cfg.ServerPIDs...)
	s.cpuOK = len(pids) > 0
	var rss int64
	for _, pid := range pids {
		cpu, err := procCPU(pid)
		if err != nil {
			s.cpuOK = false
		}
		s.cpu += cpu
		if r, err := PeakRSS(pid); err == nil {
			rss = max(rss, r)
		}
	}
	if rss > 0 {
		s.peakRSS = rss
	}
	return s
}

func diffServer(a, b serverSample, window time.Duration) ServerStats {
	var out ServerStats
	out.PeakRSSBytes = b.peakRSS
	if a.cpuOK && b.cpuOK {
		out.CPUCores = (b.cpu - a.cpu).Seconds() / window.Seconds()
	}
	if a.statsOK && b.statsOK {
		out.BatchStatsKnown = true
		out.Batches = b.stats.Batch.Batches - a.stats.Batch.Batches
		out.BatchItems = b.stats.Batch.Items - a.stats.Batch.Items
		out.BatchSplits = b.stats.Batch.Splits - a.stats.Batch.Splits
		out.BatchItemsPeak = b.stats.Batch.ItemsPeak
		if out.Batches > 0 {
			out.BatchItemsAvg = float64(out.BatchItems) / float64(out.Batches)
		}
	}
	return out
}

// FetchStats reads tallyd's counters from http://hostport/debug/stats.
func FetchStats(ctx context.Context, hostport string) (Stats, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+hostport+StatsPath, nil)
	if err != nil {
		return Stats{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return Stats{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Stats{}, fmt.Errorf("GET %s: %s", StatsPath, resp.Status)
	}
	var st Stats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return Stats{}, fmt.Errorf("GET %s: %w", StatsPath, err)
	}
	return st, nil
}
