package ledger

import (
	"bytes"
	"context"
	"encoding/binary"
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
	// BatchWorkersMaxDefault is the number of committers: each forms and
	// commits its own batches, one at a time, posting to its own shard of
	// every system account, so committers (of this and of other tallyd
	// processes) never wait for each other on a system row. One per process
	// is the default because the measured sweep on the project's 2-core
	// machine, whose commit flush is fast (0.19 ms), is CPU-bound: one
	// committer's batches hold about 16 calls at 32 clients, four
	// committers' about 4, and PostgreSQL's work per call grows as batches
	// shrink (bench/sweep.sh: charge-uniform 4,135/s with 1, 1,822/s with 2,
	// 1,336/s with 4; docs/PERFORMANCE.md). Where the flush is slow, or with
	// more cores, raise it: committers then share flushes.
	BatchWorkersMaxDefault = 1
	// BatchQueueItemsMaxDefault bounds calls waiting for a batch (over all
	// committers); beyond it calls get RESOURCE_EXHAUSTED instead of
	// queueing without bound.
	BatchQueueItemsMaxDefault = 8192
	// BatchTimeoutDefault bounds one batch's transaction.
	BatchTimeoutDefault = 10 * time.Second
	// postCommitMax bounds the batches whose post-commit work (the cache
	// refresh, replay look-ups) runs at once off the committers; beyond it
	// the committer does its own, which slows it down instead of letting
	// the work pile up.
	postCommitMax = 64
)

