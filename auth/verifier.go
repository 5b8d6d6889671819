package auth

import (
	"context"
	"crypto/subtle"
	"errors"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/tallyledger/tally/store"
)

// Defaults of the verifier. Each has a tallyd flag.
const (
	// CacheTTLDefault is how long a key's row is trusted without asking
	// PostgreSQL again: a revoked key stops working within this time.
	CacheTTLDefault = 5 * time.Second
	// NegativeTTLMax bounds how long "no such key" is remembered, so a key
	// created meanwhile works soon after.
	NegativeTTLMax = time.Second
	// TouchIntervalDefault is how often last_used_at is written, in one
	// batched statement, off every call's critical path.
	TouchIntervalDefault = 10 * time.Second
	// CacheEntriesMax bounds the cache (a flood of made-up key ids cannot
	// grow it without bound).
	CacheEntriesMax = 100_000
	// LookupsMax bounds concurrent PostgreSQL look-ups of uncached keys, so
	// a flood of made-up keys holds at most this many connections.
	LookupsMax = 4
)

// Errors of Verify. ErrUnauthenticated is deliberately one error for every
// kind of bad key (missing, malformed, unknown, revoked, wrong secret), so
// a caller learns nothing about which keys exist.
var (
	ErrUnauthenticated = errors.New("auth: unauthenticated")
	// ErrUnavailable means the key could not be checked because PostgreSQL
	// did not answer: the caller may retry.
	ErrUnavailable = errors.New("auth: key store unavailable")
)

// KeyStore is what the verifier needs from the database.
type KeyStore interface {
	GetAPIKey(ctx context.Context, id string) (store.APIKey, error)
	TouchAPIKeys(ctx context.Context, used map[string]time.Time) error
}

// VerifierConfig configures NewVerifier.
type VerifierConfig struct {
	Store KeyStore
	// CacheTTL bounds how long a revoked key keeps working (default 5s).
	CacheTTL time.Duration
	// TouchInterval is how often last_used_at is flushed (default 10s).
	TouchInterval time.Duration
	Logger        *slog.Logger
}

type cached struct {
	found     bool
	hash      []byte
	principal Principal
	revoked   bool
	fetched   time.Time
}

// Verifier checks API keys against the api_keys table through a short-TTL
// in-process cache, so a call costs no PostgreSQL round trip while its key
// is cached, and records key use in batches.
type Verifier struct {
	st     KeyStore
	ttl    time.Duration
	negTTL time.Duration
	log    *slog.Logger
	now    func() time.Time

	mu    sync.Mutex
	cache map[string]cached

	sf      singleflight.Group
	lookups chan struct{}

	usedMu sync.Mutex
	used   map[string]time.Time

	stop chan struct{}
	done chan struct{}
}

// dummyHash is compared against when a key is unknown, so that path costs
// the same comparison as a wrong secret.
var dummyHash = HashSecret("tally-unknown-key")

