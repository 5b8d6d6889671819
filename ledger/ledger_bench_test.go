package ledger

import (
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// Micro-benchmarks of the write path's in-process work: request validation,
// the idempotency fingerprint, and assembling a group-commit batch (the
// per-item rules of money against the batch's working copy of the locked
// accounts). They measure; they assert nothing about speed.

func benchRequest(meta int) MoveRequest {
	r := MoveRequest{
		Kind: KindCharge, AccountID: uuid.Must(uuid.NewV7()), Amount: 1250,
		IdempotencyKey: "0193a5c2-7f3e-7b7a-9c1d-5e2f8a9b0c1d", Description: "order 8812: monthly plan",
	}
	if meta > 0 {
		r.Metadata = map[string]string{}
		for i := range meta {
			r.Metadata[fmt.Sprintf("key%02d", i)] = fmt.Sprintf("value number %d", i)
		}
	}
	return r
}

func BenchmarkValidateMove(b *testing.B) {
	l := &Ledger{limits: DefaultLimits()}
	for _, meta := range []int{0, 8} {
		r := benchRequest(meta)
		b.Run(fmt.Sprintf("meta=%d", meta), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := l.validateMove(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkFingerprint(b *testing.B) {
	for _, meta := range []int{0, 8} {
		r := benchRequest(meta)
		b.Run(fmt.Sprintf("meta=%d", meta), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = fingerprint(r)
			}
		})
	}
}

// BenchmarkDecideBatch assembles one batch of charges: each item is decided
// against the batch's working copy of the accounts, and its transfer,
// entries and key record are appended to the batch's write.
func BenchmarkDecideBatch(b *testing.B) {
	now := time.Now()
	const currency = "USD"
	revenue := store.Account{ID: uuid.Must(uuid.NewV7()), Currency: currency, Type: int16(AccountTypeRevenue),
		Floor: int16(FloorNone), Status: int16(StatusActive), SystemRole: store.SystemRoleRevenue}
	system := map[string]map[string]uuid.UUID{currency: {store.SystemRoleRevenue: revenue.ID}}
	l := &Ledger{limits: DefaultLimits()}
	for _, n := range []int{1, 32, 256} {
		customers := make([]store.Account, n)
		reqs := make([]MoveRequest, n)
		fps := make([][]byte, n)
		for i := range customers {
			customers[i] = store.Account{ID: uuid.Must(uuid.NewV7()), Currency: currency, Type: int16(AccountTypeCustomer),
				Floor: int16(FloorNonNegative), Status: int16(StatusActive), Balance: 1 << 40, Version: 1, LastSequence: 1}
			reqs[i] = MoveRequest{Kind: KindCharge, AccountID: customers[i].ID, Amount: 1,
				IdempotencyKey: uuid.Must(uuid.NewV7()).String()}
			fps[i] = fingerprint(reqs[i])
		}
		b.Run(fmt.Sprintf("items=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				accts := make(map[uuid.UUID]*store.Account, n+1)
				rev := revenue
				accts[rev.ID] = &rev
				for i := range customers {
					c := customers[i]
					accts[c.ID] = &c
				}
				wk := &work{accts: accts, system: system, now: now, holds: map[uuid.UUID]*store.Hold{},
					refunded: map[uuid.UUID]int64{}, holdsChanged: map[uuid.UUID]bool{}, nextExpiry: map[uuid.UUID]*time.Time{}}
				for i, r := range reqs {
					if _, rej, err := l.decide(r, fps[i], wk); err != nil || rej != nil {
						b.Fatal(err, rej)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/item")
		})
	}
}

// BenchmarkPlanLocks plans the locks of one batch of charges whose account
// facts are remembered (the steady state): the rows each item may change,
// with the committer's shard of the revenue account.
func BenchmarkPlanLocks(b *testing.B) {
	const currency = "USD"
	l := &Ledger{dir: newDirectory(0), systemShards: 8}
	shards := make([]uuid.UUID, 8)
	for i := range shards {
		shards[i] = uuid.Must(uuid.NewV7())
	}
	l.dir.setSystem(currency, systemShards{revenue: shards, funding: shards, complete: true, at: time.Now()})
	for _, n := range []int{1, 32, 256} {
		items := make([]*item, n)
		facts := map[uuid.UUID]store.AccountFacts{}
		for i := range items {
			id := uuid.Must(uuid.NewV7())
			facts[id] = store.AccountFacts{ID: id, Currency: currency, Type: int16(AccountTypeCustomer)}
			items[i] = &item{r: MoveRequest{Kind: KindCharge, AccountID: id, Amount: 1, IdempotencyKey: id.String()}}
		}
		l.dir.remember(facts)
		b.Run(fmt.Sprintf("items=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p := &lockPlan{system: map[string]map[string]uuid.UUID{}, alias: map[uuid.UUID]uuid.UUID{},
					shardsOf: map[uuid.UUID][]uuid.UUID{}}
				accounts, _, _ := p.collect(items)
				p.facts.Accounts = make(map[uuid.UUID]store.AccountFacts, len(accounts))
				for _, id := range accounts {
					f, ok := l.dir.lookup(id)
					if !ok {
						b.Fatal("facts not remembered")
					}
					p.facts.Accounts[id] = f
				}
				for _, it := range items {
					l.planItem(p, it.r, 3)
				}
				if len(p.lock.Accounts) != 2*n {
					b.Fatalf("planned %d rows, want %d", len(p.lock.Accounts), 2*n)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/item")
		})
	}
}
