package torture

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Fault kinds the nemesis injects.
const (
	FaultKillTallyd         = "kill_tallyd"
	FaultTermTallyd         = "term_tallyd"
	FaultPGRestartFast      = "pg_restart_fast"
	FaultPGRestartImmediate = "pg_restart_immediate"
	FaultRedisKill          = "redis_kill"
	FaultRedisFlushAll      = "redis_flushall"
	FaultRedisBlackhole     = "redis_blackhole"
	FaultRedisLatency       = "redis_latency"
	FaultPGCut              = "pg_cut"
	FaultPGBlackhole        = "pg_blackhole"
	FaultPlantStale         = "plant_stale"
	FaultPlantGarbage       = "plant_garbage"
)

// FaultRollingUpgrade is the replacement of a tallyd by the new release in
// a rolling-upgrade run (Config.OldTallydBin); it is not one of the
// nemesis's FaultKinds.
const FaultRollingUpgrade = "rolling_upgrade"

// FaultKinds lists every fault kind; a run of a minute injects each at least
// once.
var FaultKinds = []string{
	FaultKillTallyd, FaultTermTallyd, FaultPGRestartFast, FaultPGRestartImmediate, FaultRedisKill, FaultRedisFlushAll,
	FaultRedisBlackhole, FaultRedisLatency, FaultPGCut, FaultPGBlackhole, FaultPlantStale, FaultPlantGarbage,
}

// randDur returns a duration in [lo, hi).
func randDur(rng *rand.Rand, lo, hi time.Duration) time.Duration {
	return lo + time.Duration(rng.Int64N(int64(hi-lo)))
}

// hold sleeps for d or until stop ends, whichever is first: faults are cut
// short, never left in place, when the run ends.
func hold(stop context.Context, d time.Duration) {
	select {
	case <-stop.Done():
	case <-time.After(d):
	}
}

// nemesis injects faults one after another, in an order and with timings
// drawn from the seed, until stop ends. The kinds are shuffled and cycled,
// so every kind fires once per cycle. Each fault is healed before the next
// one starts, and before nemesis returns.
func (r *runner) nemesis(stop context.Context, seed int64) error {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x6e656d65736973))
	order := append([]string(nil), r.nemesisKinds()...)
	began := time.Now()
	failoverDue := r.cfg.PGFailover
	for i := 0; ; i++ {
		if i%len(order) == 0 {
			rng.Shuffle(len(order), func(a, b int) { order[a], order[b] = order[b], order[a] })
		}
		hold(stop, randDur(rng, 300*time.Millisecond, 1200*time.Millisecond))
		if stop.Err() != nil {
			return nil
		}
		kind := order[i%len(order)]
		start := time.Now()
		var detail string
		var err error
		if j := r.nextScheduled(time.Since(began)); j >= 0 {
			// In place of this turn's fault (which comes next).
			i--
			kind, detail, err = r.runScheduled(stop, j)
		} else if at := time.Since(began); failoverDue && at >= r.failoverAt() {
			// Once, in place of this turn's fault (which comes next).
			failoverDue = false
			kind = FaultPGFailover
			i--
			bg, cancel := context.WithTimeout(context.WithoutCancel(stop), 3*time.Minute)
			detail, err = r.pgFailover(bg, at)
			cancel()
		} else {
			detail, err = r.inject(stop, rng, kind)
		}
		r.countFault(kind)
		r.event("fault", "kind", kind, "detail", detail, "took", time.Since(start).Round(time.Millisecond).String())
		if err != nil {
			return fmt.Errorf("nemesis %s: %w", kind, err)
		}
	}
}

// targets picks the tallyds whose proxy a network fault hits: all of them
// or one.
func (r *runner) targets(rng *rand.Rand) []*tallyd {
	if rng.IntN(2) == 0 {
		return r.tds
	}
	return []*tallyd{r.tds[rng.IntN(len(r.tds))]}
}

func names(ts []*tallyd) string {
	s := make([]string, len(ts))
	for i, t := range ts {
		s[i] = fmt.Sprint(t.idx)
	}
	return "tallyd " + strings.Join(s, ",")
}

