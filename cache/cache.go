// Package cache is Tally's Redis read-through cache for account balances.
//
// PostgreSQL is the only source of truth. Redis only saves a PostgreSQL read,
// and this package is built so that losing Redis in any way (flushed, crashed,
// restarted empty, partitioned, slow, read-only, holding stale or garbage
// values) can make a balance read slower but can never make it wrong in a way
// the promise below does not allow, and can never fail a caller.
//
// The promise: a cached read returns a (version, balance) pair that really
// existed in PostgreSQL and is at most TTL old. It follows from these rules:
//
//   - Values are written only by Put, from a pair the caller read from or
//     wrote to PostgreSQL, and Put is a compare-and-set on version run inside
//     Redis (Lua), so an older pair can never overwrite a newer one: a slow
//     reader that fills v5 after a writer stored v6 loses.
//   - Every write carries a PX expiry of at most TTL, counted from the pair's
//     AsOf, and Get reads value and remaining TTL atomically (one round
//     trip, MULTI PTTL GET EXEC, no script) and refuses (and deletes) an
//     entry without expiry or with a longer one than TTL, so even a value
//     planted by hand cannot outlive the bound.
//   - Anything Get cannot parse completely is a miss, never an error.
//   - Every Redis call is bounded by OpTimeout, without retries, and a
//     circuit breaker stops calling Redis for BreakerCooldown after
//     FailuresMax consecutive failures, so a slow or dead Redis costs a read at
//     most about OpTimeout, and usually nothing.
//   - A failed Put counts as a failure too: a Redis that can still be read but
//     no longer written (for example turned read-only) would otherwise keep
//     serving balances it can no longer update, so once the breaker is open
//     Get bypasses Redis as well.
//   - More than that, one write (Put, Delete or probe) that does not reach
//     Redis, for any reason, stops Get at once (see writeGate): successful
//     reads do not undo it, only a later successful write does. Each
//     process also writes a probe key of its own every ProbeInterval, so it
//     notices a Redis that stopped taking writes within about ProbeInterval +
//     OpTimeout even if it writes nothing else, and stops serving values
//     another process could not update.
//
// Nothing in this package returns an error to the read path: every problem
// turns into a miss, and the caller reads PostgreSQL.
package cache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// Defaults for the zero fields of Config.
const (
	// opTimeoutDefault bounds one Redis call. A cache read that costs more
	// than a PostgreSQL read is worse than no cache, so it is short.
	opTimeoutDefault = 50 * time.Millisecond
	// ttlDefault is how old a cached pair may ever be.
	ttlDefault = 60 * time.Second
	// failuresMaxDefault is how many consecutive failures open the breaker.
	failuresMaxDefault = 5
	// breakerCooldownDefault is how long Redis is bypassed once the breaker
	// opened, before a probe is let through.
	breakerCooldownDefault = 5 * time.Second
	// keyPrefixDefault namespaces balance keys in a shared Redis. Probe
	// keys live under it too, as prefix + "probe:" + a random process ID,
	// which never looks like an account's UUID.
	keyPrefixDefault = "tally:bal:"
	// dialTimeoutMax caps the connect timeout of background dials (go-redis
	// reconnects outside any caller's context).
	dialTimeoutMax = time.Second
)

// valueFormat is the tag of the current value encoding; a value with any
// other tag is a miss, so the encoding can change without a flush.
const valueFormat = "v2"

// Balance is one cached (version, balance) pair of an account.
type Balance struct {
	AccountID   uuid.UUID
	Currency    string
	Balance     int64
	CreditLimit int64
	Available   int64
	Version     int64
	AsOf        time.Time // when this pair was read from / written to PostgreSQL
	// Held is the sum of the account's unexpired holds at AsOf.
	Held int64
	// ServeUntil, when set, is when the value stops being valid before its
	// TTL: shortly before the account's next hold expires, since the expiry
	// frees funds without changing the version.
	ServeUntil time.Time
}

