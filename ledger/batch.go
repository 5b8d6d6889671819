package ledger

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/store"
)

// Group commit: concurrent Charge, Credit and Transfer calls that arrive
// within a short window are applied in one PostgreSQL transaction, so the
// commit flush and the row-lock hand-offs are paid once per batch instead of
// once per call. Each call keeps exactly the outcome it would have had if the
// batch's items had run one after another in batch order.

// Defaults for group commit. Each has a tallyd flag.
const (
	// BatchItemsMaxDefault bounds the calls in one transaction.
	BatchItemsMaxDefault = 256
	// BatchWaitMaxDefault is how long a batch waits for more calls after its
	// first one: the most latency batching adds to a call at low load.
	BatchWaitMaxDefault = 200 * time.Microsecond
	// BatchWorkersMaxDefault bounds batches in flight at once (each holds one
	// PostgreSQL connection). One is the default because every charge batch
	// locks its currency's revenue row: parallel batches only queue behind
	// each other with fewer items each, while a single worker lets calls
	// accumulate during a commit and take the next batch together
	// (bench/sweep.sh: 1 worker 1,862 charges/s, p99 30 ms; 4 workers
	// 1,166/s, p99 49 ms; see docs/PERFORMANCE.md).
	BatchWorkersMaxDefault = 1
	// BatchQueueItemsMaxDefault bounds calls waiting for a batch; beyond it
	// calls get RESOURCE_EXHAUSTED instead of queueing without bound.
	BatchQueueItemsMaxDefault = 8192
	// BatchTimeoutDefault bounds one batch's transaction.
	BatchTimeoutDefault = 10 * time.Second
)

// BatchConfig configures group commit.
type BatchConfig struct {
	ItemsMax      int
	WaitMax       time.Duration
	WorkersMax    int
	QueueItemsMax int
	Timeout       time.Duration
	// OnBatch, when set, is called with the item count of every committed
	// batch (for a batch-size histogram). It must not block.
	OnBatch func(items int)
}

func (c *BatchConfig) fill() {
	if c.ItemsMax <= 0 {
		c.ItemsMax = BatchItemsMaxDefault
	}
	if c.WaitMax < 0 {
		c.WaitMax = 0
	}
	if c.WaitMax == 0 && c.ItemsMax > 1 {
		c.WaitMax = BatchWaitMaxDefault
	}
	if c.WorkersMax <= 0 {
		c.WorkersMax = BatchWorkersMaxDefault
	}
	if c.QueueItemsMax <= 0 {
		c.QueueItemsMax = BatchQueueItemsMaxDefault
	}
	if c.Timeout <= 0 {
		c.Timeout = BatchTimeoutDefault
	}
}

// BatchStats counts what group commit achieved, for the benchmark.
type BatchStats struct {
	Batches   int64
	Items     int64
	ItemsPeak int64
	Splits    int64
	// Queued is the number of calls waiting for a batch right now (bounded
	// by QueueItemsMax).
	Queued int64
}

type item struct {
	r   MoveRequest
	fp  []byte
	out chan itemResult
}

type itemResult struct {
	res TransferResult
	err error
}

type batcher struct {
	l     *Ledger
	cfg   BatchConfig
	in    chan *item
	slots chan struct{}
	stop  chan struct{}
	done  chan struct{}
	wg    sync.WaitGroup
	// ctx is the parent of every batch's transaction; abort cancels it.
	ctx   context.Context
	abort context.CancelFunc

	batches, items, itemsPeak, splits atomic.Int64
}

