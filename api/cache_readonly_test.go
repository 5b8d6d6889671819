package api_test

// A Redis turned read-only (issue 13, part 1): it still answers reads with
// the values it holds but refuses every update, so a commit whose cache
// write fails leaves the old balance in Redis. These tests check that no
// cached read answers that old balance after the commit was acknowledged
// (one tallyd), or later than about a second after it (a second tallyd that
// wrote nothing and learns of the read-only Redis from its own probe).

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

const (
	// readOnlyTTL is far longer than these tests, so that only the fix, not
	// the entries' expiry, can keep a stale balance from being served.
	readOnlyTTL = time.Minute
	// otherTallydBound is how long after a commit another tallyd may still
	// serve the balance it superseded: its probe interval (250 ms) plus the
	// op timeout, with slack for the race detector on a busy machine.
	otherTallydBound = time.Second
)

// readOnlyOptions runs the cache as tallyd does by default (5 failures to
// open the breaker, 5 s cooldown) with a generous op timeout: these tests
// are about a Redis that refuses writes, not a slow one.
func readOnlyOptions(prefix string) tallytest.Options {
	return tallytest.Options{KeyPrefix: prefix, CacheTTL: readOnlyTTL, CacheOpTimeout: time.Second}
}

// setReadOnly makes the private Redis a replica of a master that does not
// exist (it keeps its data and serves reads, but refuses writes with
// READONLY), or with on=false a writable primary again.
func setReadOnly(t *testing.T, admin *redis.Client, on bool) {
	t.Helper()
	ctx := ctxT(t)
	if !on {
		if err := admin.Do(ctx, "REPLICAOF", "NO", "ONE").Err(); err != nil {
			t.Fatal(err)
		}
		return
	}
	port, err := localsvc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.Do(ctx, "REPLICAOF", "127.0.0.1", strconv.Itoa(port)).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "REPLICAOF", "NO", "ONE") })
	if err := admin.Set(ctx, "tally-readonly-check", "x", 0).Err(); err == nil || !strings.Contains(err.Error(), "READONLY") {
		t.Fatalf("redis is not read-only: %v", err)
	}
}

func cachedRead(t *testing.T, env *tallytest.Env, acct string) *tallyv1.Balance {
	t.Helper()
	got, err := env.Raw.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: cached})
	if err != nil {
		t.Fatalf("GetBalance %s: %v", acct, err)
	}
	return got
}