// inject applies one fault, holds it, and heals it. Restarts use their own
// bounded contexts: a restart is finished even when the run is ending.
func (r *runner) inject(stop context.Context, rng *rand.Rand, kind string) (string, error) {
	bg, cancel := context.WithTimeout(context.WithoutCancel(stop), 3*time.Minute)
	defer cancel()
	switch kind {
	case FaultKillTallyd:
		t := r.tds[rng.IntN(len(r.tds))]
		if err := t.kill(); err != nil {
			return "", err
		}
		down := randDur(rng, 200*time.Millisecond, 1500*time.Millisecond)
		hold(stop, down)
		return fmt.Sprintf("kill -9 tallyd %d, down %s", t.idx, down), t.start(bg)

	case FaultTermTallyd:
		// Beyond the list: a graceful restart, as in a deploy.
		t := r.tds[rng.IntN(len(r.tds))]
		start := time.Now()
		if err := t.term(20 * time.Second); err != nil {
			return "", err
		}
		took := time.Since(start)
		down := randDur(rng, 200*time.Millisecond, time.Second)
		hold(stop, down)
		return fmt.Sprintf("SIGTERM tallyd %d, exited after %s, down %s", t.idx, took.Round(time.Millisecond), down), t.start(bg)

	case FaultPGRestartFast, FaultPGRestartImmediate:
		mode := "fast"
		if kind == FaultPGRestartImmediate {
			mode = "immediate"
		}
		if err := r.pg.Stop(mode); err != nil {
			return "", err
		}
		down := randDur(rng, 200*time.Millisecond, 1500*time.Millisecond)
		hold(stop, down)
		return fmt.Sprintf("postgres stop %s, down %s", mode, down), r.startPG(bg)

	case FaultRedisKill:
		if err := r.redis.Kill(); err != nil {
			return "", err
		}
		down := randDur(rng, 200*time.Millisecond, 1500*time.Millisecond)
		hold(stop, down)
		return fmt.Sprintf("redis kill -9, down %s, restarted empty", down), r.redis.Start(bg)

	case FaultRedisFlushAll:
		ctx, cancel := context.WithTimeout(bg, 5*time.Second)
		defer cancel()
		return "FLUSHALL", r.rdb.FlushAll(ctx).Err()

	case FaultRedisBlackhole:
		ts := r.targets(rng)
		for _, t := range ts {
			t.redisProxy.Blackhole()
		}
		d := randDur(rng, time.Second, 3*time.Second)
		hold(stop, d)
		for _, t := range ts {
			t.redisProxy.Heal()
		}
		return fmt.Sprintf("redis proxy of %s blackholed for %s", names(ts), d), nil

	case FaultRedisLatency:
		ts := r.targets(rng)
		lat := randDur(rng, 20*time.Millisecond, 300*time.Millisecond)
		for _, t := range ts {
			t.redisProxy.SetLatency(lat)
		}
		d := randDur(rng, 2*time.Second, 4*time.Second)
		hold(stop, d)
		for _, t := range ts {
			t.redisProxy.SetLatency(0)
		}
		return fmt.Sprintf("redis proxy of %s +%s latency for %s", names(ts), lat, d), nil

	case FaultPGCut:
		ts := r.targets(rng)
		for _, t := range ts {
			for _, p := range t.pgProxies() {
				p.Cut()
			}
		}
		d := randDur(rng, time.Second, 4*time.Second)
		hold(stop, d)
		for _, t := range ts {
			for _, p := range t.pgProxies() {
				p.Heal()
			}
		}
		return fmt.Sprintf("postgres proxy of %s cut for %s", names(ts), d), nil

	case FaultPGBlackhole:
		// Beyond the list: PostgreSQL connections hang mid-query
		// (possibly mid-COMMIT) instead of failing, holding row and key
		// locks until the link is dropped at Heal.
		ts := r.targets(rng)
		for _, t := range ts {
			for _, p := range t.pgProxies() {
				p.Blackhole()
			}
		}
		// Often longer than the clients' 3s per-attempt timeout, so calls
		// end in DEADLINE_EXCEEDED while their transactions hang.
		d := randDur(rng, 2*time.Second, 5*time.Second)
		hold(stop, d)
		for _, t := range ts {
			for _, p := range t.pgProxies() {
				p.Heal()
			}
		}
		return fmt.Sprintf("postgres proxy of %s blackholed for %s", names(ts), d), nil

	case FaultPlantStale:
		return r.plantStale(bg, rng)

	case FaultPlantGarbage:
		return r.plantGarbage(bg, rng)

	case FaultProvider500, FaultProviderHang, FaultProviderDrop, FaultProviderSlow, FaultRedisReadOnly:
		return r.injectTopUpFault(stop, rng, kind)
	}
	return "", fmt.Errorf("unknown fault kind %q", kind)
}

// startPG starts PostgreSQL again, retrying a couple of times.
func (r *runner) startPG(ctx context.Context) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = r.pg.Start(ctx); err == nil || strings.Contains(err.Error(), "already running") {
			return nil
		}
		r.event("postgres start failed, retrying", "err", err.Error())
		time.Sleep(time.Second)
	}
	return err
}

// plantTTL is a random expiry no longer than the cache TTL, as the cache
// requires of every value it serves.
func (r *runner) plantTTL(rng *rand.Rand) time.Duration {
	half := r.cacheTTL / 2
	return (half + time.Duration(rng.Int64N(int64(half)+1))).Truncate(time.Millisecond)
}

