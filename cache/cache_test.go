package cache

import (
	"context"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

const (
	testOpTimeout = 50 * time.Millisecond
	// maxSickCall is what one call may cost against a slow or dead Redis:
	// OpTimeout plus slack for the race detector on a 2-core machine.
	maxSickCall = 200 * time.Millisecond
	// maxBypass is what a call may cost while the breaker is open.
	maxBypass = 20 * time.Millisecond
)

func TestBadURL(t *testing.T) {
	for _, u := range []string{"", "http://127.0.0.1:6379", "redis://127.0.0.1:6379/notadb"} {
		if c, err := New(Config{URL: u}); err == nil {
			_ = c.Close()
			t.Errorf("New(%q): want error", u)
		}
	}
}

func TestDefaults(t *testing.T) {
	requireSharedRedis(t)
	c, err := New(Config{URL: sharedRedisURL()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.opTimeout != opTimeoutDefault || c.ttl != ttlDefault || c.prefix != keyPrefixDefault {
		t.Fatalf("defaults not applied: %v %v %q", c.opTimeout, c.ttl, c.prefix)
	}
	opt := c.client.(*redis.Client).Options()
	if !opt.ContextTimeoutEnabled || opt.MaxRetries != 0 || opt.ReadTimeout != opTimeoutDefault ||
		opt.WriteTimeout != opTimeoutDefault || opt.PoolTimeout != opTimeoutDefault || opt.DialTimeout > time.Second {
		t.Fatalf("redis options do not bound calls: %+v", opt)
	}
	if st := c.Status(); st.State != StateOK {
		t.Fatalf("status %+v, want ok", st)
	}
}

func TestRoundTrip(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{})
	ctx := context.Background()
	id := uuid.New()

	mustMiss(t, c, id)
	want := Balance{AccountID: id, Currency: "EUR", Balance: -250, CreditLimit: 500,
		Available: 250, Version: 7, AsOf: time.Now().UTC()}
	c.Put(ctx, want)
	got, ok := c.Get(ctx, id)
	if !ok {
		t.Fatal("miss after Put")
	}
	if !got.AsOf.Equal(want.AsOf) {
		t.Fatalf("AsOf %v, want %v", got.AsOf, want.AsOf)
	}
	got.AsOf, want.AsOf = time.Time{}, time.Time{}
	if got != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	// Other accounts are untouched.
	mustMiss(t, c, uuid.New())

	c.Delete(ctx, id)
	mustMiss(t, c, id)
	if st := c.Status(); st.State != StateOK {
		t.Fatalf("status %+v, want ok (a miss is not a failure)", st)
	}
}

func TestPutCompareAndSet(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{})
	ctx := context.Background()
	id := uuid.New()

	c.Put(ctx, bal(id, 5, 100))
	mustHit(t, c, id, 5, 100)

	// Newer wins.
	c.Put(ctx, bal(id, 6, 90))
	mustHit(t, c, id, 6, 90)

	// Older loses: a slow reader filling v5 after a writer stored v6.
	c.Put(ctx, bal(id, 5, 100))
	mustHit(t, c, id, 6, 90)

	// Equal leaves the entry as it is.
	c.Put(ctx, bal(id, 6, 12345))
	mustHit(t, c, id, 6, 90)

	// Versions are compared exactly, also beyond 2^53 where Lua numbers
	// (doubles) would call these two equal.
	c.Put(ctx, bal(id, 9007199254740993, 1))
	c.Put(ctx, bal(id, 9007199254740992, 2))
	mustHit(t, c, id, 9007199254740993, 1)
	c.Put(ctx, bal(id, 9007199254740994, 3))
	mustHit(t, c, id, 9007199254740994, 3)
	// Longer is larger, whatever the digits.
	c.Put(ctx, bal(id, 10000000000000000, 4))
	mustHit(t, c, id, 10000000000000000, 4)
	c.Put(ctx, bal(id, 9999999999999999, 5))
	mustHit(t, c, id, 10000000000000000, 4)
}

// TestConcurrentPutsNewestWins races many writers with random versions:
// whatever the interleaving, the newest version must end up cached.
func TestConcurrentPutsNewestWins(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{OpTimeout: time.Second})
	ctx := context.Background()
	id := uuid.New()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var maxV int64
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				v := rand.Int64N(10000)
				c.Put(ctx, bal(id, v, v*10))
				mu.Lock()
				maxV = max(maxV, v)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	mustHit(t, c, id, maxV, maxV*10)
}