func newBatcher(l *Ledger, cfg BatchConfig) *batcher {
	cfg.fill()
	b := &batcher{
		l: l, cfg: cfg,
		in:    make(chan *item, cfg.QueueItemsMax),
		slots: make(chan struct{}, cfg.WorkersMax),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	b.ctx, b.abort = context.WithCancel(context.Background())
	go b.loop()
	return b
}

// loop collects batches: it takes a worker slot, then the first waiting
// call, then more calls until the batch is full or WaitMax has passed. While
// every worker is busy calls accumulate in the queue, so batches grow with
// load and shrink to one call when the service is idle.
func (b *batcher) loop() {
	defer close(b.done)
	for {
		select {
		case b.slots <- struct{}{}:
		case <-b.stop:
			return
		}
		var first *item
		select {
		case first = <-b.in:
		case <-b.stop:
			<-b.slots
			return
		}
		items := []*item{first}
		if b.cfg.ItemsMax > 1 {
			timer := time.NewTimer(b.cfg.WaitMax)
		collect:
			for len(items) < b.cfg.ItemsMax {
				select {
				case it := <-b.in:
					items = append(items, it)
				case <-timer.C:
					break collect
				}
			}
			timer.Stop()
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer func() { <-b.slots }()
			b.run(items)
		}()
	}
}

func (b *batcher) close() {
	close(b.stop)
	<-b.done
	b.wg.Wait()
	b.abort()
}

func (b *batcher) stats() BatchStats {
	return BatchStats{Batches: b.batches.Load(), Items: b.items.Load(), ItemsPeak: b.itemsPeak.Load(), Splits: b.splits.Load(),
		Queued: int64(len(b.in))}
}

func (b *batcher) run(items []*item) {
	results := b.apply(items)
	for i, it := range items {
		it.out <- results[i]
	}
}

// apply commits items as one batch. If the transaction fails for a reason
// other than the database being unreachable, the batch is split in halves and
// each half retried, down to single items, so that one poisonous item fails
// alone and the others proceed. If the connection is lost, every item gets
// UNAVAILABLE: its outcome is unknown until the client retries its key.
func (b *batcher) apply(items []*item) (results []itemResult) {
	ctx, cancel := context.WithTimeout(b.ctx, b.cfg.Timeout)
	defer cancel()
	results, err := b.commit(ctx, items)
	if err == nil {
		b.batches.Add(1)
		b.items.Add(int64(len(items)))
		for {
			peak := b.itemsPeak.Load()
			if int64(len(items)) <= peak || b.itemsPeak.CompareAndSwap(peak, int64(len(items))) {
				break
			}
		}
		if b.cfg.OnBatch != nil {
			b.cfg.OnBatch(len(items))
		}
		return results
	}
	if len(items) == 1 || errors.Is(err, store.ErrUnavailable) || errors.Is(err, store.ErrTimeout) || b.ctx.Err() != nil {
		le := fromStore(err)
		results = make([]itemResult, len(items))
		for i := range results {
			results[i].err = le
		}
		return results
	}
	b.splits.Add(1)
	b.l.log.Warn("batch failed; retrying in halves", "items", len(items), "err", causeOf(err))
	mid := len(items) / 2
	return append(b.apply(items[:mid]), b.apply(items[mid:])...)
}

func causeOf(err error) string {
	var se *store.Error
	if errors.As(err, &se) && se.Cause() != nil {
		return se.Error() + ": " + se.Cause().Error()
	}
	return err.Error()
}

// keyState is what the batch has decided so far for one idempotency key.
type keyState struct {
	fp        []byte
	kind      Kind
	result    *TransferResult // a posting
	rejection *Error          // a recorded business rejection
}

// commit runs one batch in one transaction and returns each item's result.
// A panic (a broken invariant) fails the batch's items with INTERNAL and
// commits nothing.
func (b *batcher) commit(ctx context.Context, items []*item) (results []itemResult, err error) {
	defer func() {
		if p := recover(); p != nil {
			b.l.log.Error("ledger invariant violated; batch not committed", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			results, err = nil, &Error{Code: CodeInternal, Reason: ReasonInternal, Message: "internal error"}
		}
	}()
	lock := store.BatchLock{}
	for _, it := range items {
		lock.Keys = append(lock.Keys, store.KeyRef{Scope: it.r.Scope, Key: it.r.IdempotencyKey})
		lock.Accounts = append(lock.Accounts, it.r.AccountID)
		if it.r.Counterparty != uuid.Nil {
			lock.Accounts = append(lock.Accounts, it.r.Counterparty)
		} else {
			lock.DefaultsFor = append(lock.DefaultsFor, it.r.AccountID)
		}
	}
	var (
		replays  = map[int]store.KeyRecord{}
		final    map[uuid.UUID]*store.Account
		original map[uuid.UUID]store.Account
	)
	err = b.l.st.InTx(ctx, func(tx *store.Tx) error {
		locked, err := tx.LockBatch(ctx, lock)
		if err != nil {
			return err
		}
		results = make([]itemResult, len(items))
		original = locked.Accounts
		final = make(map[uuid.UUID]*store.Account, len(locked.Accounts))
		for id, a := range locked.Accounts {
			a := a
			final[id] = &a
		}
		var w store.BatchWrite
		seen := map[store.KeyRef]*keyState{}
		for i, it := range items {
			ref := store.KeyRef{Scope: it.r.Scope, Key: it.r.IdempotencyKey}
			if k, ok := locked.Keys[ref]; ok {
				// Used before this batch: replay, or refuse a different request.
				switch {
				case string(k.Fingerprint) != string(it.fp) || k.Kind != int16(it.r.Kind):
					results[i].err = keyReused()
				case !k.TransferID.Valid:
					results[i].err = storedRejection(k)
				default:
					replays[i] = k
				}
				continue
			}
			if prev, ok := seen[ref]; ok {
				// Used earlier in this batch: the same rules as a replay.
				switch {
				case string(prev.fp) != string(it.fp) || prev.kind != it.r.Kind:
					results[i].err = keyReused()
					continue
				case prev.result != nil:
					r := *prev.result
					r.Replayed = true
					results[i].res = r
					continue
				case prev.rejection != nil:
					rej := *prev.rejection
					rej.Replayed = true
					results[i].err = &rej
					continue
				}
				// The first one recorded nothing (NOT_FOUND): decide again.
			}
			res, rej, err := b.l.decide(it.r, it.fp, final, locked.System, locked.Now, &w)
			switch {
			case err != nil:
				results[i].err = err
			case rej != nil:
				results[i].err = rej
				seen[ref] = &keyState{fp: it.fp, kind: it.r.Kind, rejection: rej}
			default:
				results[i].res = res
				seen[ref] = &keyState{fp: it.fp, kind: it.r.Kind, result: &res}
			}
		}
		ids := make([]uuid.UUID, 0, len(final))
		for id, a := range final {
			if a.Version != original[id].Version {
				ids = append(ids, id)
			}
		}
		sort.Slice(ids, func(i, j int) bool { return ids[i].String() < ids[j].String() })
		for _, id := range ids {
			a := final[id]
			w.Updates = append(w.Updates, store.AccountUpdate{
				AccountID: id, PrevVersion: original[id].Version, Balance: a.Balance, Version: a.Version,
				LastSequence: a.LastSequence, LastEntryAt: *a.LastEntryAt,
			})
		}
		return tx.WriteBatch(ctx, w)
	})
	if err != nil {
		return nil, err
	}
	// Committed. Refresh the cache with each touched account's final state;
	// a failure here changes nothing (reads fall back to PostgreSQL).
	for id, a := range final {
		if a.Version == original[id].Version {
			continue
		}
		b.l.cachePut(ctx, cache.Balance{
			AccountID: id, Currency: a.Currency, Balance: a.Balance, CreditLimit: a.CreditLimit,
			Available: available(Floor(a.Floor), a.Balance, a.CreditLimit), Version: a.Version, AsOf: *a.LastEntryAt,
		})
	}
	for i, k := range replays {
		results[i].res, results[i].err = b.l.replay(ctx, items[i].r, &k)
	}
	return results, nil
}

func keyReused() *Error {
	return rejection(CodeAlreadyExists, ReasonIdempotencyKeyReused, "idempotency key was already used for a different request")
}
