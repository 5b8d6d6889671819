package api_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// privatePostgres starts a throwaway PostgreSQL owned by the test (never the
// shared one: this test restarts it) and migrates it.
func privatePostgres(t *testing.T) (*localsvc.Postgres, string) {
	t.Helper()
	if _, err := localsvc.FindPostgresBin("postgres"); err != nil {
		t.Skipf("PostgreSQL server binaries not installed: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{})
	if err != nil {
		t.Fatalf("start private postgres: %v", err)
	}
	t.Cleanup(func() { _ = pg.Close() })
	url := pg.URL("postgres")
	if err := store.Migrate(ctx, url); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	return pg, url
}

// keyLog records every idempotency key a test sent and what came back.
type keyLog struct {
	mu       sync.Mutex
	amount   map[string]int64  // key → amount, recorded before the first send
	transfer map[string]string // key → transfer id acknowledged
	failures []string
	acks     atomic.Int64
}

func newKeyLog() *keyLog {
	return &keyLog{amount: map[string]int64{}, transfer: map[string]string{}}
}

func (k *keyLog) issue(key string, amount int64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.amount[key] = amount
}

func (k *keyLog) ack(key, transferID string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.transfer[key] = transferID
	k.acks.Add(1)
}

func (k *keyLog) fail(format string, args ...any) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.failures = append(k.failures, fmt.Sprintf(format, args...))
}

// waitAcks waits until at least n charges have been acknowledged in total.
func (k *keyLog) waitAcks(t *testing.T, n int64, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for k.acks.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d charges acknowledged within %v; failures: %v", k.acks.Load(), n, limit, k.failures)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPostgresRestartDuringCharges restarts PostgreSQL (fast, then
// immediate) under a stream of charges. Calls caught by a restart fail with
// UNAVAILABLE (never INTERNAL or UNKNOWN), the server recovers by itself, and
// retrying every key until it is acknowledged applies each key exactly once.
func TestPostgresRestartDuringCharges(t *testing.T) {
	tStart := time.Now()
	pg, url := privatePostgres(t)
	t.Logf("private postgres up and migrated in %v", time.Since(tStart))
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: url, ClientPolicy: client.Policy{
		CallTimeout: 5 * time.Second, RetryAttemptsMax: 40, BackoffBase: 20 * time.Millisecond, BackoffMax: 250 * time.Millisecond,
	}})
	cur := newCurrency()
	acct := createAccount(t, env, cur).GetAccountId()
	credit(t, env, acct, initialFunds)

	keys := newKeyLog()
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	var wg sync.WaitGroup
	// abort ends every call at once if the test fails half way.
	abortCtx, abort := context.WithCancel(context.Background())
	var stopOnce sync.Once
	t.Cleanup(func() {
		abort()
		stopOnce.Do(func() { close(stop) })
		wg.Wait()
	})
	// Writers: the retrying client, resending each key until it has a
	// definite answer. A key is finished before a writer stops.
	for range 3 {
		wg.Go(func() {
			for i := 0; i < 2000 && !stopped(); i++ {
				req := &tallyv1.ChargeRequest{AccountId: acct, Amount: 1 + rand.Int64N(9), IdempotencyKey: client.NewIdempotencyKey()}
				keys.issue(req.IdempotencyKey, req.Amount)
				deadline := time.Now().Add(60 * time.Second)
				for {
					r, err := env.Client.Charge(abortCtx, req)
					if err == nil {
						keys.ack(req.IdempotencyKey, r.GetTransfer().GetTransferId())
						break
					}
					if retry, _ := client.Retryable(err); !retry || time.Now().After(deadline) {
						keys.fail("charge %s: %v", req.IdempotencyKey, err)
						break
					}
				}
			}
		})
	}
	// Probe: the raw client, so every attempt's code is seen. It also
	// resends its key until acknowledged.
	var phase atomic.Int32 // 0 before, 1 during/after the fast restart, 2 during/after the immediate one
	var unavailable [3]atomic.Int32
	wg.Go(func() {
		for i := 0; i < 5000 && !stopped(); i++ {
			req := &tallyv1.ChargeRequest{AccountId: acct, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()}
			keys.issue(req.IdempotencyKey, req.Amount)
			deadline := time.Now().Add(60 * time.Second)
			for {
				ctx, cancel := context.WithTimeout(abortCtx, 10*time.Second)
				r, err := env.Raw.Charge(ctx, req)
				cancel()
				if err == nil {
					keys.ack(req.IdempotencyKey, r.GetTransfer().GetTransferId())
					break
				}
				if abortCtx.Err() != nil {
					break
				}
				if status.Code(err) != codes.Unavailable {
					keys.fail("probe charge: got %v, want OK or UNAVAILABLE", err)
				} else if info, ok := api.ErrorInfo(err); !ok || info.GetDomain() != api.ErrorDomain {
					keys.fail("probe charge: UNAVAILABLE without Tally's ErrorInfo (%v): not the server's answer", err)
				} else {
					unavailable[phase.Load()].Add(1)
				}
				if time.Now().After(deadline) {
					keys.fail("probe charge %s: no answer within a minute: %v", req.IdempotencyKey, err)
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(5 * time.Millisecond)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	keys.waitAcks(t, 30, 30*time.Second)
	t.Logf("first 30 acks after %v", time.Since(t0))
	for i, mode := range []string{"fast", "immediate"} {
		phase.Store(int32(i + 1))
		before := keys.acks.Load()
		if err := pg.Restart(ctx, mode); err != nil {
			t.Fatalf("restart postgres (%s): %v", mode, err)
		}
		t.Logf("%s restart done after %v", mode, time.Since(t0))
		// The same server, not restarted, takes charges again.
		keys.waitAcks(t, before+30, 30*time.Second)
		t.Logf("30 more acks after %v", time.Since(t0))
	}
	stopOnce.Do(func() { close(stop) })
	wg.Wait()

	if len(keys.failures) > 0 {
		t.Fatalf("%d failures; first: %s", len(keys.failures), strings.Join(keys.failures[:min(5, len(keys.failures))], "; "))
	}
	for i, mode := range []string{"fast", "immediate"} {
		if unavailable[i+1].Load() == 0 {
			t.Fatalf("the probe never saw UNAVAILABLE across the %s restart: the restart was not observed", mode)
		}
	}
	t.Logf("%d charges; probe saw UNAVAILABLE %d times (fast restart) and %d times (immediate restart)",
		len(keys.amount), unavailable[1].Load(), unavailable[2].Load())
	checkKeysOnce(t, env, keys, acct)
}

// checkKeysOnce asserts that every key sent was applied exactly once with
// its amount, that each acknowledged transfer is the one stored, and that the
// account's balance is exactly its credit minus the charges.
func checkKeysOnce(t *testing.T, env *tallytest.Env, keys *keyLog, acct string) {
	t.Helper()
	ctx := ctxT(t)
	var all []string
	var sum int64
	for k, a := range keys.amount {
		all = append(all, k)
		sum += a
	}
	if len(keys.transfer) != len(all) {
		t.Fatalf("%d of %d keys acknowledged", len(keys.transfer), len(all))
	}
	rows, err := env.Store.Pool().Query(ctx,
		`SELECT idempotency_key, transfer_id::text, amount FROM transfers WHERE idempotency_key = ANY($1)`, all)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for rows.Next() {
		var k, id string
		var amount int64
		if err := rows.Scan(&k, &id, &amount); err != nil {
			t.Fatal(err)
		}
		seen[k]++
		if amount != keys.amount[k] || id != keys.transfer[k] {
			t.Fatalf("key %s: stored transfer %s of %d, acknowledged %s of %d", k, id, amount, keys.transfer[k], keys.amount[k])
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range all {
		if seen[k] != 1 {
			t.Fatalf("key %s applied %d times, want exactly once", k, seen[k])
		}
	}
	b := strongBalance(t, env, acct)
	if want := int64(initialFunds) - sum; b.GetBalance() != want || b.GetVersion() != int64(len(all))+1 {
		t.Fatalf("balance %d at v%d, want %d at v%d", b.GetBalance(), b.GetVersion(), want, len(all)+1)
	}
	env.CheckBooks(t)
}
