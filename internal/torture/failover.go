package torture

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/internal/localsvc"
)

// FaultPGFailover is the PostgreSQL failover of a Config.PGFailover run:
// the primary is killed with SIGKILL and its synchronous standby promoted,
// once per run. It is not one of the nemesis's FaultKinds.
const FaultPGFailover = "pg_failover"

// Bounds of the failover mode.
const (
	// standbySyncMax bounds the wait for the standby to stream in sync
	// (at setup, and before the kill, after a restart of the primary).
	standbySyncMax = 60 * time.Second
	// failoverFraction of the run passes before the failover.
	failoverFraction = 0.4
)

// failoverInfo records the failover for the report.
type failoverInfo struct {
	done        bool
	at          time.Duration // into the workload
	oldPort     int
	newPort     int
	syncWait    time.Duration
	promoteTook time.Duration
	killedAt    time.Time
	promotedAt  time.Time
}

// failoverAt is when into the workload the nemesis fails PostgreSQL over.
func (r *runner) failoverAt() time.Duration {
	return time.Duration(float64(r.cfg.Duration) * failoverFraction).Round(time.Millisecond)
}

// startStandby takes a base backup of the primary, starts it as a streaming
// standby, and only then makes the primary's commits wait for it
// (synchronous_standby_names is set on the primary after the backup, so the
// promoted standby does not wait for a standby of its own).
func (r *runner) startStandby(ctx context.Context) error {
	r.printf("starting a synchronous streaming standby ...\n")
	dir := filepath.Join(r.dir, "pg-standby")
	if err := r.pg.BaseBackup(ctx, dir, "-R"); err != nil {
		return err
	}
	var err error
	// A short retry interval: the standby reconnects quickly after the
	// nemesis restarts the primary (commits wait for it meanwhile).
	r.standby, err = localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Dir: dir, Logger: r.log,
		ExtraConf: map[string]string{"wal_retrieve_retry_interval": "200ms"}})
	if err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, r.pg.URL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "ALTER SYSTEM SET synchronous_standby_names = '*'"); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	_, err = r.waitStandbySynced(ctx)
	return err
}

// waitStandbySynced waits until the standby streams in sync and has
// flushed all WAL the primary had when the wait began. After a restart of
// the primary, commits that were waiting for the standby when it went down
// are visible on the restarted primary before the standby has them; once
// the standby has flushed past them, every commit anyone could have seen
// is on the standby, and later ones wait for it.
func (r *runner) waitStandbySynced(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, standbySyncMax)
	defer cancel()
	var lastErr error
	lsn := ""
	for {
		conn, err := pgx.Connect(ctx, r.pg.URL("postgres"))
		if err == nil {
			if lsn == "" {
				err = conn.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn)
			}
			if err == nil {
				var n int
				err = conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication
					WHERE sync_state = 'sync' AND flush_lsn >= $1::pg_lsn`, lsn).Scan(&n)
				if err == nil && n > 0 {
					conn.Close(context.WithoutCancel(ctx))
					return time.Since(start), nil
				}
			}
			conn.Close(context.WithoutCancel(ctx))
		}
		if err != nil {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return time.Since(start), fmt.Errorf("standby not in sync with the primary after %s (flush past %s; last error: %v)",
				standbySyncMax, lsn, lastErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// pgFailover kills the primary with SIGKILL, promotes the standby and makes
// it the current primary: later PostgreSQL restarts, plants and the check
// use it. tallyd is not told: it finds the new primary through its
// two-host URL.
func (r *runner) pgFailover(ctx context.Context, at time.Duration) (string, error) {
	syncWait, err := r.waitStandbySynced(ctx)
	if err != nil {
		return "", err
	}
	oldPort, newPort := r.pg.Port(), r.standby.Port()
	if err := r.pg.Kill(); err != nil {
		return "", err
	}
	killed := time.Now()
	if err := r.standby.Promote(ctx); err != nil {
		return "", err
	}
	promoted := time.Now()
	took := promoted.Sub(killed)
	r.oldPG, r.pg, r.standby = r.pg, r.standby, nil
	r.dbURL = r.pg.URL("tally")
	r.failover = failoverInfo{done: true, at: at, oldPort: oldPort, newPort: newPort, syncWait: syncWait, promoteTook: took,
		killedAt: killed, promotedAt: promoted}
	r.printf("  PostgreSQL failover at t=%s: primary :%d killed -9, standby :%d promoted in %s\n",
		at.Round(100*time.Millisecond), oldPort, newPort, took.Round(time.Millisecond))
	return fmt.Sprintf("primary :%d kill -9 (standby in sync after %s), standby :%d promoted in %s",
		oldPort, syncWait.Round(time.Millisecond), newPort, took.Round(time.Millisecond)), nil
}

// checkFailover is the failover run's own invariant: the failover happened
// once, workload ops were acknowledged both before the kill and after the
// promotion (tallyd found the new primary by itself), and the server the
// checker read (conn) is the promoted standby, out of recovery. Every other invariant was checked on that server, so
// "acknowledged ops applied exactly once" there means no acknowledged op
// was lost in the failover.
func (r *runner) checkFailover(ctx context.Context, conn *pgx.Conn) InvariantResult {
	inv := InvariantResult{Name: "pg_failover",
		Description: "the primary was killed (-9) and its synchronous standby promoted mid-workload; every invariant was checked on the new primary",
		Checked:     1, Pass: true}
	fail := func(msg string) {
		inv.Pass = false
		inv.Violations++
		inv.Examples = append(inv.Examples, msg)
	}
	f := r.failover
	if !f.done {
		fail("the failover never happened (run too short?)")
		return inv
	}
	var inRecovery bool
	var port int
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery(), current_setting('port')::int").Scan(&inRecovery, &port); err != nil {
		fail("cannot ask the checked server: " + err.Error())
		return inv
	}
	if inRecovery || port != f.newPort {
		fail(fmt.Sprintf("checked server :%d in recovery=%v; the promoted standby is :%d", port, inRecovery, f.newPort))
	}
	var before, after int
	r.hist.mu.Lock()
	for _, o := range r.hist.Ops {
		if o.Client < 0 || o.Outcome != OutcomeAcked {
			continue
		}
		if o.End.Before(f.killedAt) {
			before++
		}
		if o.Start.After(f.promotedAt) {
			after++
		}
	}
	r.hist.mu.Unlock()
	if before == 0 || after == 0 {
		fail(fmt.Sprintf("%d ops acknowledged before the kill, %d sent and acknowledged after the promotion: want some of each", before, after))
	}
	inv.Note = fmt.Sprintf("at t=%s: primary :%d killed, standby :%d promoted in %s; %d ops acked before the kill, %d sent and acked after the promotion; checked on :%d",
		f.at.Round(100*time.Millisecond), f.oldPort, f.newPort, f.promoteTook.Round(time.Millisecond), before, after, port)
	return inv
}
