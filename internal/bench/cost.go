package bench

import "time"

// Cost is what one operation cost during the measured window. A nil figure
// is unknown (the bench could not see that process or that database).
type Cost struct {
	// CPU time per completed operation, in microseconds, of tallyd (all
	// --server-pid processes), of PostgreSQL, and of this process.
	TallydCPUUsPerOp *float64 `json:"tallyd_cpu_us_per_op"`
	ClientCPUUsPerOp *float64 `json:"client_cpu_us_per_op"`
	// PGBackendsCPUUsPerOp covers PGBackendsScope, PGServerCPUUsPerOp
	// PGServerScope (with --database-url, the server running on this host).
	PGBackendsCPUUsPerOp *float64 `json:"pg_backends_cpu_us_per_op"`
	PGBackendsScope      string   `json:"pg_backends_scope,omitempty"`
	PGServerCPUUsPerOp   *float64 `json:"pg_server_cpu_us_per_op"`
	PGServerScope        string   `json:"pg_server_scope,omitempty"`
	// Batches and ItemsPerBatch are from tallyd's Prometheus histogram
	// tally_batch_size_items (committed batches), summed over --server-http.
	Batches       *float64 `json:"batches_committed"`
	ItemsPerBatch *float64 `json:"items_per_batch"`
	// Commits is the bench database's pg_stat_database.xact_commit delta
	// (every committed transaction, reads included); CommitsPerS divides it
	// by the window.
	Commits     *int64   `json:"commits"`
	CommitsPerS *float64 `json:"commits_per_s"`
	// SeqScans is the sequential scans each table of the bench database had
	// (pg_stat_user_tables deltas; tables with none left out).
	SeqScans map[string]SeqScan `json:"seq_scans,omitempty"`
}

// window is everything read at both ends of the measured window.
type window struct {
	server    [2]serverSample
	pg        [2]pgSample
	clientCPU [2]time.Duration
	d         time.Duration
	ops       int64
}

func (w window) cost() Cost {
	var c Cost
	a, b := w.server[0], w.server[1]
	per := func(d time.Duration) *float64 { return ptr(perOpMicros(d, w.ops)) }
	c.ClientCPUUsPerOp = per(w.clientCPU[1] - w.clientCPU[0])
	if a.cpuOK && b.cpuOK {
		c.TallydCPUUsPerOp = per(b.cpu - a.cpu)
	}
	if a.histOK && b.histOK {
		c.Batches = ptr(b.hist.Count - a.hist.Count)
		if *c.Batches > 0 { // no batch (reads, noop): no mean
			c.ItemsPerBatch = ptr(meanDelta(a.hist, b.hist))
		}
	}
	p, q := w.pg[0], w.pg[1]
	if !p.ok || !q.ok {
		return c
	}
	c.PGBackendsCPUUsPerOp, c.PGBackendsScope = per(cpuDelta(p.backends, q.backends)), PGScopeBackends
	if p.serverOK && q.serverOK {
		c.PGServerCPUUsPerOp, c.PGServerScope = per(q.server-p.server), PGScopeServer
	}
	commits := q.commits - p.commits
	c.Commits = &commits
	c.CommitsPerS = ptr(float64(commits) / w.d.Seconds())
	c.SeqScans = seqScanDelta(p.tables, q.tables)
	return c
}

func ptr[T any](v T) *T { return &v }