// Config configures a Cache. Zero fields take the defaults noted.
type Config struct {
	URL             string        // redis://host:port/db, redis-sentinel://h1,h2/master, redis-cluster://h1,h2 (see newClient)
	OpTimeout       time.Duration // per Redis call; default 50ms
	TTL             time.Duration // default 60s
	FailuresMax     int           // consecutive failures before the breaker opens; default 5
	BreakerCooldown time.Duration // how long the cache is bypassed once open; default 5s
	KeyPrefix       string        // default "tally:bal:"
	// ProbeInterval is how often the probe key is written; default 250ms,
	// negative: no probe (tests that count every Redis call).
	ProbeInterval time.Duration
	Logger        *slog.Logger // default slog.Default()
}

// Status is the health of the cache as shown to operators and health checks.
// A degraded cache is not an error for Tally: reads go to PostgreSQL.
type Status struct {
	State  string // "ok" or "degraded"
	Detail string // human-readable reason when degraded
}

// Status states.
const (
	// StateOK means Redis answers and the breaker is closed.
	StateOK = "ok"
	// StateDegraded means the breaker is not closed or calls failed
	// recently; reads are (partly) served by PostgreSQL.
	StateDegraded = "degraded"
)

// Cache is the Redis read-through balance cache. It is safe for concurrent
// use. Its methods never return errors: every problem is a miss or a no-op.
type Cache struct {
	client    redis.UniversalClient
	topology  string // TopologySingle, TopologySentinel or TopologyCluster
	opTimeout time.Duration
	ttl       time.Duration
	prefix    string
	log       *slog.Logger
	breaker   *gobreaker.CircuitBreaker[any]
	// breakerClosed mirrors "the breaker is closed", set by onStateChange
	// (which gobreaker calls under its lock on every transition), so that
	// Get checks the breaker without taking that lock.
	breakerClosed atomic.Bool
	// readFailures is set when a failed read was reported to the breaker,
	// so that the next successful read reports a success (resetting the
	// consecutive failures, as a successful call always did) and all
	// other successful reads skip the breaker's lock.
	readFailures atomic.Bool

	mu      sync.Mutex
	lastErr string // last failure, for Status

	gate        *writeGate
	probeKey    string
	probeKeyTTL time.Duration
	stop        chan struct{} // closed by Close
	probeDone   chan struct{} // closed when the probe loop returned
	closeOnce   sync.Once

	// Counters for Stats (metrics).
	hits, misses, errs, bypassed atomic.Int64
}

// Stats counts what the cache did since New, for metrics. A Get is a hit, a
// miss (absent, unparsable or refused entry), a bypass (breaker not closed)
// or an error (or, rarely, abandoned by its caller); Errors counts failed
// Redis calls of any kind (Get, Put, Delete), and Bypassed also counts Puts
// and Deletes skipped while the breaker was open.
type Stats struct {
	Hits, Misses, Errors, Bypassed int64
	// Breaker is the circuit breaker's state: "closed", "half-open" or "open".
	Breaker string
	// NotServing is true while a missed write keeps Get off Redis.
	NotServing bool
}

// Stats returns the cache's counters and breaker state.
func (c *Cache) Stats() Stats {
	return Stats{
		Hits: c.hits.Load(), Misses: c.misses.Load(), Errors: c.errs.Load(), Bypassed: c.bypassed.Load(),
		Breaker: c.breaker.State().String(), NotServing: !c.gate.open(),
	}
}

// cleanScript deletes KEYS[1] if it is still an entry Get must refuse:
// without expiry or with a longer one than the configured TTL (ARGV[1], ms),
// or a key of another type (GET fails with WRONGTYPE). Such an entry was not
// written by Put and could break the age bound. It runs only after Get's
// plain read saw such an entry, and checks again inside Redis so that a
// fresh value Put stored in between is never deleted. A read-only Redis
// refuses the DEL with READONLY: that counts toward the breaker, which is
// what we want from a Redis that can no longer be kept up to date. Deleting
// garbage of another type rather than only skipping it keeps the key from
// failing every read until its TTL. Returns 1 if deleted.
var cleanScript = redis.NewScript(`
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then
  redis.call('DEL', KEYS[1])
  return 1
end
if not v then return 0 end
local t = redis.call('PTTL', KEYS[1])
if t == -1 or t > tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`)

