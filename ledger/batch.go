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

// commit runs one group-commit batch in one transaction and returns each
// item's result.
func (b *batcher) commit(ctx context.Context, items []*item) ([]itemResult, error) {
	results, _, err := b.l.commitItems(ctx, items, nil)
	return results, err
}

// submitBatch is a SubmitBatch call's own key and mode.
type submitBatch struct {
	scope, key string
	fp         []byte
	mode       BatchMode
	// stored is set when the batch key was used before: its stored outcome.
	stored *store.BatchRecord
}

// commitItems runs items in one transaction and returns each item's result.
// With sb nil (group commit) and in INDEPENDENT mode every item stands alone;
// in ATOMIC mode the first item that fails makes the transaction write
// nothing but the batch key's outcome, and every other item reports
// NOT_APPLIED. A panic (a broken invariant) fails every item with INTERNAL
// and commits nothing.
func (l *Ledger) commitItems(ctx context.Context, items []*item, sb *submitBatch) (results []itemResult, applied bool, err error) {
	defer func() {
		if p := recover(); p != nil {
			l.log.Error("ledger invariant violated; batch not committed", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			results, applied, err = nil, false, &Error{Code: CodeInternal, Reason: ReasonInternal, Message: "internal error"}
		}
	}()
	lock := store.BatchLock{}
	for _, it := range items {
		r := it.r
		if r.Kind.keyed() {
			lock.Keys = append(lock.Keys, store.KeyRef{Scope: r.Scope, Key: r.IdempotencyKey})
		}
		switch r.Kind {
		case KindCharge, KindCredit, KindTransfer, KindHold:
			lock.Accounts = append(lock.Accounts, r.AccountID)
			switch {
			case r.Counterparty != uuid.Nil:
				lock.Accounts = append(lock.Accounts, r.Counterparty)
			case r.Kind == KindCharge:
				lock.RevenueFor = append(lock.RevenueFor, r.AccountID)
			case r.Kind == KindCredit:
				lock.FundingFor = append(lock.FundingFor, r.AccountID)
			}
		case KindCapture, KindRelease:
			lock.Holds = append(lock.Holds, r.HoldID)
		case KindRefund:
			lock.Charges = append(lock.Charges, r.ChargeID)
		default:
			lock.Accounts = append(lock.Accounts, r.AccountID)
		}
	}
	var (
		replays  = map[int]store.KeyRecord{}
		wk       *work
		original map[uuid.UUID]store.Account
	)
	usageSet, err := l.usageSetID(ctx)
	if err != nil {
		return nil, false, err
	}
	err = l.st.InTx(ctx, func(tx *store.Tx) error {
		replays = map[int]store.KeyRecord{}
		if sb != nil {
			rec, found, err := tx.LockBatchKey(ctx, sb.scope, sb.key)
			if err != nil {
				return err
			}
			if found {
				sb.stored = &rec
				return nil
			}
		}
		locked, err := tx.LockBatch(ctx, lock)
		if err != nil {
			return err
		}
		results = make([]itemResult, len(items))
		original = locked.Accounts
		wk = newWork(locked)
		wk.writeDownExpiries()
		seen := map[store.KeyRef]*keyState{}
		failed := -1
		for i, it := range items {
			if sb != nil && sb.mode == BatchAtomic && failed >= 0 {
				break
			}
			ref := store.KeyRef{Scope: it.r.Scope, Key: it.r.IdempotencyKey}
			if it.r.Kind.keyed() {
				if k, ok := locked.Keys[ref]; ok {
					// Used before this batch: replay, or refuse a different request.
					switch {
					case string(k.Fingerprint) != string(it.fp) || k.Kind != int16(it.r.Kind):
						results[i].err = keyReused()
					case !k.TransferID.Valid && !k.HoldID.Valid:
						results[i].err = storedRejection(k)
					default:
						replays[i] = k
					}
					if results[i].err != nil && failed < 0 {
						failed = i
					}
					continue
				}
				if prev, ok := seen[ref]; ok {
					// Used earlier in this batch: the same rules as a replay.
					switch {
					case string(prev.fp) != string(it.fp) || prev.kind != it.r.Kind:
						results[i].err = keyReused()
					case prev.result != nil:
						r := *prev.result
						r.Replayed = true
						results[i].res = r
					case prev.rejection != nil:
						rej := *prev.rejection
						rej.Replayed = true
						results[i].err = &rej
					}
					if results[i].err != nil && failed < 0 {
						failed = i
					}
					if results[i].err != nil || results[i].res.Replayed {
						continue
					}
					// The first one recorded nothing (NOT_FOUND): decide again.
				}
			}
			res, rej, err := l.decide(it.r, it.fp, wk)
			var missing *systemMissingError
			switch {
			case errors.As(err, &missing) && sb != nil:
				// Abort the whole batch: SubmitBatch creates the system
				// accounts and runs it again.
				return err
			case err != nil:
				results[i].err = err
			case rej != nil:
				results[i].err = rej
				if it.r.Kind.keyed() {
					seen[ref] = &keyState{fp: it.fp, kind: it.r.Kind, rejection: rej}
				}
			default:
				results[i].res = res
				if it.r.Kind.keyed() {
					seen[ref] = &keyState{fp: it.fp, kind: it.r.Kind, result: &res}
				}
			}
			if results[i].err != nil && failed < 0 {
				failed = i
			}
		}
		applied = true
		if sb != nil && sb.mode == BatchAtomic && failed >= 0 {
			// All or nothing: write none of the items, not even their keys
			// (they may be used again), only the batch key's outcome.
			applied = false
			replays = map[int]store.KeyRecord{}
			for i := range results {
				if i != failed {
					results[i] = itemResult{err: rejection(CodeFailedPrecondition, ReasonNotApplied,
						"not applied: item %d of this ATOMIC batch failed", failed)}
				}
			}
			wk = nil
			if err := l.checkBatchReply(results); err != nil {
				return err
			}
			return tx.InsertBatch(ctx, store.BatchRecord{
				Scope: sb.scope, Key: sb.key, Fingerprint: sb.fp, Mode: int16(sb.mode), Applied: false,
				Results: encodeResults(results),
			})
		}
		ids := make([]uuid.UUID, 0, len(wk.accts))
		for id, a := range wk.accts {
			if a.Version != original[id].Version {
				ids = append(ids, id)
			}
		}
		sort.Slice(ids, func(i, j int) bool { return ids[i].String() < ids[j].String() })
		for _, id := range ids {
			a := wk.accts[id]
			if a.Held != original[id].Held && !wk.holdsChanged[id] {
				panic(fmt.Sprintf("ledger: held of %s changed without a hold change", id))
			}
			u := store.AccountUpdate{
				AccountID: id, PrevVersion: original[id].Version, Balance: a.Balance, Version: a.Version,
				LastSequence: a.LastSequence, LastEntryAt: a.LastEntryAt, Held: a.Held, HoldsChanged: wk.holdsChanged[id],
				Status: a.Status, CreditLimit: a.CreditLimit, LowBalanceThreshold: a.LowBalanceThreshold,
			}
			if wk.metaChanged[id] {
				u.Metadata = a.Metadata
			}
			wk.w.Updates = append(wk.w.Updates, u)
		}
		if sb != nil {
			// Replays inside a batch are resolved now so the stored outcome
			// is complete; they read committed rows only.
			for i, k := range replays {
				results[i].res, results[i].err = l.replay(ctx, &k)
			}
			replays = map[int]store.KeyRecord{}
			// The reply must be answerable: bound it now, before anything
			// is written, so a batch whose reply could not be sent writes
			// nothing (the transaction rolls back, batch key included).
			if err := l.checkBatchReply(results); err != nil {
				wk = nil
				return err
			}
		}
		wk.feedEvents()
		wk.usageRollup(l.usage.keys, usageSet)
		if err := tx.WriteBatch(ctx, wk.w); err != nil {
			return err
		}
		if err := l.topUpStep(ctx, tx, wk, items, results); err != nil {
			return err
		}
		if sb != nil {
			return tx.InsertBatch(ctx, store.BatchRecord{
				Scope: sb.scope, Key: sb.key, Fingerprint: sb.fp, Mode: int16(sb.mode), Applied: true,
				Results: encodeResults(results),
			})
		}
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	if sb != nil && sb.stored != nil {
		return nil, sb.stored.Applied, nil
	}
	if wk != nil {
		// Committed. Refresh the cache with each touched account's final
		// state; a failure here changes nothing (reads fall back to
		// PostgreSQL).
		for id, a := range wk.accts {
			if a.Version == original[id].Version {
				continue
			}
			l.cachePutAccount(ctx, a, wk.nextExpiry[id], wk.now)
		}
	}
	for i, k := range replays {
		results[i].res, results[i].err = l.replay(ctx, &k)
	}
	return results, applied, nil
}

// cachePutAccount caches an account's state after a commit. next is an
// early bound of its next hold expiry: the cached value is never served
// past it.
func (l *Ledger) cachePutAccount(ctx context.Context, a *store.Account, next *time.Time, now time.Time) {
	asOf := now
	if a.LastEntryAt != nil && a.LastEntryAt.After(asOf) {
		asOf = *a.LastEntryAt
	}
	if a.Held == 0 {
		next = nil
	}
	l.cachePut(ctx, cache.Balance{
		AccountID: a.ID, Currency: a.Currency, Balance: a.Balance, CreditLimit: a.CreditLimit, Held: a.Held,
		Available: availableOf(a), Version: a.Version, AsOf: asOf, ServeUntil: serveUntil(next),
	})
}

func keyReused() *Error {
	return rejection(CodeAlreadyExists, ReasonIdempotencyKeyReused, "idempotency key was already used for a different request")
}