// plantStale writes, straight into Redis in the cache's own format, an
// older (version, balance) pair that really existed (taken from the
// entries table) for a few accounts, overwriting whatever newer value was
// cached. It plants three times over a second, racing the service's own
// compare-and-set updates.
func (r *runner) plantStale(ctx context.Context, rng *rand.Rand) (string, error) {
	conn, err := pgx.Connect(ctx, r.dbURL)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	type target struct {
		acct     AccountSpec
		version  int64
		balance  int64
		limit    int64
		floored  bool
		currency string
	}
	var ts []target
	cands := append([]AccountSpec(nil), r.pools.all...)
	rng.Shuffle(len(cands), func(a, b int) { cands[a], cands[b] = cands[b], cands[a] })
	// Prefer hot accounts: they are read the most.
	for _, cur := range r.pools.currencies {
		cands = append(r.pools.hot[cur][:1:1], cands...)
	}
	seen := map[string]bool{}
	for _, a := range cands {
		if len(ts) >= 4 {
			break
		}
		if seen[a.ID] {
			continue
		}
		seen[a.ID] = true
		var t target
		t.acct = a
		var floor int16
		var cur int64
		err := conn.QueryRow(ctx, `SELECT version, credit_limit, floor, currency FROM accounts WHERE account_id = $1`, a.ID).
			Scan(&cur, &t.limit, &floor, &t.currency)
		if err != nil {
			return "", err
		}
		if cur < 2 {
			continue
		}
		// Half the time a recent pair, half the time one from anywhere in
		// the account's past: both really existed.
		if rng.IntN(2) == 0 {
			t.version = cur - 1 - rng.Int64N(min(10, cur-1))
		} else {
			t.version = 1 + rng.Int64N(cur-1)
		}
		err = conn.QueryRow(ctx, `SELECT balance_after FROM entries WHERE account_id = $1 AND version_after = $2`,
			a.ID, t.version).Scan(&t.balance)
		if err == pgx.ErrNoRows {
			continue
		}
		if err != nil {
			return "", err
		}
		t.floored = floor == 1
		ts = append(ts, t)
	}
	var desc []string
	for round := 0; round < 3; round++ {
		for _, t := range ts {
			avail := t.balance
			if t.floored {
				avail += t.limit
			}
			ttl := r.plantTTL(rng)
			val := CacheValue(t.version, t.balance, t.limit, avail, t.currency, time.Now())
			at := time.Now()
			if err := r.rdb.Set(ctx, r.keyPrefix+t.acct.ID, val, ttl).Err(); err != nil {
				return "", err
			}
			r.hist.AddPlant(Plant{Account: t.acct.ID, Version: t.version, Balance: t.balance, At: at, TTL: ttl})
			if round == 0 {
				desc = append(desc, fmt.Sprintf("%s(%s)=v%d", short(t.acct.ID), t.acct.Role, t.version))
			}
		}
		if round < 2 {
			time.Sleep(400 * time.Millisecond)
		}
	}
	return "stale pairs planted: " + strings.Join(desc, " "), nil
}

// garbageValues are values the cache must treat as a miss.
var garbageValues = []string{
	"v1|garbage",
	"not a balance at all",
	"v1|-3|100|0|100|USD|0",
	"v1|007|100|0|100|USD|0",
	"v2|1|100|0|100|USD|0",
	"v1|1|99999999999999999999|0|1|USD|0",
	"",
}

// plantGarbage writes unparsable values for a few accounts.
func (r *runner) plantGarbage(ctx context.Context, rng *rand.Rand) (string, error) {
	var desc []string
	for i := 0; i < 3; i++ {
		a := r.pools.all[rng.IntN(len(r.pools.all))]
		if i == 0 {
			cur := r.pools.currencies[rng.IntN(len(r.pools.currencies))]
			a = r.pools.hot[cur][rng.IntN(len(r.pools.hot[cur]))]
		}
		val := garbageValues[rng.IntN(len(garbageValues))]
		ttl := r.plantTTL(rng)
		if err := r.rdb.Set(ctx, r.keyPrefix+a.ID, val, ttl).Err(); err != nil {
			return "", err
		}
		r.hist.AddPlant(Plant{Account: a.ID, Garbage: true, At: time.Now(), TTL: ttl})
		desc = append(desc, fmt.Sprintf("%s=%q", short(a.ID), val))
	}
	return "garbage planted: " + strings.Join(desc, " "), nil
}

// short is the distinctive tail of a UUIDv7 (its head is a timestamp).
func short(id string) string {
	if len(id) > 8 {
		return id[len(id)-8:]
	}
	return id
}
