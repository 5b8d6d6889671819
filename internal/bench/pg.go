package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// PGCPUScope names, in the output, which PostgreSQL processes CPUBackendsUs
// and CPUServerUs cover.
const (
	PGScopeBackends = "backends connected to the bench database (pg_stat_activity.pid)"
	PGScopeServer   = "the whole server: the postmaster, its live children and those that ended (other databases' load included)"
)

// pgSample is one reading of the bench database's statistics and of the
// PostgreSQL processes' CPU time.
type pgSample struct {
	ok       bool
	commits  int64
	tables   map[string]SeqScan
	backends map[int]time.Duration // bench-database backends' CPU, by pid
	server   time.Duration         // treeCPU of the postmaster
	serverOK bool
}

// pgWatch reads PostgreSQL's side of a run through one connection to the
// bench database.
type pgWatch struct {
	conn       *pgx.Conn
	postmaster int // 0 when the server is not a local process
	log        func(string, ...any)
}

func newPGWatch(ctx context.Context, url string, log func(string, ...any)) (*pgWatch, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("--database-url: %w", err)
	}
	w := &pgWatch{conn: conn, log: log}
	var self int
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&self); err != nil {
		conn.Close(ctx)
		return nil, err
	}
	// The postmaster is our backend's parent, if the server runs here.
	if s, err := readProcStat("/proc", self); err == nil {
		w.postmaster = s.PPID
	} else {
		log("postgres CPU unknown (server not local? %v)", err)
	}
	return w, nil
}

func (w *pgWatch) close() { w.conn.Close(context.Background()) }

// analyze refreshes the planner statistics of the bench database.
func (w *pgWatch) analyze(ctx context.Context) error {
	if _, err := w.conn.Exec(ctx, "ANALYZE"); err != nil {
		return fmt.Errorf("ANALYZE the bench database: %w", err)
	}
	return nil
}

// sample reads the statistics; a nil watch reads nothing (ok false).
func (w *pgWatch) sample(ctx context.Context) pgSample {
	s := pgSample{tables: map[string]SeqScan{}}
	if w == nil {
		return s
	}
	err := w.conn.QueryRow(ctx, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").Scan(&s.commits)
	if err == nil {
		err = w.seqScans(ctx, s.tables)
	}
	var pids []int
	if err == nil {
		err = w.backendPIDs(ctx, &pids)
	}
	if err != nil {
		w.log("postgres statistics: %v", err)
		return s
	}
	s.ok = true
	s.backends = cpuOf("/proc", pids)
	if w.postmaster > 0 {
		cpu, err := treeCPU("/proc", w.postmaster)
		s.server, s.serverOK = cpu, err == nil
	}
	return s
}

func (w *pgWatch) seqScans(ctx context.Context, out map[string]SeqScan) error {
	rows, err := w.conn.Query(ctx, "SELECT relname, coalesce(seq_scan, 0), coalesce(seq_tup_read, 0) FROM pg_stat_user_tables")
	if err != nil {
		return err
	}
	var name string
	var sc SeqScan
	_, err = pgx.ForEachRow(rows, []any{&name, &sc.Scans, &sc.TupRead}, func() error {
		out[name] = sc
		return nil
	})
	return err
}

func (w *pgWatch) backendPIDs(ctx context.Context, pids *[]int) error {
	rows, err := w.conn.Query(ctx, `SELECT pid FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'`)
	if err != nil {
		return err
	}
	var pid int
	_, err = pgx.ForEachRow(rows, []any{&pid}, func() error {
		*pids = append(*pids, pid)
		return nil
	})
	return err
}

// SeqScan is a table's sequential scans (pg_stat_user_tables).
type SeqScan struct {
	Scans   int64 `json:"seq_scan"`
	TupRead int64 `json:"seq_tup_read"`
}

// seqScanDelta is the scans each table had between two readings; tables
// with none are left out.
func seqScanDelta(a, b map[string]SeqScan) map[string]SeqScan {
	out := map[string]SeqScan{}
	for t, sb := range b {
		d := SeqScan{Scans: sb.Scans - a[t].Scans, TupRead: sb.TupRead - a[t].TupRead}
		if d.Scans != 0 || d.TupRead != 0 {
			out[t] = d
		}
	}
	return out
}