// putScript sets KEYS[1] to ARGV[1] with PX ARGV[3] unless the current value
// parses and has a version >= ARGV[2]. Versions are compared as canonical
// decimal strings (no sign, no leading zeros, at most int64), not as Lua
// numbers, which are doubles and would lose precision above 2^53. The
// script's idea of "parses" is the same shape as decode's and at most looser
// (it does not range-check the other numbers), never stricter: so a value
// Get would serve is never overwritten by an older one, while garbage is
// overwritten, and so is a key of another type (GET fails with WRONGTYPE;
// SET replaces it). Returns 1 if set, 0 if kept.
var putScript = redis.NewScript(`
local function canon(s)
  if not s then return nil end
  if #s > 1 and string.sub(s, 1, 1) == '0' then return nil end
  if #s > 19 or (#s == 19 and s > '9223372036854775807') then return nil end
  return s
end
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' then
  local cv = canon(string.match(cur, '^v2|(%d+)|%-?%d+|%-?%d+|%-?%d+|[^|]+|%-?%d+|%d+|%-?%d+$'))
  if cv then
    local nv = ARGV[2]
    if #cv > #nv or (#cv == #nv and cv >= nv) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
`)

// New returns a Cache for cfg. It does not need Redis to be up: a Redis that
// is down only makes the cache start degraded. It fails only on a bad config
// (an unparsable URL).
func New(cfg Config) (*Cache, error) {
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = opTimeoutDefault
	}
	if cfg.TTL <= 0 {
		cfg.TTL = ttlDefault
	}
	if cfg.FailuresMax <= 0 {
		cfg.FailuresMax = failuresMaxDefault
	}
	if cfg.BreakerCooldown <= 0 {
		cfg.BreakerCooldown = breakerCooldownDefault
	}
	if cfg.KeyPrefix == "" {
		cfg.KeyPrefix = keyPrefixDefault
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ProbeInterval == 0 {
		cfg.ProbeInterval = ProbeIntervalDefault
	}
	// The client's own timeouts and retries are overridden whatever the
	// URL says: they are what bounds the cost of a sick Redis. go-redis
	// ignores context deadlines on socket I/O unless ContextTimeoutEnabled
	// is set, and by default retries a timed-out command 3 times and
	// redials 5 times; each would multiply the cost of a read that should
	// have gone to PostgreSQL long ago. See newClient for the URL forms
	// (single node, Sentinel group, Cluster).
	client, topology, err := newClient(cfg.URL, clientLimits{
		opTimeout: cfg.OpTimeout, dialTimeout: min(2*cfg.OpTimeout, dialTimeoutMax),
	})
	if err != nil {
		return nil, err
	}

	c := &Cache{
		client:    client,
		topology:  topology,
		opTimeout: cfg.OpTimeout,
		ttl:       cfg.TTL,
		prefix:    cfg.KeyPrefix,
		log:       cfg.Logger.With("component", "cache"),
		gate:      newWriteGate(),
		probeKey:  ProbeKeyPrefix(cfg.KeyPrefix) + uuid.NewString(),
		stop:      make(chan struct{}),
		probeDone: make(chan struct{}),
	}
	c.probeKeyTTL = max(4*cfg.ProbeInterval, probeKeyTTLMin)
	failuresMax := uint32(cfg.FailuresMax)
	c.breakerClosed.Store(true) // gobreaker starts closed
	c.breaker = gobreaker.NewCircuitBreaker[any](gobreaker.Settings{
		Name:        "redis-balance-cache",
		MaxRequests: 1, // one probe at a time when half-open
		Timeout:     cfg.BreakerCooldown,
		ReadyToTrip: func(n gobreaker.Counts) bool {
			return n.ConsecutiveFailures >= failuresMax
		},
		// A miss is Redis working as intended, not a failure.
		IsSuccessful: func(err error) bool { return err == nil || errors.Is(err, redis.Nil) },
		// The caller giving up says nothing about Redis.
		IsExcluded:    func(err error) bool { return errors.Is(err, errCallerGone) },
		OnStateChange: c.onStateChange,
	})

	// Find out now whether Redis is there and takes writes, so Status is
	// honest and a Redis turned read-only is not served from the start; a
	// failure here counts toward the breaker like any other.
	c.probe()
	if cfg.ProbeInterval > 0 {
		go c.probeLoop(cfg.ProbeInterval)
	} else {
		close(c.probeDone)
	}
	return c, nil
}

