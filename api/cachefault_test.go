package api_test

// Cache faults, end to end: the real gRPC server over real PostgreSQL and a
// real Redis that is flushed, killed, slowed, blackholed, made read-only, or
// fed garbage and stale values. Every test checks that writes are unaffected
// and that every balance read keeps the cache's promise:
//
//   - a read returns a (version, balance) pair that really existed (the
//     entries table has balance_after at version_after == version);
//   - a cached read is at most the cache TTL old: the write that superseded
//     the pair was acknowledged no more than TTL before the read started;
//   - a STRONG read is never older than a write acknowledged before it
//     started, and a min_version read is never older than min_version.
//
// Faults that would hurt the shared Redis (flush, kill, slow, read-only) run
// against a private redis-server started for the test.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/faultproxy"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

const (
	cached = tallyv1.Consistency_CONSISTENCY_CACHED
	strong = tallyv1.Consistency_CONSISTENCY_STRONG
	// sickReadMax bounds one balance read while Redis is dead, slow or
	// blackholed. The cache op timeout is 50ms and a slowed Redis round trip
	// is at least 600ms, so a read that waited for Redis would exceed it; the
	// rest is slack for the race detector on a busy 2-core machine.
	sickReadMax = 500 * time.Millisecond
	// opTimeout is the cache op timeout used by these tests.
	opTimeout = 50 * time.Millisecond
	// initialFunds is what each test account is credited with first.
	initialFunds = 1_000_000
)

var (
	fromCache = tallyv1.BalanceSource_BALANCE_SOURCE_CACHE
	fromStore = tallyv1.BalanceSource_BALANCE_SOURCE_STORE
)

// privateRedis starts a redis-server owned by the test on a free port.
func privateRedis(t *testing.T) *localsvc.Redis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not on PATH")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := localsvc.StartRedis(ctx, localsvc.RedisOptions{})
	if err != nil {
		t.Fatalf("start private redis: %v", err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

// redisAdmin is a plain client on a Redis, outside Tally's cache and breaker.
func redisAdmin(t *testing.T, addr string) *redis.Client {
	t.Helper()
	rc := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	t.Cleanup(func() { _ = rc.Close() })
	return rc
}

// cacheEnv starts Tally on the package database with the cache on redisURL.
func cacheEnv(t *testing.T, redisURL string, o tallytest.Options) *tallytest.Env {
	t.Helper()
	o.DatabaseURL = dbURL
	o.RedisURL = redisURL
	return tallytest.Start(t, o)
}

func healthClient(t *testing.T, addr string) healthpb.HealthClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return healthpb.NewHealthClient(conn)
}

// wantServing asserts grpc.health.v1 reports the server SERVING.
func wantServing(t *testing.T, hc healthpb.HealthClient, when string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("grpc health %s: %v %v, want SERVING", when, resp.GetStatus(), err)
	}
}

// readRec is one balance read and what the test knew when it started.
type readRec struct {
	acct        string
	start       time.Time
	consistency tallyv1.Consistency
	minVersion  int64
	ackedBefore int64 // highest version of acct acknowledged before the read started
	got         *tallyv1.Balance
}

// books tracks what the test wrote and read, to check the promise afterwards.
// All writes to its accounts are made through it, so it knows every version.
type books struct {
	t   *testing.T
	env *tallytest.Env
	ttl time.Duration

	accts []string

	mu       sync.Mutex
	ackAt    map[string]map[int64]time.Time // account → version → when its write was acknowledged
	maxAcked map[string]int64
	want     map[string]int64 // expected balance
	writes   map[string]int64 // acknowledged writes (the expected version)
	reads    []readRec
	failures []string
}

// newBooks creates n accounts in a fresh currency and funds them.
func newBooks(t *testing.T, env *tallytest.Env, ttl time.Duration, n int) *books {
	t.Helper()
	b := &books{t: t, env: env, ttl: ttl,
		ackAt: map[string]map[int64]time.Time{}, maxAcked: map[string]int64{}, want: map[string]int64{}, writes: map[string]int64{}}
	cur := newCurrency()
	for range n {
		a := createAccount(t, env, cur).GetAccountId()
		b.accts = append(b.accts, a)
		b.ackAt[a] = map[int64]time.Time{}
	}
	for _, a := range b.accts {
		r := credit(t, env, a, initialFunds)
		b.ack(a, r, initialFunds)
	}
	return b
}