func TestInvalidPutIgnored(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{})
	ctx := context.Background()
	for name, b := range map[string]Balance{
		"negative version": bal(uuid.New(), -1, 1),
		"empty currency":   {AccountID: uuid.New(), Version: 1},
		"pipe in currency": {AccountID: uuid.New(), Version: 1, Currency: "US|D"},
	} {
		c.Put(ctx, b)
		mustMiss(t, c, b.AccountID)
		if n := c.Client().Exists(ctx, c.key(b.AccountID)).Val(); n != 0 {
			t.Errorf("%s: stored", name)
		}
	}
}

func TestGarbageIsMiss(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{})
	ctx := context.Background()
	good, err := encode(bal(uuid.New(), 3, 30))
	if err != nil {
		t.Fatal(err)
	}
	garbage := []string{
		"",
		"hello",
		"\x00\xff\xfe",
		"v3" + strings.TrimPrefix(good, "v2"),   // unknown format
		"v1|3|30|0|30|USD|0",                    // the previous format
		strings.Replace(good, "|3|", "|03|", 1), // non-canonical version
		strings.Replace(good, "|3|", "|-3|", 1), // negative version
		strings.Replace(good, "|3|", "|+3|", 1), // signed version
		strings.Replace(good, "|3|30|", "|3|3x|", 1), // bad balance
		strings.Replace(good, "|USD|", "||", 1),      // empty currency
		good + "|extra",
		good[:strings.LastIndex(good, "|")],                                // missing field
		"v2|99999999999999999999|1|2|3|USD|0|0|0",                          // version overflows int64
		strings.Replace(good, "|USD|", "|USD|", 1)[:len(good)-4] + "|-1|0", // negative held
	}
	for _, g := range garbage {
		id := uuid.New()
		if err := c.Client().Set(ctx, c.key(id), g, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		mustMiss(t, c, id)
		// An unparsable entry does not block a refill.
		c.Put(ctx, bal(id, 1, 10))
		mustHit(t, c, id, 1, 10)
	}
	// A hash where a string should be is a miss too, not a failure.
	id := uuid.New()
	c.Client().HSet(ctx, c.key(id), "a", "b")
	c.Client().Expire(ctx, c.key(id), time.Minute)
	mustMiss(t, c, id)
	if st := c.Status(); st.State != StateOK && !strings.Contains(st.Detail, "WRONGTYPE") {
		t.Fatalf("status %+v", st)
	}
}

// TestPlantedWithoutProperTTLIsMiss: an entry that could outlive the TTL
// bound is never served, and is removed.
func TestPlantedWithoutProperTTLIsMiss(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{TTL: 10 * time.Second})
	ctx := context.Background()
	for name, ttl := range map[string]time.Duration{
		"no TTL":   0,
		"huge TTL": time.Hour,
		"TTL+1s":   11 * time.Second,
	} {
		id := uuid.New()
		v, _ := encode(bal(id, 4, 40))
		if err := c.Client().Set(ctx, c.key(id), v, ttl).Err(); err != nil {
			t.Fatal(err)
		}
		mustMiss(t, c, id)
		if n := c.Client().Exists(ctx, c.key(id)).Val(); n != 0 {
			t.Errorf("%s: entry not deleted", name)
		}
	}
	// Within TTL is served.
	id := uuid.New()
	v, _ := encode(bal(id, 4, 40))
	c.Client().Set(ctx, c.key(id), v, 9*time.Second)
	mustHit(t, c, id, 4, 40)
}

