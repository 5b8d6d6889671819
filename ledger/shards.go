package ledger

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/store"
)

// Sharded system accounts (docs/ARCHITECTURE.md, "Sharded system
// accounts"): every REVENUE and FUNDING account is backed by shard rows,
// each a real ledger account, and each committer posts to its own shard, so
// concurrent batches never wait for one revenue row. The account's balance
// is the sum of its shards.

// Defaults for sharding. Each has a tallyd flag.
const (
	// SystemShardsDefault is how many shards a system account gets (its own
	// row included): enough for the committers of a few tallyd processes
	// to each post to a shard of their own (bench/sweep.sh,
	// docs/PERFORMANCE.md).
	SystemShardsDefault = 8
	// AccountFactsMaxDefault bounds the accounts whose unchanging facts
	// (currency, type, shards) the ledger remembers for planning locks.
	AccountFactsMaxDefault = 100_000
	// shardListTTL is how long the remembered shard list of an account is
	// used before it is read again, so shards another process added are
	// picked up. A short list is never wrong, only less spread.
	shardListTTL = time.Minute
	// shardRetryInterval is how soon shards that could not be added yet
	// (a previous release still connected) are tried again.
	shardRetryInterval = 5 * time.Second
)

// directory remembers facts that never change: an account's currency, type
// and shard list (which only grows), and each currency's default system
// accounts with their shards.
type directory struct {
	mu     sync.RWMutex
	facts  map[uuid.UUID]factsEntry
	max    int
	system map[string]systemShards
}

type factsEntry struct {
	store.AccountFacts
	readAt time.Time
}

// systemShards are a currency's default revenue and funding accounts, each
// as its shard list (the account's own id first). complete is false when
// shards could not be added yet; they are then tried again in the
// background (widenSystem).
type systemShards struct {
	revenue, funding []uuid.UUID
	complete         bool
	at               time.Time
}

func newDirectory(max int) *directory {
	if max <= 0 {
		max = AccountFactsMaxDefault
	}
	return &directory{facts: map[uuid.UUID]factsEntry{}, max: max, system: map[string]systemShards{}}
}

// lookup returns the facts of id if they are remembered and current.
func (d *directory) lookup(id uuid.UUID) (store.AccountFacts, bool) {
	d.mu.RLock()
	e, ok := d.facts[id]
	d.mu.RUnlock()
	if !ok || (e.Shards != nil && time.Since(e.readAt) > shardListTTL) {
		return store.AccountFacts{}, false
	}
	return e.AccountFacts, true
}

// remember stores facts read from PostgreSQL. When full it forgets
// everything (facts are cheap to read again) rather than track recency on
// the hot path.
func (d *directory) remember(fs map[uuid.UUID]store.AccountFacts) {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.facts)+len(fs) > d.max {
		d.facts = make(map[uuid.UUID]factsEntry, len(fs))
	}
	for id, f := range fs {
		d.facts[id] = factsEntry{AccountFacts: f, readAt: now}
	}
}

// customer reports whether id is known to be a CUSTOMER account (whose
// balance one row holds, and which is cached).
func (d *directory) customer(id uuid.UUID) bool {
	d.mu.RLock()
	e, ok := d.facts[id]
	d.mu.RUnlock()
	return ok && AccountType(e.Type) == AccountTypeCustomer
}

// rememberType records an account's currency and type learned from a
// read; what a batch read already (its shards too) is kept.
func (d *directory) rememberType(id uuid.UUID, currency string, t int16) {
	d.mu.RLock()
	_, ok := d.facts[id]
	d.mu.RUnlock()
	if !ok && AccountType(t) == AccountTypeCustomer {
		d.remember(map[uuid.UUID]store.AccountFacts{id: {ID: id, Currency: currency, Type: t}})
	}
}

// systemOf returns the currency's default system accounts, if known.
func (d *directory) systemOf(currency string) (systemShards, bool) {
	d.mu.RLock()
	s, ok := d.system[currency]
	d.mu.RUnlock()
	return s, ok
}

func (d *directory) setSystem(currency string, s systemShards) {
	d.mu.Lock()
	d.system[currency] = s
	d.mu.Unlock()
}

// pickShard returns the shard a committer posts to: committers of one
// process use distinct shards, and each process starts at its own random
// offset so several processes spread over the shards too.
func (l *Ledger) pickShard(shards []uuid.UUID, lane int) uuid.UUID {
	return shards[(l.shardOffset+lane)%len(shards)]
}

