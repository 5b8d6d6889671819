package hatest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// Bounds of the PostgreSQL failover tests.
const (
	pgFailoverTestTimeout = 90 * time.Second
	// pgWorkloadBeforeKill and pgWorkloadAfterPromote are how long the
	// workload runs on each side of the failover.
	pgWorkloadBeforeKill   = 2 * time.Second
	pgWorkloadAfterPromote = 2 * time.Second
	// pgSettleWaitMax bounds how long ops still in flight at the end may
	// keep retrying their key before they count as unknown.
	pgSettleWaitMax = 15 * time.Second
	// pgReplicationWaitMax bounds the wait for the standby to stream.
	pgReplicationWaitMax = 30 * time.Second
	pgFailoverWorkers    = 6
	pgFailoverAccounts   = 8
)

// failoverResult is what one failover run measured.
type failoverResult struct {
	acked, ackedAfterPromote, unknown int
	lost                              []string // acknowledged keys missing on the new primary
	ackedLastSecond                   int      // acknowledged in the second before the kill
}

// A primary with a streaming standby under synchronous replication
// (synchronous_standby_names='*', synchronous_commit=on): tallyd, given
// both hosts with target_session_attrs=read-write, serves a charge workload;
// the primary is killed with SIGKILL mid-stream and the standby promoted.
// tallyd must reconnect to the new primary by itself, every acknowledged
// charge must be on it, and the books must balance.
func TestPostgresFailoverSynchronous(t *testing.T) {
	r := runPGFailover(t, true)
	if len(r.lost) > 0 {
		t.Errorf("synchronous replication lost %d acknowledged charges: %v", len(r.lost), r.lost[:min(len(r.lost), 10)])
	}
}

// The same with asynchronous replication. Losing acknowledged charges is
// what asynchronous replication allows; this run measures it and fails
// only if the run itself does not work.
func TestPostgresFailoverAsynchronous(t *testing.T) {
	r := runPGFailover(t, false)
	t.Logf("MEASUREMENT (asynchronous replication): %d of %d acknowledged charges lost in the failover (%d acknowledged in the last second before the kill)",
		len(r.lost), r.acked, r.ackedLastSecond)
}