// BatchConfig configures group commit.
type BatchConfig struct {
	ItemsMax int
	WaitMax  time.Duration
	// WorkersMax is the number of committers (tallyd --batch-workers-max).
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

// batcher runs the committers. Each committer (a lane) has its own queue
// and forms its batches from it: while one of its batches commits, calls
// accumulate in its queue and become its next batch.
type batcher struct {
	l     *Ledger
	cfg   BatchConfig
	lanes []chan *item
	post  chan struct{} // post-commit work in flight (postCommitMax)
	stop  chan struct{}
	wg    sync.WaitGroup
	postW sync.WaitGroup
	// ctx is the parent of every batch's transaction; abort cancels it.
	ctx   context.Context
	abort context.CancelFunc

	batches, items, itemsPeak, splits atomic.Int64
}

func newBatcher(l *Ledger, cfg BatchConfig) *batcher {
	cfg.fill()
	b := &batcher{
		l: l, cfg: cfg,
		lanes: make([]chan *item, cfg.WorkersMax),
		post:  make(chan struct{}, postCommitMax),
		stop:  make(chan struct{}),
	}
	b.ctx, b.abort = context.WithCancel(context.Background())
	per := max(1, cfg.QueueItemsMax/cfg.WorkersMax)
	for i := range b.lanes {
		b.lanes[i] = make(chan *item, per)
		b.wg.Add(1)
		go b.loop(i)
	}
	return b
}

// route picks the committer of a call: by the account it names (its hold
// or charge for captures and refunds), so one customer's calls share a
// committer's batches and two committers rarely wait on one customer row.
func (b *batcher) route(r MoveRequest) chan *item {
	id := r.AccountID
	switch {
	case r.HoldID != uuid.Nil:
		id = r.HoldID
	case r.ChargeID != uuid.Nil:
		id = r.ChargeID
	}
	return b.lanes[laneOf(id, len(b.lanes))]
}

// laneOf spreads ids over n lanes by their random bits (UUIDv7 starts with
// a timestamp, so the last bytes are used).
func laneOf(id uuid.UUID, n int) int {
	return int(binary.BigEndian.Uint64(id[8:]) % uint64(n))
}

// loop is one committer: it takes the first waiting call, then more calls
// until the batch is full or WaitMax has passed, and commits the batch
// before forming the next. Batches grow with load and shrink to one call
// when the service is idle.
func (b *batcher) loop(lane int) {
	defer b.wg.Done()
	in := b.lanes[lane]
	for {
		var first *item
		select {
		case first = <-in:
		case <-b.stop:
			return
		}
		items := []*item{first}
		if b.cfg.ItemsMax > 1 {
			timer := time.NewTimer(b.cfg.WaitMax)
		collect:
			for len(items) < b.cfg.ItemsMax {
				select {
				case it := <-in:
					items = append(items, it)
				case <-timer.C:
					break collect
				}
			}
			timer.Stop()
		}
		b.run(items, lane)
	}
}

func (b *batcher) close() {
	close(b.stop)
	b.wg.Wait()
	b.postW.Wait()
	b.abort()
}

func (b *batcher) stats() BatchStats {
	var queued int
	for _, in := range b.lanes {
		queued += len(in)
	}
	return BatchStats{Batches: b.batches.Load(), Items: b.items.Load(), ItemsPeak: b.itemsPeak.Load(), Splits: b.splits.Load(),
		Queued: int64(queued)}
}

// run commits items and answers each caller as soon as its outcome is
// known: at COMMIT for everything decided in the batch; replays, which need
// reads of committed rows, and the cache refresh follow off the committer.
func (b *batcher) run(items []*item, lane int) {
	results, post := b.apply(items, lane)
	b.l.refresh.begin(post.balances)
	for i, it := range items {
		if !post.replays.has(i) {
			it.out <- results[i]
		}
	}
	b.afterCommit(func(ctx context.Context) {
		for i, k := range post.replays {
			res, err := b.l.replay(ctx, &k)
			items[i].out <- itemResult{res: res, err: err}
		}
		b.l.refreshCache(ctx, post.balances)
		b.l.refresh.end(post.balances)
	})
}

// afterCommit runs fn off the committer when fewer than postCommitMax
// batches' post-commit work is in flight, or else on it.
func (b *batcher) afterCommit(fn func(ctx context.Context)) {
	ctx, cancel := context.WithTimeout(context.Background(), b.cfg.Timeout)
	select {
	case b.post <- struct{}{}:
		b.postW.Add(1)
		go func() {
			defer b.postW.Done()
			defer func() { <-b.post }()
			defer cancel()
			fn(ctx)
		}()
	default:
		defer cancel()
		fn(ctx)
	}
}

// postCommit is what a committed batch leaves to do after COMMIT.
type postCommit struct {
	// replays are items whose key was used by an earlier batch, by index.
	replays replaySet
	// balances are the final states of the accounts the batch changed.
	balances []cache.Balance
}

type replaySet map[int]store.KeyRecord

func (s replaySet) has(i int) bool { _, ok := s[i]; return ok }

// apply commits items as one batch. If the transaction fails for a reason
// other than the database being unreachable, the batch is split in halves and
// each half retried, down to single items, so that one poisonous item fails
// alone and the others proceed. If the connection is lost, every item gets
// UNAVAILABLE: its outcome is unknown until the client retries its key.
func (b *batcher) apply(items []*item, lane int) ([]itemResult, postCommit) {
	ctx, cancel := context.WithTimeout(b.ctx, b.cfg.Timeout)
	defer cancel()
	results, _, post, err := b.l.commitItems(ctx, items, nil, lane)
	if err == nil {
		b.counted(len(items))
		return results, post
	}
	if len(items) == 1 || errors.Is(err, store.ErrUnavailable) || errors.Is(err, store.ErrTimeout) || b.ctx.Err() != nil {
		le := fromStore(err)
		results = make([]itemResult, len(items))
		for i := range results {
			results[i].err = le
		}
		return results, postCommit{}
	}
	b.splits.Add(1)
	b.l.log.Warn("batch failed; retrying in halves", "items", len(items), "err", causeOf(err))
	mid := len(items) / 2
	r1, p1 := b.apply(items[:mid], lane)
	r2, p2 := b.apply(items[mid:], lane)
	for i, k := range p2.replays {
		if p1.replays == nil {
			p1.replays = replaySet{}
		}
		p1.replays[mid+i] = k
	}
	p1.balances = append(p1.balances, p2.balances...)
	return append(r1, r2...), p1
}

// counted records a committed batch of n items in the stats.
func (b *batcher) counted(n int) {
	b.batches.Add(1)
	b.items.Add(int64(n))
	for {
		peak := b.itemsPeak.Load()
		if int64(n) <= peak || b.itemsPeak.CompareAndSwap(peak, int64(n)) {
			break
		}
	}
	if b.cfg.OnBatch != nil {
		b.cfg.OnBatch(n)
	}
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

// submitBatch is a SubmitBatch call's own key and mode.
type submitBatch struct {
	scope, key string
	fp         []byte
	mode       BatchMode
	// stored is set when the batch key was used before: its stored outcome.
	stored *store.BatchRecord
}

func (sb *submitBatch) atomic() bool { return sb != nil && sb.mode == BatchAtomic }

// commitItems runs items in one transaction, as committer lane, and returns
// each item's result and what is left to do after COMMIT. With sb nil
// (group commit) and in INDEPENDENT mode every item stands alone; in ATOMIC
// mode the first item that fails makes the transaction write nothing but
// the batch key's outcome, and every other item reports NOT_APPLIED. A
// panic (a broken invariant) fails every item with INTERNAL and commits
// nothing.
//
// The steps: plan the locks, lock, decide each item, build the writes,
// write; after COMMIT the caller publishes (answers, cache refresh).
func (l *Ledger) commitItems(ctx context.Context, items []*item, sb *submitBatch, lane int) (
	results []itemResult, applied bool, post postCommit, err error) {
	defer func() {
		if p := recover(); p != nil {
			l.log.Error("ledger invariant violated; batch not committed", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			results, applied, post, err = nil, false, postCommit{}, &Error{Code: CodeInternal, Reason: ReasonInternal, Message: "internal error"}
		}
	}()
	usageSet, err := l.usageSetID(ctx)
	if err != nil {
		return nil, false, postCommit{}, err
	}
	var d *decided
	err = l.st.InTx(ctx, func(tx *store.Tx) error {
		d = nil
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
		plan, err := l.planLocks(ctx, tx, items, lane)
		if err != nil {
			return err
		}
		locked, err := tx.LockBatch(ctx, plan.lock)
		if err != nil {
			return err
		}
		if d, err = l.decideAll(items, locked, plan, sb); err != nil {
			return err
		}
		if err := l.writeDecided(ctx, tx, d, sb, usageSet); err != nil {
			return err
		}
		return l.topUpStep(ctx, tx, d, items)
	})
	if err != nil {
		return nil, false, postCommit{}, err
	}
	if sb != nil && sb.stored != nil {
		return nil, sb.stored.Applied, postCommit{}, nil
	}
	return d.results, d.applied, d.post(), nil
}

// decided is a batch's outcome before it is written.
type decided struct {
	results  []itemResult
	replays  replaySet
	applied  bool
	failed   int // the first failed item (ATOMIC), or -1
	wk       *work
	original map[uuid.UUID]store.Account
}

// decideAll decides every item in batch order against the locked rows.
func (l *Ledger) decideAll(items []*item, locked store.BatchLocked, plan *lockPlan, sb *submitBatch) (*decided, error) {
	d := &decided{results: make([]itemResult, len(items)), replays: replaySet{}, applied: true, failed: -1,
		original: locked.Accounts}
	d.wk = newWork(locked, plan)
	d.wk.writeDownExpiries()
	seen := map[store.KeyRef]*keyState{}
	for i, it := range items {
		if sb.atomic() && d.failed >= 0 {
			break
		}
		if done := d.fromKeys(i, it, locked.Keys, seen); done {
			continue
		}
		res, rej, err := l.decide(it.r, it.fp, d.wk)
		var missing *systemMissingError
		switch {
		case errors.As(err, &missing) && sb != nil:
			// Abort the whole batch: SubmitBatch creates the system
			// accounts and runs it again.
			return nil, err
		case err != nil:
			d.results[i].err = err
		case rej != nil:
			d.results[i].err = rej
			if it.r.Kind.keyed() {
				seen[keyRef(it.r)] = &keyState{fp: it.fp, kind: it.r.Kind, rejection: rej}
			}
		default:
			d.results[i].res = res
			if it.r.Kind.keyed() {
				seen[keyRef(it.r)] = &keyState{fp: it.fp, kind: it.r.Kind, result: &res}
			}
		}
		d.noteFailure(i)
	}
	return d, nil
}

func keyRef(r MoveRequest) store.KeyRef { return store.KeyRef{Scope: r.Scope, Key: r.IdempotencyKey} }

func (d *decided) noteFailure(i int) {
	if d.results[i].err != nil && d.failed < 0 {
		d.failed = i
	}
}

// fromKeys settles item i from its idempotency key when the key was used
// before this batch (replay, or refuse a different request) or earlier in
// it (the same rules). It reports whether the item is settled.
func (d *decided) fromKeys(i int, it *item, stored map[store.KeyRef]store.KeyRecord, seen map[store.KeyRef]*keyState) bool {
	if !it.r.Kind.keyed() {
		return false
	}
	ref := keyRef(it.r)
	if k, ok := stored[ref]; ok {
		switch {
		case string(k.Fingerprint) != string(it.fp) || k.Kind != int16(it.r.Kind):
			d.results[i].err = keyReused()
		case !k.TransferID.Valid && !k.HoldID.Valid:
			d.results[i].err = storedRejection(k)
		default:
			d.replays[i] = k
		}
		d.noteFailure(i)
		return true
	}
	prev, ok := seen[ref]
	if !ok {
		return false
	}
	switch {
	case string(prev.fp) != string(it.fp) || prev.kind != it.r.Kind:
		d.results[i].err = keyReused()
	case prev.result != nil:
		r := *prev.result
		r.Replayed = true
		d.results[i].res = r
	case prev.rejection != nil:
		rej := *prev.rejection
		rej.Replayed = true
		d.results[i].err = &rej
	}
	d.noteFailure(i)
	// The first one recorded nothing (NOT_FOUND): decide again.
	return d.results[i].err != nil || d.results[i].res.Replayed
}

// writeDecided writes a decided batch: for an ATOMIC batch with a failed
// item only the batch key's outcome, otherwise every account update, the
// feed, the rollups and the batch's rows.
func (l *Ledger) writeDecided(ctx context.Context, tx *store.Tx, d *decided, sb *submitBatch, usageSet int16) error {
	if sb.atomic() && d.failed >= 0 {
		d.notApplied()
		if err := l.checkBatchReply(d.results); err != nil {
			return err
		}
		return tx.InsertBatch(ctx, store.BatchRecord{
			Scope: sb.scope, Key: sb.key, Fingerprint: sb.fp, Mode: int16(sb.mode), Applied: false,
			Results: encodeResults(d.results),
		})
	}
	d.wk.buildUpdates(d.original)
	if sb != nil {
		// Replays inside a batch are resolved now so the stored outcome is
		// complete; they read committed rows only.
		for i, k := range d.replays {
			d.results[i].res, d.results[i].err = l.replay(ctx, &k)
		}
		d.replays = replaySet{}
		// The reply must be answerable: bound it now, before anything is
		// written, so a batch whose reply could not be sent writes nothing
		// (the transaction rolls back, batch key included).
		if err := l.checkBatchReply(d.results); err != nil {
			d.wk = nil
			return err
		}
	}
	d.wk.feedEvents()
	d.wk.usageRollup(l.usage.keys, usageSet)
	if err := tx.WriteBatch(ctx, d.wk.w); err != nil {
		return err
	}
	if sb != nil {
		return tx.InsertBatch(ctx, store.BatchRecord{
			Scope: sb.scope, Key: sb.key, Fingerprint: sb.fp, Mode: int16(sb.mode), Applied: true,
			Results: encodeResults(d.results),
		})
	}
	return nil
}

// notApplied turns an ATOMIC batch with a failed item into all or nothing:
// none of the items is written, not even their keys (they may be used
// again), and every other item reports NOT_APPLIED.
func (d *decided) notApplied() {
	d.applied = false
	d.replays = replaySet{}
	for i := range d.results {
		if i != d.failed {
			d.results[i] = itemResult{err: rejection(CodeFailedPrecondition, ReasonNotApplied,
				"not applied: item %d of this ATOMIC batch failed", d.failed)}
		}
	}
	d.wk = nil
}

// buildUpdates turns every account whose version changed into its update,
// guarded by the version read under lock, in id order.
func (wk *work) buildUpdates(original map[uuid.UUID]store.Account) {
	ids := make([]uuid.UUID, 0, len(wk.accts))
	for id, a := range wk.accts {
		if a.Version != original[id].Version {
			ids = append(ids, id)
		}
	}
	sort.Slice(ids, func(i, j int) bool { return bytes.Compare(ids[i][:], ids[j][:]) < 0 })
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
}

// cacheable reports whether balances of accounts of type t are cached:
// CUSTOMER accounts only. A REVENUE or FUNDING account may have shards (or
// get them at any time), and then no one row holds its balance; such reads
// are not the hot path.
func cacheable(t int16) bool { return AccountType(t) == AccountTypeCustomer }

// post is what the committed batch leaves to do: the replays to look up
// and the final state of every changed CUSTOMER account to cache.
func (d *decided) post() postCommit {
	p := postCommit{replays: d.replays}
	if d.wk == nil {
		return p
	}
	for id, a := range d.wk.accts {
		if a.Version == d.original[id].Version || !cacheable(a.Type) {
			continue
		}
		p.balances = append(p.balances, cacheValue(a, d.wk.nextExpiry[id], d.wk.now))
	}
	return p
}

// cacheValue is an account's state after a commit as the cache holds it.
// next is an early bound of its next hold expiry: the cached value is
// never served past it.
func cacheValue(a *store.Account, next *time.Time, now time.Time) cache.Balance {
	asOf := now
	if a.LastEntryAt != nil && a.LastEntryAt.After(asOf) {
		asOf = *a.LastEntryAt
	}
	if a.Held == 0 {
		next = nil
	}
	return cache.Balance{
		AccountID: a.ID, Currency: a.Currency, Balance: a.Balance, CreditLimit: a.CreditLimit, Held: a.Held,
		Available: availableOf(a), Version: a.Version, AsOf: asOf, ServeUntil: serveUntil(next),
	}
}

func keyReused() *Error {
	return rejection(CodeAlreadyExists, ReasonIdempotencyKeyReused, "idempotency key was already used for a different request")
}