// errCallerGone marks a call abandoned because the caller's own context
// ended; it is excluded from the breaker's counts.
var errCallerGone = errors.New("cache: caller context done")

// onStateChange logs breaker transitions: these, not individual failures,
// are what an operator needs to see. It runs under the breaker's lock, so it
// must not call back into the breaker.
func (c *Cache) onStateChange(_ string, from, to gobreaker.State) {
	c.breakerClosed.Store(to == gobreaker.StateClosed)
	switch to {
	case gobreaker.StateOpen:
		c.log.Warn("redis cache breaker open: bypassing Redis",
			"from", from.String(), "last_error", c.lastError())
	case gobreaker.StateHalfOpen:
		c.log.Info("redis cache breaker half-open: probing Redis")
	case gobreaker.StateClosed:
		c.log.Info("redis cache breaker closed: Redis back in use", "from", from.String())
	}
}

// do runs fn through the breaker with a context bounded by OpTimeout. It
// returns gobreaker.ErrOpenState / ErrTooManyRequests without calling fn when
// Redis is being bypassed.
func (c *Cache) do(ctx context.Context, fn func(ctx context.Context) error) error {
	if ctx.Err() != nil {
		return errCallerGone
	}
	_, err := c.breaker.Execute(func() (any, error) {
		opCtx, cancel := context.WithTimeout(ctx, c.opTimeout)
		defer cancel()
		err := fn(opCtx)
		if err != nil && !errors.Is(err, redis.Nil) {
			if errors.Is(ctx.Err(), context.Canceled) {
				// The caller hung up; that says nothing about Redis. (A
				// caller deadline shorter than OpTimeout still counts: a
				// healthy Redis answers well within it.)
				return nil, errCallerGone
			}
			c.setLastError(err)
			c.errs.Add(1)
		}
		return nil, err
	})
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		c.bypassed.Add(1)
	}
	return err
}

// key is prefix + id.String(), built with one allocation: it is on the
// path of every read.
func (c *Cache) key(id uuid.UUID) string {
	var hex [36]byte
	encodeUUID(&hex, id)
	var sb strings.Builder
	sb.Grow(len(c.prefix) + len(hex))
	sb.WriteString(c.prefix)
	sb.Write(hex[:])
	return sb.String()
}

// encodeUUID writes id in the canonical 8-4-4-4-12 lower-case form, as
// uuid.UUID.String does.
func encodeUUID(dst *[36]byte, id uuid.UUID) {
	const digits = "0123456789abcdef"
	j := 0
	for i, x := range id {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			dst[j] = '-'
			j++
		}
		dst[j], dst[j+1] = digits[x>>4], digits[x&0x0f]
		j += 2
	}
}

// opContext bounds one Redis call by OpTimeout: the single timeout layer of
// a read. A caller's deadline that comes sooner is used as it is.
func (c *Cache) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	d := time.Now().Add(c.opTimeout)
	if dl, ok := ctx.Deadline(); ok && !dl.After(d) {
		return ctx, func() {}
	}
	return context.WithDeadline(ctx, d)
}

// ProbeKeyPrefix is where, under the balance key prefix, each tallyd's
// probe key lives (probe.go). Tools that scan the prefix for balances skip
// keys that start with it: their values are not balances.
func ProbeKeyPrefix(prefix string) string { return prefix + "probe:" }

