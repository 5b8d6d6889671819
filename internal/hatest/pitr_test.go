package hatest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// Bounds of the point-in-time recovery test.
const (
	pitrTestTimeout = 90 * time.Second
	// pitrChargesPerPhase is how many charges run before and after the
	// recovery target.
	pitrChargesPerPhase = 40
	// pitrTargetGap separates the last charge before the target from the
	// first after it, so commit timestamps fall clearly on either side.
	pitrTargetGap = 300 * time.Millisecond
	// pitrArchiveWaitMax bounds the wait for the last WAL segment to be
	// archived.
	pitrArchiveWaitMax = 30 * time.Second
)

// reconcileSQL is the reconciliation script operators run; the test runs
// the same file.
const reconcileSQL = "../../scripts/reconcile.sql"

// The procedure of docs/OPERATIONS.md ("Backups and point-in-time
// recovery"), run for real: a primary archives its WAL (archive_command), a
// base backup is taken (pg_basebackup), charges run, a target time is noted,
// more charges run; then the backup is restored to the target time
// (restore_command, recovery_target_time, recovery.signal). Every charge
// acknowledged before the target must be there, none after it, and the
// reconciliation script must find nothing wrong.
func TestPointInTimeRecovery(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), pitrTestTimeout)
	defer cancel()
	dir := t.TempDir()
	archive := filepath.Join(dir, "wal-archive")

	primary, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Dir: filepath.Join(dir, "primary"),
		ExtraConf: map[string]string{"wal_level": "replica", "archive_mode": "on",
			"archive_command": fmt.Sprintf("test ! -f %[1]s/%%f && cp %%p %[1]s/%%f", archive)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = primary.Close() })
	if err := primary.MakeServerDir(archive); err != nil {
		t.Fatal(err)
	}
	pc := connect(t, ctx, primary.URL("postgres"))
	defer pc.Close(ctx)
	if _, err := pc.Exec(ctx, "CREATE DATABASE tally"); err != nil {
		t.Fatal(err)
	}
	if err := store.Migrate(ctx, primary.URL("tally")); err != nil {
		t.Fatal(err)
	}
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: primary.URL("tally")})
	cl := env.Client
	acct, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "EUR", Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER,
		Floor: tallyv1.Floor_FLOOR_NON_NEGATIVE})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: acct.GetAccountId(), Amount: 1_000_000, IdempotencyKey: "fund"}); err != nil {
		t.Fatal(err)
	}

	// 1. Base backup (the archive already receives WAL).
	restoreDir := filepath.Join(dir, "restore")
	if err := primary.BaseBackup(ctx, restoreDir); err != nil {
		t.Fatal(err)
	}

	charge := func(prefix string) (keys []string, lastBalance int64) {
		for i := range pitrChargesPerPhase {
			key := fmt.Sprintf("%s-%d", prefix, i)
			res, err := cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct.GetAccountId(), Amount: 7, IdempotencyKey: key})
			if err != nil {
				t.Fatalf("charge %s: %v", key, err)
			}
			keys = append(keys, key)
			lastBalance = res.GetBalance().GetBalance()
		}
		return keys, lastBalance
	}
	// 2. Charges before the target, the target (the database's clock after
	// the last acknowledgement), charges after it.
	before, balanceAtTarget := charge("before")
	time.Sleep(pitrTargetGap / 2)
	var target time.Time
	if err := pc.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&target); err != nil {
		t.Fatal(err)
	}
	time.Sleep(pitrTargetGap / 2)
	after, _ := charge("after")

	// 3. Make sure the WAL holding the later charges is in the archive:
	// recovery must read past the target to know it reached it.
	var lastWAL string
	if err := pc.QueryRow(ctx, "SELECT pg_walfile_name(pg_switch_wal())").Scan(&lastWAL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, pitrArchiveWaitMax, "WAL segment "+lastWAL+" to be archived", func() bool {
		_, err := os.Stat(filepath.Join(archive, lastWAL))
		return err == nil
	})
	// The primary is lost.
	if err := primary.Kill(); err != nil {
		t.Fatal(err)
	}

	// 4. Restore: the base backup plus archived WAL up to the target.
	restored, err := localsvc.StartPostgresRecovering(ctx, localsvc.PostgresOptions{Dir: restoreDir,
		ExtraConf: map[string]string{
			"restore_command":        fmt.Sprintf("cp %s/%%f %%p", archive),
			"recovery_target_time":   target.UTC().Format("2006-01-02 15:04:05.999999-07"),
			"recovery_target_action": "promote",
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = restored.Close() })

	// 5. Checks on the restored copy.
	rc := connect(t, ctx, restored.URL("tally"))
	defer rc.Close(ctx)
	present := func(keys []string) int {
		var n int
		if err := rc.QueryRow(ctx, `SELECT count(*) FROM transfers WHERE idempotency_key = ANY($1)`, keys).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := present(before); n != len(before) {
		t.Errorf("%d of %d charges acknowledged before the target are in the restored copy", n, len(before))
	}
	if n := present(before[len(before)-1:]); n != 1 {
		t.Errorf("the last charge acknowledged before the target (%s) is missing", before[len(before)-1])
	}
	if n := present(after); n != 0 {
		t.Errorf("%d charges made after the target are in the restored copy", n)
	}
	var bal int64
	if err := rc.QueryRow(ctx, "SELECT balance FROM accounts WHERE account_id = $1", acct.GetAccountId()).Scan(&bal); err != nil {
		t.Fatal(err)
	}
	if bal != balanceAtTarget {
		t.Errorf("restored balance %d, want %d (as acknowledged at the target)", bal, balanceAtTarget)
	}
	reconcile(t, ctx, rc)

	// `tally reconcile` (the Reconcile RPC) through a tally server on the
	// restored copy: no findings.
	renv := tallytest.Start(t, tallytest.Options{DatabaseURL: restored.URL("tally")})
	var findings []string
	var summary *tallyv1.ReconcileSummary
	err = renv.Client.Reconcile(ctx, &tallyv1.ReconcileRequest{}, func(m *tallyv1.ReconcileResponse) error {
		if f := m.GetFinding(); f != nil {
			findings = append(findings, f.GetCheck()+": "+f.GetDetail())
		}
		if s := m.GetSummary(); s != nil {
			summary = s
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Reconcile on the restored copy: %v", err)
	}
	if summary == nil || summary.GetAccountsChecked() == 0 || len(findings) > 0 || summary.GetFindings() != 0 {
		t.Fatalf("Reconcile on the restored copy: summary %v, findings %v", summary, findings)
	}
	t.Logf("tally reconcile on the restored copy: %d accounts checked, no findings", summary.GetAccountsChecked())
	t.Logf("restored to %s: %d charges before the target present, %d after it absent, balance %d, reconciliation clean",
		target.Format(time.RFC3339Nano), len(before), len(after), bal)
}

// reconcile runs scripts/reconcile.sql and fails on any violation.
func reconcile(t *testing.T, ctx context.Context, c *pgx.Conn) {
	t.Helper()
	q, err := os.ReadFile(reconcileSQL)
	if err != nil {
		t.Fatal(err)
	}
	rows, err := c.Query(ctx, string(q))
	if err != nil {
		t.Fatalf("reconcile.sql: %v", err)
	}
	n := 0
	for rows.Next() {
		var name string
		var violations int64
		if err := rows.Scan(&name, &violations); err != nil {
			t.Fatal(err)
		}
		n++
		if violations != 0 {
			t.Errorf("reconciliation: %s: %d violations", name, violations)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if n < 6 {
		t.Fatalf("reconcile.sql returned %d checks, want 6", n)
	}
}