// waitFromCache reads acct until a read is served from the cache, within
// limit; every read on the way must answer want.
func waitFromCache(t *testing.T, env *tallytest.Env, acct string, want int64, limit time.Duration, when string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		got := cachedRead(t, env, acct)
		if got.GetBalance() != want {
			t.Fatalf("%s: cached read answered %d (v%d, from %v), want %d", when, got.GetBalance(), got.GetVersion(), got.GetSource(), want)
		}
		if got.GetSource() == fromCache {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not served from the cache within %v (cache status %+v)", when, limit, env.Cache.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func charge30(t *testing.T, env *tallytest.Env, acct string) *tallyv1.TransferResult {
	t.Helper()
	r, err := env.Raw.Charge(ctxT(t), &tallyv1.ChargeRequest{AccountId: acct, Amount: 30, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatalf("charge with Redis read-only: %v", err)
	}
	if r.GetBalance().GetBalance() != 70 {
		t.Fatalf("charge answered balance %d, want 70", r.GetBalance().GetBalance())
	}
	return r
}

// One tallyd: once the charge is acknowledged, every cached read answers
// 70, although Redis still holds 100 and the breaker (5 consecutive
// failures) is far from open; healed, the cache serves again.
func TestReadOnlyRedisNeverServesStaleBalance(t *testing.T) {
	r := privateRedis(t)
	env := cacheEnv(t, r.URL(), readOnlyOptions(""))
	acct := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, acct, 100)
	waitFromCache(t, env, acct, 100, 10*time.Second, "before the fault")

	admin := redisAdmin(t, r.Addr())
	setReadOnly(t, admin, true)
	res := charge30(t, env, acct)
	if v, err := admin.Get(ctxT(t), env.KeyPrefix+acct).Result(); err != nil || !strings.Contains(v, "|100|") {
		t.Fatalf("redis holds %q (%v), want the stale balance 100 still there", v, err)
	}
	reads := 0
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); reads++ {
		got := cachedRead(t, env, acct)
		if got.GetBalance() != 70 || got.GetVersion() != res.GetBalance().GetVersion() {
			t.Fatalf("read %d after the charge was acknowledged: balance %d v%d from %v, want 70 v%d (cache status %+v)",
				reads, got.GetBalance(), got.GetVersion(), got.GetSource(), res.GetBalance().GetVersion(), env.Cache.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	st := env.Cache.Status()
	if st.State != cache.StateDegraded || !strings.Contains(st.Detail, "not serving") || !strings.Contains(st.Detail, "READONLY") {
		t.Fatalf("cache status %+v with Redis read-only, want degraded, not serving, READONLY", st)
	}
	t.Logf("%d reads with Redis read-only, all 70; status: %s", reads, st.Detail)

	setReadOnly(t, admin, false)
	waitFromCache(t, env, acct, 70, 10*time.Second, "after REPLICAOF NO ONE")
	if st := env.Cache.Status(); st.State != cache.StateOK {
		t.Fatalf("cache status %+v after healing, want ok", st)
	}
}

// Two tallyds on one database and one Redis: the charge goes through A,
// whose cache write fails; B wrote nothing, yet answers 70 within
// otherTallydBound of the acknowledgement and never 100 after that,
// before or after Redis is healed.
func TestReadOnlyRedisTwoTallyds(t *testing.T) {
	r := privateRedis(t)
	prefix := "tallytest:" + tallytest.RandomSuffix() + ":"
	a := cacheEnv(t, r.URL(), readOnlyOptions(prefix))
	b := cacheEnv(t, r.URL(), readOnlyOptions(prefix))
	acct := createAccount(t, a, newCurrency()).GetAccountId()
	credit(t, a, acct, 100)
	waitFromCache(t, a, acct, 100, 10*time.Second, "A before the fault")
	waitFromCache(t, b, acct, 100, 10*time.Second, "B before the fault")

	admin := redisAdmin(t, r.Addr())
	setReadOnly(t, admin, true)
	charge30(t, a, acct)
	acked := time.Now()
	var first70 time.Time
	stale := 0
	for time.Since(acked) < otherTallydBound+2*time.Second {
		start := time.Now()
		got := cachedRead(t, b, acct)
		switch got.GetBalance() {
		case 70:
			if first70.IsZero() {
				first70 = start
			}
		case 100:
			stale++
			if !first70.IsZero() {
				t.Fatalf("B answered 100 (from %v) %v after the charge, after it had answered 70", got.GetSource(), start.Sub(acked))
			}
			if start.Sub(acked) > otherTallydBound {
				t.Fatalf("B still answered 100 (from %v) %v after A's charge was acknowledged, want 70 within %v (B's cache status %+v)",
					got.GetSource(), start.Sub(acked), otherTallydBound, b.Cache.Status())
			}
		default:
			t.Fatalf("B answered %d, want 100 or 70", got.GetBalance())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("B answered 100 %d times, first answered 70 %v after the charge was acknowledged", stale, first70.Sub(acked))
	if got := cachedRead(t, a, acct); got.GetBalance() != 70 {
		t.Fatalf("A answered %d, want 70", got.GetBalance())
	}
	if st := b.Cache.Status(); !strings.Contains(st.Detail, "not serving") || !strings.Contains(st.Detail, "READONLY") {
		t.Fatalf("B's cache status %+v, want not serving with READONLY", st)
	}

	// Healed: Redis still holds 100 until the entry is deleted (A's probe)
	// or refused (both tallyds refuse entries stored before they reopened),
	// so neither may answer 100 on the way back to the cache.
	setReadOnly(t, admin, false)
	waitFromCache(t, b, acct, 70, 10*time.Second, "B after REPLICAOF NO ONE")
	waitFromCache(t, a, acct, 70, 10*time.Second, "A after REPLICAOF NO ONE")
}
