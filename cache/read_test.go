package cache

import (
	"context"
	"math"
	"strconv"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestPlantedNeverServed: what Put could never have written is refused by
// the plain read, whatever the value says of itself: no expiry, an expiry
// longer than TTL, garbage, a key of another type, and a well-formed value
// that claims a fresh AsOf and a far ServeUntil but was planted without
// expiry. A value that is itself too old by its AsOf is refused too. Each
// case that leaves the entry is followed by a proper Put of a newer version,
// which must be served: the refusal did not leave anything that blocks a
// refill.
func TestPlantedNeverServed(t *testing.T) {
	requireSharedRedis(t)
	const ttl = 10 * time.Second
	c, _ := newCache(t, sharedRedisURL(), Config{TTL: ttl, ProbeInterval: -1})
	ctx := context.Background()
	rc := c.Client()
	forged := bal(uuid.New(), math.MaxInt64-1, 1<<40)
	forged.ServeUntil = time.Now().Add(24 * time.Hour)
	forgedVal, err := encode(forged)
	if err != nil {
		t.Fatal(err)
	}
	old := bal(uuid.New(), 3, 30)
	old.AsOf = time.Now().Add(-ttl - time.Second)
	oldVal, _ := encode(old)
	cases := []struct {
		name    string
		plant   func(key string) error
		deleted bool // the refusal removes the entry
	}{
		{"no expiry", func(k string) error { return rc.Set(ctx, k, forgedVal, 0).Err() }, true},
		{"expiry TTL+5s", func(k string) error { return rc.Set(ctx, k, forgedVal, ttl+5*time.Second).Err() }, true},
		{"expiry an hour", func(k string) error { return rc.Set(ctx, k, forgedVal, time.Hour).Err() }, true},
		{"garbage", func(k string) error { return rc.Set(ctx, k, "v2|garbage", ttl/2).Err() }, false},
		{"hash", func(k string) error {
			if err := rc.HSet(ctx, k, "v", "1").Err(); err != nil {
				return err
			}
			return rc.PExpire(ctx, k, ttl/2).Err()
		}, true},
		{"hash without expiry", func(k string) error { return rc.HSet(ctx, k, "v", "1").Err() }, true},
		{"older than TTL by its AsOf", func(k string) error { return rc.Set(ctx, k, oldVal, ttl/2).Err() }, false},
	}
	for _, tc := range cases {
		id := uuid.New()
		key := c.key(id)
		if err := tc.plant(key); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got, ok := c.Get(ctx, id); ok {
			t.Fatalf("%s: planted entry served: %+v", tc.name, got)
		}
		if n := rc.Exists(ctx, key).Val(); tc.deleted && n != 0 {
			t.Errorf("%s: refused entry not deleted", tc.name)
		}
		if st := c.Status(); st.State != StateOK {
			t.Errorf("%s: status %+v, want ok (a planted entry is a miss, not a failure)", tc.name, st)
		}
		if tc.name != "no expiry" && tc.name != "expiry TTL+5s" && tc.name != "expiry an hour" {
			c.Put(ctx, bal(id, 5, 50)) // above the planted versions the CAS may keep
			mustHit(t, c, id, 5, 50)
		}
	}
	// The boundary: an expiry of exactly TTL is what Put may set; served.
	id := uuid.New()
	v, _ := encode(bal(id, 4, 40))
	if err := rc.Set(ctx, c.key(id), v, ttl).Err(); err != nil {
		t.Fatal(err)
	}
	mustHit(t, c, id, 4, 40)
}

// TestCleanKeepsFreshValue: the delete after a refused read checks again
// inside Redis, so a proper value stored since is kept.
func TestCleanKeepsFreshValue(t *testing.T) {
	requireSharedRedis(t)
	c, _ := newCache(t, sharedRedisURL(), Config{TTL: 10 * time.Second, ProbeInterval: -1})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 2, 20))
	c.clean(ctx, c.key(id)) // as if a read had seen a planted entry just before the Put
	mustHit(t, c, id, 2, 20)
	c.Client().Set(ctx, c.key(id), "x", 0)
	c.clean(ctx, c.key(id))
	if n := c.Client().Exists(ctx, c.key(id)).Val(); n != 0 {
		t.Fatal("entry without expiry not deleted")
	}
}