func TestTTLExpiry(t *testing.T) {
	requireSharedRedis(t)
	const ttl = 300 * time.Millisecond
	c, _ := newCache(t, sharedRedisURL(), Config{TTL: ttl})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 1, 10))
	mustHit(t, c, id, 1, 10)
	if pttl := c.Client().PTTL(ctx, c.key(id)).Val(); pttl <= 0 || pttl > ttl {
		t.Fatalf("PTTL %v, want in (0, %v]", pttl, ttl)
	}
	time.Sleep(ttl + 100*time.Millisecond)
	mustMiss(t, c, id)
}

// TestTTLCountsFromAsOf: the age bound runs from the PostgreSQL read, so a
// slow reader's pair expires early, and a pair already too old is dropped.
func TestTTLCountsFromAsOf(t *testing.T) {
	requireSharedRedis(t)
	const ttl = 10 * time.Second
	c, _ := newCache(t, sharedRedisURL(), Config{TTL: ttl})
	ctx := context.Background()

	id := uuid.New()
	b := bal(id, 1, 10)
	b.AsOf = time.Now().Add(-2 * ttl)
	c.Put(ctx, b)
	mustMiss(t, c, id)

	b.AsOf = time.Now().Add(-ttl / 2)
	c.Put(ctx, b)
	mustHit(t, c, id, 1, 10)
	if pttl := c.Client().PTTL(ctx, c.key(id)).Val(); pttl > ttl/2 {
		t.Fatalf("PTTL %v, want <= %v", pttl, ttl/2)
	}

	// A clock ahead of ours still gets at most TTL.
	id2 := uuid.New()
	b2 := bal(id2, 1, 10)
	b2.AsOf = time.Now().Add(time.Hour)
	c.Put(ctx, b2)
	if pttl := c.Client().PTTL(ctx, c.key(id2)).Val(); pttl <= 0 || pttl > ttl {
		t.Fatalf("PTTL %v, want in (0, %v]", pttl, ttl)
	}
}

// A caller giving up says nothing about Redis: it does not count toward
// the breaker. But a Put abandoned that way did not store its value, so
// the entry may be stale: the cache stops serving until a write of that
// account succeeds.
func TestCallerCancelNotAFailure(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{FailuresMax: 1, ProbeInterval: -1})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	id := uuid.New()
	if _, ok := c.Get(ctx, id); ok {
		t.Fatal("hit with canceled context")
	}
	if st := c.Status(); st.State != StateOK {
		t.Fatalf("status %+v after a canceled Get, want ok", st)
	}
	c.Put(ctx, bal(id, 1, 1))
	if s := c.Stats(); s.Errors != 0 || s.Breaker != "closed" || !s.NotServing {
		t.Fatalf("stats %+v after a canceled Put, want no error, breaker closed, not serving", s)
	}
	c.Put(context.Background(), bal(id, 1, 1))
	if st := c.Status(); st.State != StateOK {
		t.Fatalf("status %+v after the account was written, want ok", st)
	}
	mustHit(t, c, id, 1, 1)
}

func TestRedisDownAtStart(t *testing.T) {
	dead := freePort(t)
	start := time.Now()
	c, lb := newCache(t, "redis://127.0.0.1:"+itoa(dead)+"/0", Config{OpTimeout: testOpTimeout, FailuresMax: 2})
	if el := time.Since(start); el > maxSickCall {
		t.Fatalf("New took %v with Redis down", el)
	}
	// New's probe write failed: reads stay off Redis from the start.
	if st := c.Status(); st.State != StateDegraded || !strings.Contains(st.Detail, "not serving cached balances: last write failed") ||
		!strings.Contains(st.Detail, "connection refused") {
		t.Fatalf("status %+v, want degraded, not serving, connection refused", st)
	}
	id := uuid.New()
	for i := 0; i < 3; i++ {
		if ok, el := timedGet(c, id); ok || el > maxBypass {
			t.Fatalf("Get with Redis down: ok=%v in %v, want a bypass", ok, el)
		}
	}
	// The probe keeps trying without any traffic, and opens the breaker.
	eventually(t, 3*time.Second, "breaker open", func() bool { return strings.Contains(c.Status().Detail, "breaker open") })
	if !strings.Contains(lb.String(), "breaker open") {
		t.Fatalf("breaker opening not logged: %s", lb.String())
	}
}