// Get returns the cached pair of account id. ok is false on a miss and on
// every kind of trouble (garbage value, entry without a proper expiry, Redis
// error or timeout, breaker open): the caller then reads PostgreSQL.
//
// A hit costs one round trip of plain commands, MULTI PTTL GET EXEC: the
// transaction reads the value and its remaining time to live atomically, as
// one Redis step, so the expiry checked is the served value's own (in a
// plain pipeline another client's SET could come between the two). The
// checks are then made here: an entry without expiry or with a longer one
// than TTL was not written by Put and could break the age bound, so it is
// refused (and deleted by cleanScript, on that rare path only); so is a
// value older than TTL by its AsOf, past its ServeUntil, below the gate's
// floor or unparsable. No lock is taken on a hit: the gate and the breaker
// are read from atomics, and the breaker hears of a read only when it
// failed, and of the first success after that.
func (c *Cache) Get(ctx context.Context, id uuid.UUID) (b Balance, ok bool) {
	// Only a successful write may close the breaker: while it is half-open,
	// reads stay off Redis and the next Put is the probe. Otherwise a Redis
	// that still answers reads but refuses writes (a read-only replica) would
	// pass a read probe and go back to serving balances it can no longer
	// update.
	if !c.serving() {
		c.bypassed.Add(1)
		return Balance{}, false
	}
	if ctx.Err() != nil {
		return Balance{}, false // the caller is gone: says nothing about Redis
	}
	key := c.key(id)
	opCtx, cancel := c.opContext(ctx)
	p := c.client.TxPipeline()
	ttlCmd := p.PTTL(opCtx, key)
	getCmd := p.Get(opCtx, key)
	_, _ = p.Exec(opCtx)
	cancel()
	if err := ttlCmd.Err(); err != nil {
		c.readFailed(ctx, err)
		return Balance{}, false
	}
	raw, err := getCmd.Result()
	switch {
	case errors.Is(err, redis.Nil):
		c.misses.Add(1)
		return Balance{}, false
	case err != nil && strings.HasPrefix(err.Error(), "WRONGTYPE"):
		// A key of another type (a hash, a list) is garbage: a miss, not a
		// failure that would count toward the breaker, and deleted so
		// that it does not fail every read until its TTL.
		c.clean(ctx, key)
		c.misses.Add(1)
		return Balance{}, false
	case err != nil:
		c.readFailed(ctx, err)
		return Balance{}, false
	}
	if pttl := ttlCmd.Val(); pttl < 0 || pttl > c.ttl {
		// -1: no expiry; above TTL: longer than Put ever sets (-2, gone,
		// cannot come with a value from the same transaction). Never
		// served, and removed.
		c.clean(ctx, key)
		c.misses.Add(1)
		return Balance{}, false
	}
	if !c.gate.open() {
		// A write failed while this read was in flight: what it read may
		// be the value that write could not replace.
		c.bypassed.Add(1)
		return Balance{}, false
	}
	b, err = decode(raw)
	if err != nil {
		// Garbage is a miss. It is left for Put to overwrite (the CAS
		// treats unparsable values as absent) or for its TTL to remove.
		c.log.Debug("unparsable cache value", "account", id, "err", err)
		c.misses.Add(1)
		return Balance{}, false
	}
	b.AccountID = id
	now := time.Now()
	if !b.AsOf.IsZero() && now.Sub(b.AsOf) >= c.ttl {
		// Older than TTL by its own stamp: Put gave it an expiry that has
		// run out by this process's clock (Redis's may lag). A miss; its
		// expiry removes it.
		c.misses.Add(1)
		return Balance{}, false
	}
	if c.gate.refuses(b.AsOf) {
		// Stored before Redis last stopped taking writes: it may have
		// missed an update. Delete it so a refill of the same version is
		// not refused by the compare-and-set.
		c.Delete(ctx, id)
		c.misses.Add(1)
		return Balance{}, false
	}
	if !b.ServeUntil.IsZero() && !now.Before(b.ServeUntil) {
		// A hold of the account may have expired since: a miss. Delete it
		// so the next Put of the same version (with a later ServeUntil) is
		// not refused by the compare-and-set.
		c.Delete(ctx, id)
		c.misses.Add(1)
		return Balance{}, false
	}
	c.hits.Add(1)
	if c.readFailures.Load() && c.readFailures.Swap(false) && c.breakerClosed.Load() {
		// Only while closed: a read must never be the half-open trial
		// that closes the breaker (a successful write must).
		_, _ = c.breaker.Execute(func() (any, error) { return nil, nil })
	}
	return b, true
}