func (b *books) ack(acct string, r *tallyv1.TransferResult, delta int64) {
	now := time.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	v := r.GetBalance().GetVersion()
	b.ackAt[acct][v] = now
	b.maxAcked[acct] = max(b.maxAcked[acct], v)
	b.want[acct] += delta
	b.writes[acct]++
}

func (b *books) fail(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failures = append(b.failures, fmt.Sprintf(format, args...))
}

// acked is the highest version of acct acknowledged so far.
func (b *books) acked(acct string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.maxAcked[acct]
}

// charge charges acct through the raw client (no retries, so any error
// shows); a failure is recorded and fails the test at check time.
func (b *books) charge(acct string, amount int64) (*tallyv1.TransferResult, time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	r, err := b.env.Raw.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
	el := time.Since(start)
	if err != nil {
		b.fail("charge %s: %v", acct, err)
		return nil, el
	}
	b.ack(acct, r, -amount)
	return r, el
}

// read reads a balance through the raw client and records it.
func (b *books) read(acct string, c tallyv1.Consistency, minVersion int64) (*tallyv1.Balance, time.Duration, error) {
	rec := readRec{acct: acct, consistency: c, minVersion: minVersion, ackedBefore: b.acked(acct)}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rec.start = time.Now()
	got, err := b.env.Raw.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: c, MinVersion: minVersion})
	el := time.Since(rec.start)
	if err != nil {
		b.fail("read %s (%v, min_version %d): %v", acct, c, minVersion, err)
		return nil, el, err
	}
	rec.got = got
	b.mu.Lock()
	b.reads = append(b.reads, rec)
	b.mu.Unlock()
	return got, el, nil
}

// mustRead is read that fails the test at once on an error.
func (b *books) mustRead(acct string, c tallyv1.Consistency, minVersion int64) (*tallyv1.Balance, time.Duration) {
	b.t.Helper()
	got, el, err := b.read(acct, c, minVersion)
	if err != nil {
		b.t.Fatalf("GetBalance %s: %v", acct, err)
	}
	return got, el
}