// sickRedis runs the slow/blackholed scenario: calls are bounded by
// OpTimeout, the breaker opens after FailuresMax failures and then bypasses
// Redis at no cost, and after healing and the cooldown hits come back.
func sickRedis(t *testing.T, makeSick func(), heal func(), url string) {
	t.Helper()
	const failuresMax = 3
	const cooldown = 300 * time.Millisecond
	c, lb := newCache(t, url, Config{OpTimeout: testOpTimeout, FailuresMax: failuresMax, BreakerCooldown: cooldown})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 1, 10))
	mustHit(t, c, id, 1, 10)

	makeSick()
	for i := 0; i < failuresMax; i++ {
		if ok, el := timedGet(c, id); ok || el > maxSickCall {
			t.Fatalf("Get %d on sick Redis: ok=%v in %v, want miss within %v", i, ok, el, maxSickCall)
		}
		if st := c.Status(); st.State != StateDegraded {
			t.Fatalf("status %+v after failure, want degraded", st)
		}
	}
	st := c.Status()
	if !strings.Contains(st.Detail, "breaker open") {
		t.Fatalf("status %+v after %d failures, want breaker open", st, failuresMax)
	}
	if !strings.Contains(lb.String(), "breaker open") {
		t.Fatal("breaker opening not logged")
	}
	// Open: no Redis call at all.
	for i := 0; i < 10; i++ {
		if ok, el := timedGet(c, id); ok || el > maxBypass {
			t.Fatalf("Get with breaker open: ok=%v in %v", ok, el)
		}
		start := time.Now()
		c.Put(ctx, bal(id, 2, 20))
		c.Delete(ctx, id)
		if el := time.Since(start); el > maxBypass {
			t.Fatalf("Put+Delete with breaker open took %v", el)
		}
	}

	heal()
	eventually(t, cooldown+2*time.Second, "hit after heal", func() bool {
		// Only a successful write closes the breaker (reads stay off Redis
		// while it is half-open), as the ledger's read path does on a miss.
		// An equal version leaves the stored value as it is.
		c.Put(ctx, bal(id, 1, 10))
		_, ok := c.Get(ctx, id)
		return ok
	})
	// The Put and Delete made while open really did nothing.
	mustHit(t, c, id, 1, 10)
	if st := c.Status(); st.State != StateOK {
		t.Fatalf("status %+v after heal, want ok", st)
	}
	if !strings.Contains(lb.String(), "breaker closed") {
		t.Fatal("breaker closing not logged")
	}
}

func TestSlowRedis(t *testing.T) {
	requireSharedRedis(t)
	p, url := proxied(t)
	sickRedis(t, func() { p.SetLatency(500 * time.Millisecond) }, p.Heal, url)
}

func TestBlackholedRedis(t *testing.T) {
	requireSharedRedis(t)
	p, url := proxied(t)
	sickRedis(t, p.Blackhole, p.Heal, url)
}

func TestCutRedis(t *testing.T) {
	requireSharedRedis(t)
	p, url := proxied(t)
	sickRedis(t, p.Cut, p.Heal, url)
}