// readFailed counts a failed read, for Stats and Status and toward the
// breaker, unless the caller hung up (that says nothing about Redis; a
// caller deadline shorter than OpTimeout still counts: a healthy Redis
// answers well within it). Failures go through the breaker's lock; of the
// successful reads only the first after a failure does (see Get).
func (c *Cache) readFailed(ctx context.Context, err error) {
	if errors.Is(ctx.Err(), context.Canceled) {
		return
	}
	c.setLastError(err)
	c.errs.Add(1)
	_, _ = c.breaker.Execute(func() (any, error) { return nil, err })
	c.readFailures.Store(true)
}

// clean deletes the entry at key if Redis still holds one Get must refuse
// (see cleanScript). Its failure counts toward the breaker like any Redis
// call; it is not a cache write for the gate: the entry it leaves is
// refused by every Get anyway.
func (c *Cache) clean(ctx context.Context, key string) {
	_ = c.do(ctx, func(ctx context.Context) error {
		return cleanScript.Run(ctx, c.client, []string{key}, c.ttl.Milliseconds()).Err()
	})
}

// Put stores b unless Redis already holds the same or a newer version of the
// account (compare-and-set inside Redis). The entry expires TTL after b.AsOf
// (or after now if AsOf is zero), so its age is bounded from the moment it
// was read from PostgreSQL, not from the moment a slow reader got around to
// caching it; a pair already older than TTL is not stored at all. Errors,
// including a read-only Redis, count toward the breaker.
func (c *Cache) Put(ctx context.Context, b Balance) {
	val, err := encode(b)
	if err != nil {
		c.log.Debug("not caching invalid balance", "account", b.AccountID, "err", err)
		return
	}
	ttl := c.ttl
	if !b.AsOf.IsZero() {
		ttl = min(c.ttl-time.Since(b.AsOf), c.ttl)
		if ttl < time.Millisecond {
			return
		}
	}
	start := time.Now()
	err = c.do(ctx, func(ctx context.Context) error {
		return putScript.Run(ctx, c.client, []string{c.key(b.AccountID)},
			val, strconv.FormatInt(b.Version, 10), ttl.Milliseconds()).Err()
	})
	c.afterWrite(&b.AccountID, start, err)
}

// PutMany stores every balance of bs as Put would, in one pipelined round
// trip: the cache refresh after a group-committed batch. Each value keeps
// Put's compare-and-set on version and its expiry from AsOf; each write's
// failure counts against the gate exactly as a failed Put does.
func (c *Cache) PutMany(ctx context.Context, bs []Balance) {
	type put struct {
		id  uuid.UUID
		key string
		val string
		ver string
		ttl int64
	}
	puts := make([]put, 0, len(bs))
	for _, b := range bs {
		val, err := encode(b)
		if err != nil {
			c.log.Debug("not caching invalid balance", "account", b.AccountID, "err", err)
			continue
		}
		ttl := c.ttl
		if !b.AsOf.IsZero() {
			ttl = min(c.ttl-time.Since(b.AsOf), c.ttl)
			if ttl < time.Millisecond {
				continue
			}
		}
		puts = append(puts, put{b.AccountID, c.key(b.AccountID), val, strconv.FormatInt(b.Version, 10), ttl.Milliseconds()})
	}
	if len(puts) == 0 {
		return
	}
	start := time.Now()
	cmds := make([]*redis.Cmd, len(puts))
	send := func(ctx context.Context) error {
		_, err := c.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, u := range puts {
				cmds[i] = putScript.EvalSha(ctx, p, []string{u.key}, u.val, u.ver, u.ttl)
			}
			return nil
		})
		return err
	}
	err := c.do(ctx, func(ctx context.Context) error {
		err := send(ctx)
		if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
			// First use on this Redis (or after a restart emptied it):
			// load the script, then send the pipeline once more.
			if err := putScript.Load(ctx, c.client).Err(); err != nil {
				return err
			}
			err = send(ctx)
		}
		return err
	})
	for i := range puts {
		werr := err
		if werr == nil && cmds[i] != nil {
			werr = cmds[i].Err()
		}
		c.afterWrite(&puts[i].id, start, werr)
	}
}