// TestCanonicalInt: the allocation-free check accepts exactly what
// ParseInt + FormatInt round-trips.
func TestCanonicalInt(t *testing.T) {
	inputs := []string{
		"", "0", "-0", "+0", "00", "01", "-01", "1", "-1", "+1", "-", "+", "--1", " 1", "1 ", "1_000",
		"0x10", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
		"-9223372036854775809", "09223372036854775807", "12a", "1e3", "٣",
	}
	for n := int64(-1000); n <= 1000; n += 7 {
		inputs = append(inputs, strconv.FormatInt(n, 10), "0"+strconv.FormatInt(n, 10))
	}
	for _, s := range inputs {
		v, err := strconv.ParseInt(s, 10, 64)
		want := err == nil && strconv.FormatInt(v, 10) == s
		got, ok := canonicalInt(s)
		if ok != want || (ok && got != v) {
			t.Errorf("canonicalInt(%q) = %d, %v; want %d, %v", s, got, ok, v, want)
		}
	}
}

// TestEncodeMatchesJoin: the appending encoder writes exactly the format
// the Lua CAS and decode expect, for extreme values and a long currency.
func TestEncodeMatchesJoin(t *testing.T) {
	b := Balance{
		Currency: "A-VERY-LONG-CURRENCY-CODE-THAT-DOES-NOT-FIT-IN-ANY-SMALL-BUFFER-" + string(make([]byte, 200)),
		Balance:  math.MinInt64, CreditLimit: math.MaxInt64, Available: -1, Version: math.MaxInt64,
		AsOf: time.Unix(0, math.MinInt64+1), Held: math.MaxInt64, ServeUntil: time.Unix(0, math.MaxInt64),
	}
	got, err := encode(b)
	if err != nil {
		t.Fatal(err)
	}
	want := "v2|9223372036854775807|-9223372036854775808|9223372036854775807|-1|" + b.Currency +
		"|-9223372036854775807|9223372036854775807|9223372036854775807"
	if got != want {
		t.Fatalf("encode:\n got %q\nwant %q", got, want)
	}
	back, err := decode(got)
	if err != nil || back.Version != b.Version || back.Balance != b.Balance || back.Currency != b.Currency ||
		!back.AsOf.Equal(b.AsOf) || !back.ServeUntil.Equal(b.ServeUntil) {
		t.Fatalf("decode: %+v %v", back, err)
	}
}

// TestKey: the one-allocation key is prefix + the canonical UUID text.
func TestKey(t *testing.T) {
	c := &Cache{prefix: "tally:bal:"}
	for range 100 {
		id := uuid.New()
		if got, want := c.key(id), "tally:bal:"+id.String(); got != want {
			t.Fatalf("key %q, want %q", got, want)
		}
	}
	if got := c.key(uuid.UUID{}); got != "tally:bal:00000000-0000-0000-0000-000000000000" {
		t.Fatalf("nil uuid key %q", got)
	}
}

// TestReadSuccessResetsFailures: a successful read after failed ones resets
// the breaker's consecutive failures, as before reads skipped its lock, so
// sporadic read failures between successes never open it (the probe is off
// here: no write resets them).
func TestReadSuccessResetsFailures(t *testing.T) {
	requireSharedRedis(t)
	p, url := proxied(t)
	c, _ := newCache(t, url, Config{OpTimeout: testOpTimeout, FailuresMax: 2, ProbeInterval: -1, BreakerCooldown: time.Minute})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 1, 10))
	for i := range 3 {
		p.Cut()
		mustMiss(t, c, id)
		p.Heal()
		eventually(t, 2*time.Second, "a hit after healing", func() bool { _, ok := c.Get(ctx, id); return ok })
		if s := c.Stats(); s.Breaker != "closed" {
			t.Fatalf("round %d: breaker %s after a failed and a successful read, want closed (stats %+v)", i, s.Breaker, s)
		}
	}
}