// TestRedisKilledAndRestartedEmpty: a crash is a quick miss; a restart with
// an empty dataset is a miss and then refills.
func TestRedisKilledAndRestartedEmpty(t *testing.T) {
	r := startPrivateRedis(t)
	const cooldown = 200 * time.Millisecond
	c, _ := newCache(t, r.url(), Config{OpTimeout: testOpTimeout, FailuresMax: 3, BreakerCooldown: cooldown})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 1, 10))
	mustHit(t, c, id, 1, 10)

	r.stop()
	for i := 0; i < 5; i++ {
		if ok, el := timedGet(c, id); ok || el > maxSickCall {
			t.Fatalf("Get on killed Redis: ok=%v in %v", ok, el)
		}
		start := time.Now()
		c.Put(ctx, bal(id, 2, 20))
		if el := time.Since(start); el > maxSickCall {
			t.Fatalf("Put on killed Redis took %v", el)
		}
	}
	if st := c.Status(); st.State != StateDegraded {
		t.Fatalf("status %+v, want degraded", st)
	}

	r.start()
	time.Sleep(cooldown)
	// Empty after restart: miss (and not an error that keeps the breaker
	// open), then a refill is served.
	probe := uuid.New()
	eventually(t, 3*time.Second, "breaker closed after restart", func() bool {
		_, ok := c.Get(ctx, id)
		if ok {
			t.Fatal("hit on a Redis restarted empty")
		}
		// A write to another key is the half-open probe.
		c.Put(ctx, bal(probe, 1, 1))
		return c.Status().State == StateOK
	})
	c.Put(ctx, bal(id, 3, 30))
	mustHit(t, c, id, 3, 30)
}

// TestReadOnlyRedis: a Redis that still serves reads but refuses writes must
// not keep serving balances it can no longer update. Failed Puts open the
// breaker, and then Get bypasses Redis although the values are there.
func TestReadOnlyRedis(t *testing.T) {
	r := startPrivateRedis(t)
	const failuresMax = 3
	const cooldown = 200 * time.Millisecond
	c, lb := newCache(t, r.url(), Config{OpTimeout: testOpTimeout, FailuresMax: failuresMax, BreakerCooldown: cooldown})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 1, 10))
	mustHit(t, c, id, 1, 10)

	// Make it a read-only replica of a master that does not exist: it keeps
	// its data and serves reads, but refuses writes with READONLY.
	admin := r.client()
	if err := admin.Do(ctx, "REPLICAOF", "127.0.0.1", itoa(freePort(t))).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "REPLICAOF", "NO", "ONE") })
	if err := admin.Set(ctx, "probe", "x", 0).Err(); err == nil || !strings.Contains(err.Error(), "READONLY") {
		t.Fatalf("redis not read-only: %v", err)
	}

	for i := 0; i < failuresMax; i++ {
		c.Put(ctx, bal(id, int64(2+i), 20))
	}
	st := c.Status()
	if !strings.Contains(st.Detail, "breaker open") || !strings.Contains(st.Detail, "READONLY") {
		t.Fatalf("status %+v after failed Puts, want breaker open with READONLY", st)
	}
	if !strings.Contains(lb.String(), "breaker open") {
		t.Fatal("breaker opening not logged")
	}
	// The value is still in Redis, but is not served.
	if v, err := admin.Get(ctx, c.key(id)).Result(); err != nil || !strings.HasPrefix(v, "v2|1|") {
		t.Fatalf("value gone from read-only Redis: %q %v", v, err)
	}
	mustMiss(t, c, id)
	// Still read-only after the cooldown: reads stay off Redis (a read is
	// never the half-open probe), and the next failed write reopens it.
	time.Sleep(cooldown + 50*time.Millisecond)
	for i := 0; i < 5; i++ {
		mustMiss(t, c, id)
		c.Put(ctx, bal(id, 9, 90))
	}
	if st := c.Status(); st.State != StateDegraded {
		t.Fatalf("status %+v while still read-only, want degraded", st)
	}

	// Heal: writable again, and after the cooldown the cache works.
	if err := admin.Do(ctx, "REPLICAOF", "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(cooldown)
	eventually(t, 3*time.Second, "breaker closed after REPLICAOF NO ONE", func() bool {
		c.Put(ctx, bal(id, 5, 50))
		return c.Status().State == StateOK
	})
	mustHit(t, c, id, 5, 50)
}