// Delete removes the cached pair of account id, best-effort. While the
// breaker is open it does nothing; like a failed Delete, that closes the
// gate (the entry it meant to remove is still there) and leaves the entry
// for the probe to delete once Redis takes writes again.
func (c *Cache) Delete(ctx context.Context, id uuid.UUID) {
	start := time.Now()
	err := c.do(ctx, func(ctx context.Context) error {
		return c.client.Del(ctx, c.key(id)).Err()
	})
	c.afterWrite(&id, start, err)
}

// serving reports whether Get may read Redis: the breaker is closed and no
// write has been missed since the last successful one. Only a successful
// write closes the breaker or reopens the gate: while the breaker is
// half-open, reads stay off Redis and the next write is the probe.
func (c *Cache) serving() bool {
	return c.gate.open() && c.breakerClosed.Load()
}

// Status reports whether the cache is in use. It is degraded while a missed
// write keeps cached balances from being served, while the breaker is open
// or half-open, and while the last call(s) failed.
func (c *Cache) Status() Status {
	var parts []string
	if reason, pending := c.gate.state(); reason != "" {
		s := "not serving cached balances: " + reason
		if pending > 0 {
			s += fmt.Sprintf(" (%d entries to delete once Redis takes writes)", pending)
		}
		parts = append(parts, s)
	}
	st := c.breaker.State()
	n := c.breaker.Counts()
	switch {
	case st == gobreaker.StateOpen:
		parts = append(parts, "breaker open, bypassing Redis: "+c.lastError())
	case st == gobreaker.StateHalfOpen:
		parts = append(parts, "breaker half-open, probing Redis: "+c.lastError())
	case n.ConsecutiveFailures > 0:
		parts = append(parts, fmt.Sprintf("%d consecutive Redis failures: %s", n.ConsecutiveFailures, c.lastError()))
	}
	if len(parts) == 0 {
		return Status{State: StateOK}
	}
	return Status{State: StateDegraded, Detail: strings.Join(parts, "; ")}
}

// Client returns the underlying Redis client, for tests and tools. Commands
// issued on it bypass the breaker and the value checks.
func (c *Cache) Client() redis.UniversalClient { return c.client }

// Topology returns which kind of Redis deployment the URL named:
// TopologySingle, TopologySentinel or TopologyCluster.
func (c *Cache) Topology() string { return c.topology }

// Close stops the probe and releases the Redis connections.
func (c *Cache) Close() error {
	c.closeOnce.Do(func() { close(c.stop) })
	<-c.probeDone
	return c.client.Close()
}

func (c *Cache) setLastError(err error) {
	c.mu.Lock()
	c.lastErr = err.Error()
	c.mu.Unlock()
}

func (c *Cache) lastError() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

// encode renders b as
// v2|version|balance|credit_limit|available|currency|asof_unix_nanos|held|serve_until_unix_nanos.
// The account ID is not stored: the key already names it.
func encode(b Balance) (string, error) {
	if b.Version < 0 {
		return "", fmt.Errorf("negative version %d", b.Version)
	}
	if b.Currency == "" || strings.ContainsAny(b.Currency, "|") {
		return "", fmt.Errorf("bad currency %q", b.Currency)
	}
	var asOf, until int64
	if !b.AsOf.IsZero() {
		asOf = b.AsOf.UnixNano()
	}
	if !b.ServeUntil.IsZero() {
		until = b.ServeUntil.UnixNano()
	}
	// 8 numbers of at most 20 bytes, 9 separators and the tag fit in 192
	// bytes unless the currency is long; the buffer grows if it is.
	var buf [192]byte
	out := append(buf[:0], valueFormat...)
	for _, n := range [...]int64{b.Version, b.Balance, b.CreditLimit, b.Available} {
		out = strconv.AppendInt(append(out, '|'), n, 10)
	}
	out = append(append(out, '|'), b.Currency...)
	for _, n := range [...]int64{asOf, b.Held, until} {
		out = strconv.AppendInt(append(out, '|'), n, 10)
	}
	return string(out), nil
}