// ensureShards gives a REVENUE or FUNDING account its configured number of
// shards, and returns them; complete is false when none could be added
// because a tallyd of a release that does not know shards is still
// connected (the existing shards are returned). It runs outside any batch
// transaction.
func (l *Ledger) ensureShards(ctx context.Context, id uuid.UUID) (shards []uuid.UUID, complete bool, err error) {
	if l.systemShards > 1 && !l.shardsAllowed(ctx) {
		shards, err := l.st.Shards(ctx, id)
		return shards, false, fromStore(err)
	}
	if l.cache != nil {
		// Once shards exist no one row holds the balance: forget what the
		// cache holds for the account's own row, written by a previous
		// release while it had none (this release never caches REVENUE or
		// FUNDING accounts, and no previous release is connected now).
		l.cache.Delete(ctx, id)
	}
	shards, err = l.st.AddShards(ctx, id, l.systemShards)
	if err != nil {
		return nil, false, fromStore(err)
	}
	return shards, true, nil
}

// shardsAllowed reports whether shards may be added: once no tallyd of a
// previous release is connected, from then on.
func (l *Ledger) shardsAllowed(ctx context.Context) bool {
	if l.shardGate.Load() {
		return true
	}
	old, err := l.st.PreviousReleaseConnected(ctx)
	if err != nil || old {
		if old {
			l.log.Info("not adding system-account shards while a tallyd of a previous release is connected")
		}
		return false
	}
	l.shardGate.Store(true)
	return true
}

// widenSystem tries again, in the background and at most every
// shardRetryInterval, to give a currency's default system accounts their
// shards when that could not be done before (a previous release was
// connected, or PostgreSQL did not answer). Batches meanwhile post to the
// shards already known.
func (l *Ledger) widenSystem(currency string, sys systemShards) {
	if sys.complete || l.systemShards <= 1 || time.Since(sys.at) < shardRetryInterval {
		return
	}
	if _, loaded := l.widened.LoadOrStore("system:"+currency, true); loaded {
		return
	}
	go func() {
		defer l.widened.Delete("system:" + currency)
		ctx, cancel := context.WithTimeout(context.Background(), l.batch.cfg.Timeout)
		defer cancel()
		next, err := l.loadSystemAccounts(ctx, currency)
		if err != nil {
			l.log.Debug("adding system-account shards failed; trying again later", "currency", currency, "err", err)
			next = sys
			next.at = time.Now()
		}
		l.dir.setSystem(currency, next)
	}()
}

// widenShards adds shards, in the background, to a REVENUE or FUNDING
// account created before sharding (or with fewer shards than configured),
// once per process and account. Until then batches use the shards it has.
func (l *Ledger) widenShards(id uuid.UUID) {
	if l.systemShards <= 1 {
		return
	}
	now := time.Now()
	if last, loaded := l.widened.LoadOrStore(id, now); loaded && now.Sub(last.(time.Time)) < shardRetryInterval {
		return
	}
	l.widened.Store(id, now)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), l.batch.cfg.Timeout)
		defer cancel()
		if _, _, err := l.ensureShards(ctx, id); err != nil {
			l.log.Warn("adding shards failed; posting to the existing ones", "account", id, "err", err)
		}
	}()
}

// refreshing counts the cache refreshes in flight per account. Callers are
// answered at COMMIT, before the batch's cache refresh has run: until it
// has, this process reads those accounts from PostgreSQL, so a caller that
// reads after its own write never gets the value from before it here (and
// a refresh that fails closes the cache's gate before anything is served
// again).
type refreshing struct {
	mu sync.RWMutex
	n  map[uuid.UUID]int
}

func (r *refreshing) begin(bs []cache.Balance) {
	if len(bs) == 0 {
		return
	}
	r.mu.Lock()
	if r.n == nil {
		r.n = map[uuid.UUID]int{}
	}
	for _, b := range bs {
		r.n[b.AccountID]++
	}
	r.mu.Unlock()
}

func (r *refreshing) end(bs []cache.Balance) {
	if len(bs) == 0 {
		return
	}
	r.mu.Lock()
	for _, b := range bs {
		if r.n[b.AccountID]--; r.n[b.AccountID] <= 0 {
			delete(r.n, b.AccountID)
		}
	}
	r.mu.Unlock()
}

func (r *refreshing) active(id uuid.UUID) bool {
	r.mu.RLock()
	_, ok := r.n[id]
	r.mu.RUnlock()
	return ok
}