func runPGFailover(t *testing.T, synchronous bool) failoverResult {
	ctx, cancel := context.WithTimeout(context.Background(), pgFailoverTestTimeout)
	defer cancel()
	dir := t.TempDir()
	primary, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Dir: filepath.Join(dir, "primary"),
		ExtraConf: map[string]string{"wal_level": "replica", "max_wal_senders": "5", "max_connections": "60"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = primary.Close() })
	pc := connect(t, ctx, primary.URL("postgres"))
	if _, err := pc.Exec(ctx, "CREATE DATABASE tally"); err != nil {
		t.Fatal(err)
	}
	if err := store.Migrate(ctx, primary.URL("tally")); err != nil {
		t.Fatal(err)
	}
	if err := primary.BaseBackup(ctx, filepath.Join(dir, "standby"), "-R"); err != nil {
		t.Fatal(err)
	}
	standby, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Dir: filepath.Join(dir, "standby"),
		ExtraConf: map[string]string{"max_connections": "60"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = standby.Close() })
	// Only now (the standby streams) may commits wait for it.
	wantState := "async"
	if synchronous {
		wantState = "sync"
		if _, err := pc.Exec(ctx, "ALTER SYSTEM SET synchronous_standby_names = '*'"); err != nil {
			t.Fatal(err)
		}
		if _, err := pc.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, ctx, pgReplicationWaitMax, "the standby to stream ("+wantState+")", func() bool {
		var st string
		err := pc.QueryRow(ctx, "SELECT sync_state FROM pg_stat_replication LIMIT 1").Scan(&st)
		return err == nil && st == wantState
	})
	pc.Close(ctx)

	// tallyd names both servers; pgx connects to the first that accepts
	// writes.
	url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/tally?sslmode=disable&target_session_attrs=read-write",
		primary.Port(), standby.Port())
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: url,
		ClientPolicy: client.Policy{CallTimeout: 3 * time.Second, RetryAttemptsMax: 1}})
	cl := env.Client
	accounts := make([]string, pgFailoverAccounts)
	for i := range accounts {
		a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "EUR", Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER,
			Floor: tallyv1.Floor_FLOOR_NON_NEGATIVE})
		if err != nil {
			t.Fatal(err)
		}
		accounts[i] = a.GetAccountId()
		if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: accounts[i], Amount: 1_000_000, IdempotencyKey: "fund-" + accounts[i]}); err != nil {
			t.Fatal(err)
		}
	}

	type ack struct {
		key string
		at  time.Time
	}
	var (
		stop       atomic.Bool
		mu         sync.Mutex
		acks       []ack
		unknown    []string
		finalErrs  []string
		wg         sync.WaitGroup
		promotedAt atomic.Int64
	)
	settleCtx, settleCancel := context.WithCancel(ctx)
	defer settleCancel()
	for w := range pgFailoverWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; !stop.Load(); n++ {
				key := fmt.Sprintf("w%d-%d", w, n)
				req := &tallyv1.ChargeRequest{AccountId: accounts[rand.IntN(len(accounts))], Amount: 1 + rand.Int64N(100), IdempotencyKey: key}
				// The retry contract: resend the same key until a
				// definite answer.
				for {
					_, err := cl.Charge(settleCtx, req)
					if err == nil {
						mu.Lock()
						acks = append(acks, ack{key, time.Now()})
						mu.Unlock()
						break
					}
					if retry, _ := client.Retryable(err); !retry || settleCtx.Err() != nil {
						mu.Lock()
						if settleCtx.Err() != nil {
							unknown = append(unknown, key)
						} else {
							finalErrs = append(finalErrs, key+": "+err.Error())
						}
						mu.Unlock()
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	stopAll := func() {
		stop.Store(true)
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(pgSettleWaitMax):
			settleCancel()
			<-done
		}
	}
	defer stopAll()

	time.Sleep(pgWorkloadBeforeKill)
	killedAt := time.Now()
	if err := primary.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	promotedAt.Store(time.Now().UnixNano())
	t.Logf("primary killed; standby promoted after %s", time.Since(killedAt).Round(time.Millisecond))
	time.Sleep(pgWorkloadAfterPromote)
	stopAll()

	var res failoverResult
	mu.Lock()
	defer mu.Unlock()
	res.acked, res.unknown = len(acks), len(unknown)
	for _, a := range acks {
		if a.at.UnixNano() > promotedAt.Load() {
			res.ackedAfterPromote++
		}
		if a.at.Before(killedAt) && killedAt.Sub(a.at) <= time.Second {
			res.ackedLastSecond++
		}
	}
	if len(finalErrs) > 0 {
		t.Errorf("%d charges got a final error (none expected: accounts are funded): %s", len(finalErrs), finalErrs[0])
	}
	if res.ackedAfterPromote == 0 {
		t.Fatalf("no charge acknowledged after the promotion: tallyd did not reconnect to the new primary")
	}

	// Every acknowledged key on the new primary (checked there directly).
	nc := connect(t, ctx, standby.URL("tally"))
	defer nc.Close(ctx)
	keys := make([]string, len(acks))
	for i, a := range acks {
		keys[i] = a.key
	}
	rows, err := nc.Query(ctx, `SELECT k FROM unnest($1::text[]) k
		WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys i WHERE i.idempotency_key = k AND i.transfer_id IS NOT NULL)`, keys)
	if err != nil {
		t.Fatal(err)
	}
	res.lost, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	var inRecovery bool
	if err := nc.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil || inRecovery {
		t.Fatalf("new primary in recovery=%v err=%v", inRecovery, err)
	}
	t.Logf("synchronous=%v: %d charges acknowledged (%d after the promotion, %d in the last second before the kill), %d unknown at the end, %d acknowledged but missing on the new primary",
		synchronous, res.acked, res.ackedAfterPromote, res.ackedLastSecond, res.unknown, len(res.lost))
	// Whatever was lost, what is there must add up.
	env.CheckBooks(t)
	checkNoDoubleApply(t, ctx, nc)
	return res
}

// checkNoDoubleApply asserts that no key produced two transfers and every
// stored outcome's transfer exists (keys applied at most once).
func checkNoDoubleApply(t *testing.T, ctx context.Context, c *pgx.Conn) {
	t.Helper()
	var dup, dangling int
	err := c.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM (SELECT scope, idempotency_key FROM transfers GROUP BY 1, 2 HAVING count(*) > 1) d),
		(SELECT count(*) FROM idempotency_keys k WHERE k.transfer_id IS NOT NULL
			AND NOT EXISTS (SELECT 1 FROM transfers x WHERE x.transfer_id = k.transfer_id))`).Scan(&dup, &dangling)
	if err != nil {
		t.Fatal(err)
	}
	if dup != 0 || dangling != 0 {
		t.Errorf("%d keys applied twice, %d key outcomes without their transfer", dup, dangling)
	}
}

func connect(t *testing.T, ctx context.Context, url string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
