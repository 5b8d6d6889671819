package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// MetricsPath is where tallyd serves its Prometheus metrics on --http-addr.
const MetricsPath = "/metrics"

// BatchSizeMetric is tallyd's histogram of calls per committed batch.
const BatchSizeMetric = "tally_batch_size_items"

// promHist is the _sum and _count of one Prometheus histogram.
type promHist struct {
	Sum, Count float64
}

// parsePromHist reads the _sum and _count of the unlabelled histogram name
// from the Prometheus text format. A histogram that is absent reads as
// zeros with found false.
func parsePromHist(r io.Reader, name string) (h promHist, found bool, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		var dst *float64
		switch f[0] {
		case name + "_sum":
			dst = &h.Sum
		case name + "_count":
			dst = &h.Count
		default:
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			return promHist{}, false, fmt.Errorf("%s: %w", f[0], err)
		}
		*dst = v
		found = true
	}
	return h, found, sc.Err()
}

// meanDelta is the mean of the observations made between two readings of a
// histogram (0 when none was made).
func meanDelta(a, b promHist) float64 {
	n := b.Count - a.Count
	if n <= 0 {
		return 0
	}
	return (b.Sum - a.Sum) / n
}

// fetchBatchHist reads tallyd's batch-size histogram from
// http://hostport/metrics.
func fetchBatchHist(ctx context.Context, hostport string) (promHist, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+hostport+MetricsPath, nil)
	if err != nil {
		return promHist{}, err
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return promHist{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return promHist{}, fmt.Errorf("GET %s: %s", MetricsPath, resp.Status)
	}
	h, found, err := parsePromHist(resp.Body, BatchSizeMetric)
	if err == nil && !found {
		err = fmt.Errorf("GET %s: no %s", MetricsPath, BatchSizeMetric)
	}
	return h, err
}