// readFromCacheSoon reads acct (CACHED) until the read comes from the cache
// or a second has passed, and returns the last read: the cache refresh of
// a write follows its answer within moments.
func (b *books) readFromCacheSoon(acct string) *tallyv1.Balance {
	b.t.Helper()
	deadline := time.Now().Add(time.Second)
	for {
		got, _ := b.mustRead(acct, tallyv1.Consistency_CONSISTENCY_CACHED, 0)
		if got.GetSource() == tallyv1.BalanceSource_BALANCE_SOURCE_CACHE || time.Now().After(deadline) {
			return got
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// warm charges each account and reads it until the read is a cache hit at
// the current version, proving the cache is in use before a fault.
func (b *books) warm() {
	b.t.Helper()
	for _, a := range b.accts {
		ok := false
		// Patient: on a loaded machine a 50ms cache op can time out, and
		// then the breaker needs its cooldown.
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
			b.charge(a, 1)
			got, _ := b.mustRead(a, cached, 0)
			if got.GetSource() == fromCache && got.GetVersion() == b.acked(a) {
				ok = true
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if !ok {
			b.t.Fatalf("account %s: no cache hit at the current version before the fault (cache status %+v)", a, b.env.Cache.Status())
		}
	}
}

// backToCache charges and reads until every account is served from the cache
// again at its current version, within limit. Every read must succeed.
func (b *books) backToCache(limit time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(limit)
	for _, a := range b.accts {
		for {
			b.charge(a, 1)
			got, _ := b.mustRead(a, cached, 0)
			if got.GetSource() == fromCache && got.GetVersion() == b.acked(a) {
				break
			}
			if time.Now().After(deadline) {
				b.t.Fatalf("account %s: not served from the cache again within %v (last %v, cache status %+v)",
					a, limit, got, b.env.Cache.Status())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// sources counts the cached reads served by each source.
func (b *books) sources() (fromCacheN, fromStoreN int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range b.reads {
		if r.consistency != cached || r.minVersion != 0 {
			continue
		}
		if r.got.GetSource() == fromCache {
			fromCacheN++
		} else {
			fromStoreN++
		}
	}
	return
}

// ageSlack absorbs the gap between a pair's PostgreSQL read time and the
// commit of a concurrent newer version (microseconds in practice).
const ageSlack = 50 * time.Millisecond

// check asserts that no write failed, every recorded read kept the promise,
// every account's final balance and version are exactly what the
// acknowledged writes imply (so no write was lost or applied twice), and the
// books balance.
func (b *books) check() {
	t := b.t
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if n := len(b.failures); n > 0 {
		t.Fatalf("%d calls failed; first ones: %s", n, strings.Join(b.failures[:min(n, 5)], "; "))
	}
	ctx := ctxT(t)
	rows, err := b.env.Store.Pool().Query(ctx,
		`SELECT account_id::text, version_after, balance_after FROM entries WHERE account_id = ANY($1::uuid[])`, b.accts)
	if err != nil {
		t.Fatal(err)
	}
	pairs := map[string]map[int64]int64{}
	for rows.Next() {
		var a string
		var v, bal int64
		if err := rows.Scan(&a, &v, &bal); err != nil {
			t.Fatal(err)
		}
		if pairs[a] == nil {
			pairs[a] = map[int64]int64{}
		}
		pairs[a][v] = bal
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	var bad []string
	for _, r := range b.reads {
		g := r.got
		v, bal := g.GetVersion(), g.GetBalance()
		desc := fmt.Sprintf("read of %s (%v, min_version %d, started %s) got v%d balance %d from %v",
			r.acct, r.consistency, r.minVersion, r.start.Format("15:04:05.000"), v, bal, g.GetSource())
		if want, ok := pairs[r.acct][v]; g.GetAccountId() != r.acct || (v == 0 && bal != 0) || (v != 0 && (!ok || want != bal)) {
			bad = append(bad, desc+": this pair never existed")
		}
		if v < r.minVersion {
			bad = append(bad, desc+": older than min_version")
		}
		if r.consistency == strong && (g.GetSource() != fromStore || v < r.ackedBefore) {
			bad = append(bad, fmt.Sprintf("%s: a STRONG read older than v%d acknowledged before it", desc, r.ackedBefore))
		}
		if g.GetSource() == fromCache {
			if next, ok := b.ackAt[r.acct][v+1]; ok && r.start.Sub(next) > b.ttl+ageSlack {
				bad = append(bad, fmt.Sprintf("%s: stale for %v, more than the cache TTL %v", desc, r.start.Sub(next), b.ttl))
			}
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%d of %d reads broke the cache promise:\n%s", len(bad), len(b.reads), strings.Join(bad[:min(len(bad), 10)], "\n"))
	}
	for _, a := range b.accts {
		got, err := b.env.Raw.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a, Consistency: strong})
		if err != nil {
			t.Fatal(err)
		}
		if got.GetBalance() != b.want[a] || got.GetVersion() != b.writes[a] || int64(len(pairs[a])) != b.writes[a] {
			t.Fatalf("account %s: balance %d at v%d with %d entries; want %d at v%d after %d acknowledged writes",
				a, got.GetBalance(), got.GetVersion(), len(pairs[a]), b.want[a], b.writes[a], b.writes[a])
		}
	}
	b.env.CheckBooks(t)
}

// fault is something done to Redis at an offset into a workload.
type fault struct {
	at time.Duration
	do func()
}

// workload runs writers charging and readers reading the accounts (mostly
// cached reads, some STRONG, some with min_version = the last acknowledged
// version) for dur, doing each fault at its offset.
func (b *books) workload(dur time.Duration, writers, readers int, faults []fault) {
	b.t.Helper()
	start := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range writers {
		wg.Go(func() {
			for i := 0; i < 5000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				b.charge(b.accts[rand.IntN(len(b.accts))], 1+rand.Int64N(9))
				time.Sleep(time.Millisecond)
			}
		})
	}
	for range readers {
		wg.Go(func() {
			for i := 0; i < 5000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				a := b.accts[rand.IntN(len(b.accts))]
				switch i % 6 {
				case 0:
					_, _, _ = b.read(a, strong, 0)
				case 1:
					_, _, _ = b.read(a, cached, b.acked(a))
				default:
					_, _, _ = b.read(a, cached, 0)
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	for _, f := range faults {
		time.Sleep(time.Until(start.Add(f.at)))
		f.do()
	}
	time.Sleep(time.Until(start.Add(dur)))
	close(stop)
	wg.Wait()
}

// FLUSHALL in the middle of a concurrent workload: charges keep succeeding,
// reads keep the promise, and the cache refills afterwards.
func TestCacheFlushAllDuringWorkload(t *testing.T) {
	r := privateRedis(t)
	const ttl = time.Second // short, so the age bound is really exercised
	// A generous op timeout: this test is about a flush, not a slow Redis.
	env := cacheEnv(t, r.URL(), tallytest.Options{CacheTTL: ttl, CacheOpTimeout: time.Second, BreakerCooldown: 500 * time.Millisecond})
	admin := redisAdmin(t, r.Addr())
	b := newBooks(t, env, ttl, 3)
	b.warm()

	flushes := 0
	flush := func() {
		if err := admin.FlushAll(context.Background()).Err(); err != nil {
			t.Errorf("FLUSHALL: %v", err)
			return
		}
		flushes++
	}
	b.workload(2400*time.Millisecond, 3, 3, []fault{{600 * time.Millisecond, flush}, {1200 * time.Millisecond, flush}, {1800 * time.Millisecond, flush}})
	if flushes != 3 {
		t.Fatalf("%d flushes done, want 3", flushes)
	}
	hits, misses := b.sources()
	t.Logf("cached reads: %d from cache, %d from store", hits, misses)
	if hits == 0 || misses == 0 {
		t.Fatalf("cached reads: %d hits, %d misses; a flushed cache under load should show both", hits, misses)
	}
	// Refills: after the last flush every account is served from the cache again.
	b.backToCache(10 * time.Second)
	if st := env.Cache.Status(); st.State != cache.StateOK {
		t.Fatalf("cache status %+v after FLUSHALL, want ok (a flush is not a failure)", st)
	}
	b.check()
}

// Redis killed: reads come from PostgreSQL within a bound, writes succeed,
// the cache reports degraded while grpc health stays SERVING; Redis back
// (empty) and the breaker cooldown over, reads return to the cache.
func TestCacheRedisStopped(t *testing.T) {
	r := privateRedis(t)
	const cooldown = time.Second
	const ttl = 10 * time.Second
	env := cacheEnv(t, r.URL(), tallytest.Options{CacheTTL: ttl, CacheOpTimeout: opTimeout, FailuresMax: 3, BreakerCooldown: cooldown})
	hc := healthClient(t, env.Addr)
	b := newBooks(t, env, ttl, 2)
	b.warm()
	if st := env.Cache.Status(); st.State != cache.StateOK {
		t.Fatalf("cache status %+v with Redis up, want ok", st)
	}
	wantServing(t, hc, "with Redis up")

	if err := r.Kill(); err != nil {
		t.Fatal(err)
	}
	var slowest time.Duration
	for i := range 30 {
		a := b.accts[i%2]
		b.charge(a, 1)
		got, el := b.mustRead(a, cached, 0)
		slowest = max(slowest, el)
		if got.GetSource() != fromStore || got.GetVersion() != b.acked(a) {
			t.Fatalf("read %d with Redis dead: %v, want the current version v%d from the store", i, got, b.acked(a))
		}
		if el > sickReadMax {
			t.Fatalf("read %d with Redis dead took %v, want < %v", i, el, sickReadMax)
		}
	}
	t.Logf("slowest read with Redis dead: %v", slowest)
	if st := env.Cache.Status(); st.State != cache.StateDegraded {
		t.Fatalf("cache status %+v with Redis dead, want degraded", st)
	}
	wantServing(t, hc, "with Redis dead")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	b.backToCache(cooldown + 10*time.Second)
	if st := env.Cache.Status(); st.State != cache.StateOK {
		t.Fatalf("cache status %+v after Redis came back, want ok", st)
	}
	wantServing(t, hc, "after Redis came back")
	b.check()
}

// Redis slow (300ms each way) and then blackholed, behind a fault proxy:
// every read still answers within a bound set by the 50ms cache op timeout
// (a read that waited for Redis would take over 600ms), from PostgreSQL, and
// writes are unaffected. After healing, reads return to the cache.
func TestCacheRedisSlowAndBlackholed(t *testing.T) {
	r := privateRedis(t)
	p, err := faultproxy.New("127.0.0.1:0", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	const cooldown = 500 * time.Millisecond
	const ttl = 10 * time.Second
	env := cacheEnv(t, "redis://"+p.Addr()+"/0", tallytest.Options{CacheTTL: ttl, CacheOpTimeout: opTimeout, FailuresMax: 3, BreakerCooldown: cooldown})
	b := newBooks(t, env, ttl, 2)
	b.warm()

	for _, f := range []struct {
		name string
		do   func()
	}{
		{"latency 300ms", func() { p.SetLatency(300 * time.Millisecond) }},
		{"blackhole", p.Blackhole},
	} {
		f.do()
		// Long enough for the breaker to open and then probe the sick Redis
		// again after its cooldown.
		phaseEnd := time.Now().Add(2*cooldown + 300*time.Millisecond)
		var slowestRead, slowestWrite time.Duration
		for i := 0; time.Now().Before(phaseEnd) && i < 200; i++ {
			a := b.accts[i%2]
			_, wel := b.charge(a, 1)
			got, el := b.mustRead(a, cached, 0)
			slowestRead, slowestWrite = max(slowestRead, el), max(slowestWrite, wel)
			if got.GetSource() != fromStore || got.GetVersion() != b.acked(a) {
				t.Fatalf("%s: read %d got %v, want the current version v%d from the store", f.name, i, got, b.acked(a))
			}
			if el > sickReadMax {
				t.Fatalf("%s: read %d took %v, want < %v", f.name, i, el, sickReadMax)
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%s: slowest read %v, slowest charge %v", f.name, slowestRead, slowestWrite)
		if st := env.Cache.Status(); st.State != cache.StateDegraded {
			t.Fatalf("%s: cache status %+v, want degraded", f.name, st)
		}
		p.Heal()
		b.backToCache(cooldown + 10*time.Second)
	}
	b.check()
}

// Redis turned read-only (a replica of a master that does not exist): it
// still holds and serves the old values but refuses every cache update.
// From the first failed update on, reads come from PostgreSQL with the
// current values, not the stale ones still in Redis, also after the
// breaker's cooldown and past the stale value's TTL; healed with REPLICAOF
// NO ONE, reads return to the cache.
//
// This test once charged twice before reading (four failed updates against
// FailuresMax 3, so the breaker was surely open) and then allowed stale
// hits "within the TTL" after the cooldown: it never tried the case where
// one failed update is followed by successful reads, which reset the
// breaker's count, and kept serving the stale balance (issue 13).
func TestCacheRedisReadOnly(t *testing.T) {
	r := privateRedis(t)
	const ttl = 3 * time.Second
	const cooldown = 1500 * time.Millisecond
	env := cacheEnv(t, r.URL(), tallytest.Options{CacheTTL: ttl, CacheOpTimeout: opTimeout, FailuresMax: 3, BreakerCooldown: cooldown})
	b := newBooks(t, env, ttl, 1)
	a := b.accts[0]
	b.warm()
	admin := redisAdmin(t, r.Addr())
	ctx := ctxT(t)
	key := env.KeyPrefix + a
	stale, err := admin.Get(ctx, key).Result()
	if err != nil || !strings.HasPrefix(stale, fmt.Sprintf("v2|%d|", b.acked(a))) {
		t.Fatalf("cached value %q (%v), want the current version v%d", stale, err, b.acked(a))
	}

	port, err := localsvc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.Do(ctx, "REPLICAOF", "127.0.0.1", strconv.Itoa(port)).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "REPLICAOF", "NO", "ONE") })
	if err := admin.Set(ctx, "tally-probe", "x", 0).Err(); err == nil || !strings.Contains(err.Error(), "READONLY") {
		t.Fatalf("redis is not read-only: %v", err)
	}

	// One charge: it succeeds, its cache updates fail, and the very next
	// read must already be the current version.
	b.charge(a, 1)
	openedBy := time.Now()
	// The refresh runs after the answer (ledger's post-commit pipeline):
	// until it has failed, this process reads the account from
	// PostgreSQL; the status says why within moments.
	deadline := time.Now().Add(time.Second)
	for st := env.Cache.Status(); !strings.Contains(st.Detail, "not serving") || !strings.Contains(st.Detail, "READONLY"); st = env.Cache.Status() {
		if time.Now().After(deadline) {
			t.Fatalf("cache status %+v a second after a failed cache update, want not serving with READONLY", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if v, err := admin.Get(ctx, key).Result(); err != nil || v != stale {
		t.Fatalf("redis holds %q (%v), want the stale %q still there", v, err, stale)
	}
	for i := range 5 {
		got, _ := b.mustRead(a, cached, 0)
		if got.GetSource() != fromStore || got.GetVersion() != b.acked(a) {
			t.Fatalf("read %d after a failed cache update got %v, want the current v%d from the store (stale in Redis: %q)", i, got, b.acked(a), stale)
		}
		b.charge(a, 1)
	}

	// Still read-only past the cooldown and past the TTL of the stale value:
	// a read is never the probe, and no read serves the stale value.
	var reads, hits, staleHits int
	for i := 0; time.Since(openedBy) < ttl+500*time.Millisecond && i < 200; i++ {
		if i%3 == 0 {
			b.charge(a, 1)
		} else {
			got, _ := b.mustRead(a, cached, 0)
			reads++
			if got.GetSource() == fromCache {
				hits++
				if got.GetVersion() < b.acked(a) {
					staleHits++
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("read-only Redis after the cooldown: %d reads, %d from the cache, %d of them stale", reads, hits, staleHits)
	if hits > 0 {
		t.Fatalf("%d of %d reads with Redis read-only came from the cache (%d stale), want none", hits, reads, staleHits)
	}

	if err := admin.Do(ctx, "REPLICAOF", "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
	b.backToCache(cooldown + 10*time.Second)
	b.check()
}

// cacheValue renders a pair in the cache's value format
// (v1|version|balance|credit_limit|available|currency|asof_unix_nanos).
func cacheValue(version, balance int64, currency string, asOf time.Time) string {
	return fmt.Sprintf("v2|%d|%d|0|%d|%s|%d|0|0", version, balance, balance, currency, asOf.UnixNano())
}

// A garbage value planted at an account's key is a miss: the read comes from
// PostgreSQL with the right balance, and the garbage is replaced (by the read
// or by the next write) so the cache serves again.
func TestCacheGarbageValueIsMiss(t *testing.T) {
	t.Parallel()
	const ttl = 30 * time.Second
	// A generous op timeout: this test is about values, not a slow Redis,
	// and must not flake when a loaded machine delays the shared Redis.
	env := cacheEnv(t, tallytest.RedisURL(), tallytest.Options{CacheTTL: ttl, CacheOpTimeout: time.Second})
	b := newBooks(t, env, ttl, 1)
	a := b.accts[0]
	b.warm()
	rc := env.Cache.Client()
	ctx := ctxT(t)
	key := env.KeyPrefix + a
	cur, err := env.Raw.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: a})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UnixNano()
	garbage := []string{
		"garbage",
		"",
		"\x00\xff\xfe",
		"v1|x|1|0|1|" + cur.GetCurrency() + "|0", // not a number
		"v1|3|100|0|100|" + cur.GetCurrency(),    // a field short
		"v1|3|100|0|100|" + cur.GetCurrency() + "|0|extra",                                      // a field too many
		"v2|3|100|0|100|" + cur.GetCurrency() + "|0",                                            // unknown format
		"v1|03|100|0|100|" + cur.GetCurrency() + "|0",                                           // not canonical
		"v1|-3|100|0|100|" + cur.GetCurrency() + "|0",                                           // negative version
		"v1|99999999999999999999|1|0|1|" + cur.GetCurrency() + "|" + strconv.FormatInt(now, 10), // overflows int64
		"v1|3|100|0|100||0", // no currency
	}
	for i, g := range garbage {
		for _, expiry := range []time.Duration{ttl / 2, 0} { // with a proper TTL, and with none
			if err := rc.Set(ctx, key, g, expiry).Err(); err != nil {
				t.Fatal(err)
			}
			got, _ := b.mustRead(a, cached, 0)
			if got.GetSource() != fromStore || got.GetVersion() != b.acked(a) || got.GetBalance() != b.want[a] {
				t.Fatalf("garbage %d %q (expiry %v): read %v, want v%d balance %d from the store", i, g, expiry, got, b.acked(a), b.want[a])
			}
			if i%2 == 1 {
				b.charge(a, 1) // the write path replaces the garbage too
			}
			got = b.readFromCacheSoon(a)
			if got.GetSource() != fromCache || got.GetVersion() != b.acked(a) || got.GetBalance() != b.want[a] {
				t.Fatalf("garbage %d %q (expiry %v): next read %v, want v%d balance %d refilled in the cache", i, g, expiry, got, b.acked(a), b.want[a])
			}
		}
	}
	// A key of the wrong type (a hash where a string value belongs) is garbage too.
	for _, expiry := range []time.Duration{ttl / 2, 0} {
		if err := rc.Del(ctx, key).Err(); err != nil {
			t.Fatal(err)
		}
		if err := rc.HSet(ctx, key, "v", "1").Err(); err != nil {
			t.Fatal(err)
		}
		if expiry > 0 {
			rc.PExpire(ctx, key, expiry)
		}
		for i := range 3 {
			got, _ := b.mustRead(a, cached, 0)
			if got.GetVersion() != b.acked(a) || got.GetBalance() != b.want[a] {
				t.Fatalf("hash at the key (expiry %v): read %d got %v, want v%d balance %d", expiry, i, got, b.acked(a), b.want[a])
			}
			if i > 0 && got.GetSource() != fromCache {
				t.Fatalf("hash at the key (expiry %v): read %d from %v, want the cache refilled", expiry, i, got.GetSource())
			}
		}
	}
	if st := env.Cache.Status(); st.State != cache.StateOK {
		t.Fatalf("cache status %+v after garbage, want ok (garbage is a miss, not a failure)", st)
	}
	b.check()
}

// A stale value planted with a real older (version, balance) pair: a cached
// read may serve it, but only until its TTL; a STRONG read and a read with a
// min_version above it never do; an entry with a TTL above the cache TTL, or
// none, is never served.
func TestCacheStaleValuePlanted(t *testing.T) {
	t.Parallel()
	const ttl = 5 * time.Second
	env := cacheEnv(t, tallytest.RedisURL(), tallytest.Options{CacheTTL: ttl, CacheOpTimeout: time.Second})
	b := newBooks(t, env, ttl, 2)
	rc := env.Cache.Client()
	ctx := ctxT(t)
	acct, err := env.Raw.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: b.accts[0]})
	if err != nil {
		t.Fatal(err)
	}
	currency := acct.GetCurrency()

	// Each account: v1 = 1,000,000 (the credit), v2 = 999,900, v3 = 999,800.
	// plant stores v2 as a stale entry expiring at most ttlLeft from now,
	// where ttlLeft keeps the entry within the promise: v2 was current
	// until v3 committed, which was after v3's charge was sent.
	v3Sent := map[string]time.Time{}
	for _, a := range b.accts {
		b.charge(a, 100)
		v3Sent[a] = time.Now()
		b.charge(a, 100)
		if b.acked(a) != 3 {
			t.Fatalf("account %s at v%d, want v3", a, b.acked(a))
		}
	}
	const v2, bal2, v3, bal3 = 2, initialFunds - 100, 3, initialFunds - 200
	plant := func(a string, expiry time.Duration) (expiresBy time.Time) {
		t.Helper()
		ttlLeft := ttl - time.Since(v3Sent[a]) - 100*time.Millisecond
		if expiry > ttlLeft {
			t.Fatalf("too slow: cannot plant an entry for %v within the promise (%v left)", expiry, ttlLeft)
		}
		if err := rc.Set(ctx, env.KeyPrefix+a, cacheValue(v2, bal2, currency, v3Sent[a]), expiry).Err(); err != nil {
			t.Fatal(err)
		}
		return time.Now().Add(expiry)
	}
	want := func(what string, got *tallyv1.Balance, version, balance int64, src tallyv1.BalanceSource) {
		t.Helper()
		if got.GetVersion() != version || got.GetBalance() != balance || (src != 0 && got.GetSource() != src) {
			t.Fatalf("%s: got v%d balance %d from %v, want v%d balance %d (source %v)",
				what, got.GetVersion(), got.GetBalance(), got.GetSource(), version, balance, src)
		}
	}

	// Account 0: STRONG and min_version reads never return the planted v2.
	a := b.accts[0]
	checks := []struct {
		name string
		read func() *tallyv1.Balance
		// wantV3 is false when serving the stale v2 is allowed.
		wantV3 bool
	}{
		{"STRONG", func() *tallyv1.Balance { g, _ := b.mustRead(a, strong, 0); return g }, true},
		{"min_version 3", func() *tallyv1.Balance { g, _ := b.mustRead(a, cached, v3); return g }, true},
		{"STRONG with min_version 3", func() *tallyv1.Balance { g, _ := b.mustRead(a, strong, v3); return g }, true},
		{"min_version 2", func() *tallyv1.Balance { g, _ := b.mustRead(a, cached, v2); return g }, false},
	}
	for _, c := range checks {
		plant(a, time.Second)
		// The planted entry is live: a plain cached read serves it.
		g, _ := b.mustRead(a, cached, 0)
		want("cached read after planting v2", g, v2, bal2, fromCache)
		g = c.read()
		if c.wantV3 {
			want(c.name+" with v2 planted", g, v3, bal3, fromStore)
		} else {
			want(c.name+" with v2 planted", g, v2, bal2, fromCache)
		}
	}
	plant(a, time.Second)
	_, err = env.Raw.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a, MinVersion: v3 + 1})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonVersionNotReached)

	// Account 1: the planted v2 is served only until its TTL, then the
	// current v3 is, first from the store and then from the cache again.
	a = b.accts[1]
	expiresBy := plant(a, time.Second)
	staleServed := 0
	var last *tallyv1.Balance
	for i := 0; time.Now().Before(expiresBy.Add(500*time.Millisecond)) && i < 200; i++ {
		start := time.Now()
		g, _ := b.mustRead(a, cached, 0)
		if g.GetVersion() == v2 {
			staleServed++
			if start.After(expiresBy) {
				t.Fatalf("stale v2 served by a read started %v after its TTL ran out", start.Sub(expiresBy))
			}
		} else {
			want("cached read", g, v3, bal3, 0)
		}
		last = g
		time.Sleep(25 * time.Millisecond)
	}
	if staleServed == 0 {
		t.Fatal("the planted stale entry was never served: the test planted nothing real")
	}
	want("cached read after the TTL", last, v3, bal3, 0)
	g, _ := b.mustRead(a, cached, 0)
	want("next cached read after the TTL", g, v3, bal3, fromCache)

	// Entries a Put could never have written: a TTL beyond the cache TTL,
	// or none. Both are refused and the current value is read.
	for _, expiry := range []time.Duration{ttl + 10*time.Second, 0} {
		if err := rc.Set(ctx, env.KeyPrefix+a, cacheValue(v2, bal2, currency, time.Now()), expiry).Err(); err != nil {
			t.Fatal(err)
		}
		g, _ := b.mustRead(a, cached, 0)
		want(fmt.Sprintf("cached read with v2 planted for %v", expiry), g, v3, bal3, fromStore)
	}
	b.check()
}