// decode parses what encode wrote, strictly: every number must be in the
// canonical form encode produces (see canonicalInt), so that the Lua CAS and
// decode agree on which values are valid.
func decode(s string) (Balance, error) {
	var f [9]string
	rest := s
	for i := range f {
		if i == len(f)-1 {
			if strings.IndexByte(rest, '|') >= 0 {
				return Balance{}, errors.New("not a " + valueFormat + " value")
			}
			f[i] = rest
			break
		}
		var ok bool
		f[i], rest, ok = strings.Cut(rest, "|")
		if !ok {
			return Balance{}, errors.New("not a " + valueFormat + " value")
		}
	}
	if f[0] != valueFormat {
		return Balance{}, errors.New("not a " + valueFormat + " value")
	}
	var n [7]int64
	for i, idx := range [...]int{1, 2, 3, 4, 6, 7, 8} {
		v, ok := canonicalInt(f[idx])
		if !ok {
			return Balance{}, fmt.Errorf("field %d: bad integer %q", idx, f[idx])
		}
		n[i] = v
	}
	if n[0] < 0 {
		return Balance{}, fmt.Errorf("negative version %d", n[0])
	}
	if f[5] == "" {
		return Balance{}, errors.New("empty currency")
	}
	b := Balance{
		Version:     n[0],
		Balance:     n[1],
		CreditLimit: n[2],
		Available:   n[3],
		Currency:    f[5],
	}
	if n[4] != 0 {
		b.AsOf = time.Unix(0, n[4]).UTC()
	}
	if n[5] < 0 {
		return Balance{}, fmt.Errorf("negative held %d", n[5])
	}
	b.Held = n[5]
	if n[6] != 0 {
		b.ServeUntil = time.Unix(0, n[6]).UTC()
	}
	return b, nil
}

// canonicalInt parses s as a decimal int64 and accepts it only in the form
// strconv.FormatInt gives: no '+', no leading zeros, no "-0". It is the same
// as ParseInt followed by FormatInt(v) == s, without the allocation.
func canonicalInt(s string) (int64, bool) {
	if s == "" || s[0] == '+' {
		return 0, false
	}
	digits := s
	if s[0] == '-' {
		digits = s[1:]
	}
	if len(digits) > 1 && digits[0] == '0' || s == "-0" {
		return 0, false
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, false
	}
	return v, true
}

// Peek reads the cached values of many accounts in one round trip (MGET),
// for reconciliation: it returns the values Get could serve right now
// (parsable, not past ServeUntil), without deleting or counting anything.
// Any trouble returns what was read so far, possibly nothing.
func (c *Cache) Peek(ctx context.Context, ids []uuid.UUID) map[uuid.UUID]Balance {
	out := map[uuid.UUID]Balance{}
	if len(ids) == 0 || !c.serving() {
		return out
	}
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = c.key(id)
	}
	var vals []any
	_ = c.do(ctx, func(ctx context.Context) error {
		var err error
		vals, err = c.client.MGet(ctx, keys...).Result()
		return err
	})
	now := time.Now()
	for i, v := range vals {
		s, ok := v.(string)
		if !ok || i >= len(ids) {
			continue
		}
		b, err := decode(s)
		if err != nil || c.gate.refuses(b.AsOf) || (!b.ServeUntil.IsZero() && !now.Before(b.ServeUntil)) {
			continue
		}
		b.AccountID = ids[i]
		out[ids[i]] = b
	}
	return out
}