// NewVerifier starts a verifier; Close stops it and flushes key use.
func NewVerifier(cfg VerifierConfig) *Verifier {
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = CacheTTLDefault
	}
	if cfg.TouchInterval <= 0 {
		cfg.TouchInterval = TouchIntervalDefault
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	v := &Verifier{
		st: cfg.Store, ttl: cfg.CacheTTL, negTTL: min(cfg.CacheTTL, NegativeTTLMax), log: cfg.Logger, now: time.Now,
		cache: map[string]cached{}, lookups: make(chan struct{}, LookupsMax), used: map[string]time.Time{},
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	go v.touchLoop(cfg.TouchInterval)
	return v
}

// CacheTTL is the bound on how long a revoked key keeps working.
func (v *Verifier) CacheTTL() time.Duration { return v.ttl }

// Verify checks a key as sent by a caller and returns its principal. Every
// bad key is ErrUnauthenticated; a database failure is ErrUnavailable.
func (v *Verifier) Verify(ctx context.Context, token string) (Principal, error) {
	return v.VerifyWithin(ctx, token, v.ttl)
}

// VerifyWithin is Verify trusting a cached row only when it was read from
// PostgreSQL less than maxAge ago (at most the cache TTL). Open streams
// re-check their key with it every half TTL, so a revocation reaches them
// within one TTL.
func (v *Verifier) VerifyWithin(ctx context.Context, token string, maxAge time.Duration) (Principal, error) {
	k, err := ParseKey(token)
	if err != nil {
		return Principal{}, ErrUnauthenticated
	}
	if maxAge <= 0 || maxAge > v.ttl {
		maxAge = v.ttl
	}
	c, err := v.lookup(ctx, k.ID, maxAge)
	if err != nil {
		return Principal{}, err
	}
	want := c.hash
	if !c.found {
		want = dummyHash
	}
	ok := subtle.ConstantTimeCompare(HashSecret(k.Secret), want) == 1
	if !ok || !c.found || c.revoked {
		return Principal{}, ErrUnauthenticated
	}
	v.usedMu.Lock()
	v.used[k.ID] = v.now()
	v.usedMu.Unlock()
	return c.principal, nil
}

func (v *Verifier) lookup(ctx context.Context, id string, maxAge time.Duration) (cached, error) {
	now := v.now()
	v.mu.Lock()
	c, ok := v.cache[id]
	v.mu.Unlock()
	if ok {
		ttl := maxAge
		if !c.found {
			ttl = min(maxAge, v.negTTL)
		}
		if now.Sub(c.fetched) < ttl {
			return c, nil
		}
	}
	for attempt := 0; ; attempt++ {
		c, err := v.fetch(ctx, id, now)
		if err != nil {
			return cached{}, err
		}
		// A look-up that was already in flight may have read the row before
		// this call began; never let it stretch the revocation bound.
		if attempt > 0 || now.Sub(c.fetched) < maxAge {
			return c, nil
		}
		v.sf.Forget(id)
	}
}

// fetch reads a key's row, sharing one query among concurrent callers.
// A look-up stored after the caller began (by a concurrent caller whose query
// finished just before this one joined) is as fresh as a new one, so it is
// used instead of querying again.
//
// The caller waits no longer than its ctx (the gRPC tap handler bounds it,
// since it runs on the connection's reader); the look-up itself goes on and
// fills the cache for the retry.
func (v *Verifier) fetch(ctx context.Context, id string, began time.Time) (cached, error) {
	ch := v.sf.DoChan(id, func() (any, error) {
		v.mu.Lock()
		prev, ok := v.cache[id]
		v.mu.Unlock()
		if ok && !prev.fetched.Before(began) {
			return prev, nil
		}
		select {
		case v.lookups <- struct{}{}:
		case <-ctx.Done():
			return nil, ErrUnavailable
		}
		defer func() { <-v.lookups }()
		// Detached from the caller, so that one caller going away does not
		// fail the others sharing this look-up; bounded all the same.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		fetched := v.now()
		row, err := v.st.GetAPIKey(lctx, id)
		var c cached
		switch {
		case errors.Is(err, store.ErrNotFound):
			c = cached{fetched: fetched}
		case err != nil:
			v.log.Warn("auth: cannot look up API key", "key_id", id, "err", err.Error())
			return nil, ErrUnavailable
		default:
			role, rerr := ParseRole(row.Role)
			c = cached{found: rerr == nil, hash: row.SecretHash, revoked: row.RevokedAt != nil, fetched: fetched,
				principal: Principal{ClientID: row.ClientID, KeyID: row.ID, Role: role}}
		}
		v.store(id, c)
		return c, nil
	})
	var res singleflight.Result
	select {
	case res = <-ch:
	case <-ctx.Done():
		return cached{}, ErrUnavailable
	}
	if res.Err != nil {
		return cached{}, res.Err
	}
	return res.Val.(cached), nil
}

func (v *Verifier) store(id string, c cached) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.cache) >= CacheEntriesMax {
		now := v.now()
		for k, e := range v.cache {
			if now.Sub(e.fetched) >= v.ttl {
				delete(v.cache, k)
			}
		}
		// Still full of fresh entries: drop arbitrary ones. They are only
		// looked up again.
		for k := range v.cache {
			if len(v.cache) < CacheEntriesMax/2 {
				break
			}
			delete(v.cache, k)
		}
	}
	v.cache[id] = c
}

// Forget drops a key from the cache (used after revoking it in process).
func (v *Verifier) Forget(id string) {
	v.mu.Lock()
	delete(v.cache, id)
	v.mu.Unlock()
}

func (v *Verifier) touchLoop(every time.Duration) {
	defer close(v.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			v.Flush(context.Background())
		case <-v.stop:
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			v.Flush(ctx)
			cancel()
			return
		}
	}
}

// Flush writes the recorded key use to last_used_at now. On failure the use
// is kept for the next flush.
func (v *Verifier) Flush(ctx context.Context) {
	v.usedMu.Lock()
	used := v.used
	v.used = map[string]time.Time{}
	v.usedMu.Unlock()
	if len(used) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := v.st.TouchAPIKeys(ctx, used); err != nil {
		v.log.Warn("auth: cannot record key use; will retry", "keys", len(used), "err", err.Error())
		v.usedMu.Lock()
		for id, at := range used {
			if cur, ok := v.used[id]; !ok || cur.Before(at) {
				v.used[id] = at
			}
		}
		v.usedMu.Unlock()
	}
}

// Close stops the flush loop after a last flush.
func (v *Verifier) Close() {
	select {
	case <-v.stop:
	default:
		close(v.stop)
	}
	<-v.done
}