func TestEncodeDecode(t *testing.T) {
	cases := []Balance{
		{Currency: "USD", Version: 0},
		{Currency: "EUR", Balance: -1 << 63, CreditLimit: 1<<63 - 1, Available: 0, Version: 1<<63 - 1,
			AsOf: time.Unix(0, 1700000000123456789).UTC()},
		{Currency: "XAU", Balance: 5, CreditLimit: 0, Available: 5, Version: 42, AsOf: time.Unix(-5, 0).UTC()},
	}
	for _, b := range cases {
		s, err := encode(b)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decode(s)
		if err != nil {
			t.Fatalf("decode(%q): %v", s, err)
		}
		if got != b {
			t.Fatalf("round trip %q: got %+v want %+v", s, got, b)
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// Stats counts hits, misses, failed calls and bypasses, and shows the
// breaker's state: what the metrics are made of.
func TestStats(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{})
	ctx := context.Background()
	id := uuid.New()
	mustMiss(t, c, id)
	c.Put(ctx, bal(id, 1, 10))
	mustHit(t, c, id, 1, 10)
	mustHit(t, c, id, 1, 10)
	if s := c.Stats(); s != (Stats{Hits: 2, Misses: 1, Breaker: "closed"}) {
		t.Fatalf("healthy Redis: %+v", s)
	}

	dead := freePort(t)
	d, _ := newCache(t, "redis://127.0.0.1:"+itoa(dead)+"/0", Config{OpTimeout: testOpTimeout, FailuresMax: 2, BreakerCooldown: time.Minute, ProbeInterval: -1})
	// New's probe write failed once: not serving, so Get does not call
	// Redis; a failed Put is the second failure and opens the breaker.
	mustMiss(t, d, id)
	if s := d.Stats(); s != (Stats{Errors: 1, Bypassed: 1, Breaker: "closed", NotServing: true}) {
		t.Fatalf("dead Redis after New: %+v", s)
	}
	d.Put(ctx, bal(id, 1, 10))
	if s := d.Stats(); s.Errors != 2 || s.Breaker != "open" || s.Hits != 0 || s.Misses != 0 {
		t.Fatalf("dead Redis after 2 failures: %+v", s)
	}
	mustMiss(t, d, id)
	d.Put(ctx, bal(id, 1, 10))
	if s := d.Stats(); s.Errors != 2 || s.Bypassed != 3 || s.Breaker != "open" {
		t.Fatalf("dead Redis, breaker open: %+v", s)
	}
}

// TestServeUntil: a value is not served past its ServeUntil (shortly before
// the account's next hold expiry, which frees funds without a new version),
// and a refill of the same version then succeeds.
func TestServeUntil(t *testing.T) {
	t.Parallel()
	c, _ := newCache(t, sharedRedisURL(), Config{})
	ctx := context.Background()
	id := uuid.New()
	b := bal(id, 4, 40)
	b.Held = 7
	b.ServeUntil = time.Now().Add(300 * time.Millisecond)
	c.Put(ctx, b)
	got, ok := c.Get(ctx, id)
	if !ok || got.Held != 7 || got.Version != 4 {
		t.Fatalf("before serve-until: got %+v %v, want held 7 version 4", got, ok)
	}
	time.Sleep(400 * time.Millisecond)
	if _, ok := c.Get(ctx, id); ok {
		t.Fatal("value served past its ServeUntil")
	}
	b.ServeUntil = time.Now().Add(time.Minute)
	b.Held = 0
	c.Put(ctx, b)
	if got, ok := c.Get(ctx, id); !ok || got.Held != 0 {
		t.Fatalf("refill of the same version after serve-until: got %+v %v", got, ok)
	}
}
