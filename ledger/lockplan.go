package ledger

import (
	"context"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// The lock plan: the ledger alone decides which rows a batch locks. From
// each item it names the accounts the item may change, with the shard of
// every REVENUE or FUNDING account this committer posts to; the store then
// locks exactly those rows, in ascending id order after the batch's key
// locks (the one global lock order, docs/ARCHITECTURE.md).

// lockPlan is what a batch locks and how its items find the rows.
type lockPlan struct {
	lock store.BatchLock
	// system maps currency → role → the default system account shard the
	// batch posts to.
	system map[string]map[string]uuid.UUID
	// alias maps a sharded account named by a posting to the shard the
	// batch posts to.
	alias map[uuid.UUID]uuid.UUID
	// shardsOf are the shards of accounts whose lifecycle an item changes:
	// a status change is written to every shard.
	shardsOf map[uuid.UUID][]uuid.UUID
	facts    store.Facts
}

// planLocks builds the lock plan of items for committer lane, in three
// steps: collect what the items name, read the facts not yet remembered
// (one round trip, none when every account is known and no item names a
// hold or a charge), and choose the rows.
func (l *Ledger) planLocks(ctx context.Context, tx *store.Tx, items []*item, lane int) (*lockPlan, error) {
	p := &lockPlan{
		system:   map[string]map[string]uuid.UUID{},
		alias:    map[uuid.UUID]uuid.UUID{},
		shardsOf: map[uuid.UUID][]uuid.UUID{},
	}
	accounts, holds, charges := p.collect(items)
	if err := l.readFacts(ctx, tx, p, accounts, holds, charges); err != nil {
		return nil, err
	}
	for _, it := range items {
		l.planItem(p, it.r, lane)
	}
	return p, nil
}

// collect gathers the batch's keys and the ids its items name.
func (p *lockPlan) collect(items []*item) (accounts, holds, charges []uuid.UUID) {
	for _, it := range items {
		r := it.r
		if r.Kind.keyed() {
			p.lock.Keys = append(p.lock.Keys, store.KeyRef{Scope: r.Scope, Key: r.IdempotencyKey})
		}
		switch r.Kind {
		case KindCapture, KindRelease:
			holds = append(holds, r.HoldID)
		case KindRefund:
			charges = append(charges, r.ChargeID)
		default:
			accounts = append(accounts, r.AccountID)
			if r.Counterparty != uuid.Nil {
				accounts = append(accounts, r.Counterparty)
			}
		}
	}
	return accounts, holds, charges
}

// readFacts fills p.facts: remembered account facts from the directory,
// the rest (and every hold and charge) from PostgreSQL.
func (l *Ledger) readFacts(ctx context.Context, tx *store.Tx, p *lockPlan, accounts, holds, charges []uuid.UUID) error {
	p.facts.Accounts = make(map[uuid.UUID]store.AccountFacts, len(accounts))
	var unknown []uuid.UUID
	for _, id := range accounts {
		if f, ok := l.dir.lookup(id); ok {
			p.facts.Accounts[id] = f
		} else {
			unknown = append(unknown, id)
		}
	}
	if len(unknown) == 0 && len(holds) == 0 && len(charges) == 0 {
		return nil
	}
	read, err := tx.ReadFacts(ctx, unknown, holds, charges)
	if err != nil {
		return err
	}
	l.dir.remember(read.Accounts)
	for id, f := range read.Accounts {
		p.facts.Accounts[id] = f
	}
	p.facts.Holds, p.facts.Charges = read.Holds, read.Charges
	return nil
}

// planItem adds the rows item r may change.
func (l *Ledger) planItem(p *lockPlan, r MoveRequest, lane int) {
	switch r.Kind {
	case KindCharge, KindCredit, KindTransfer:
		p.posting(l, r.AccountID, lane)
		switch {
		case r.Counterparty != uuid.Nil:
			p.posting(l, r.Counterparty, lane)
		case r.Kind == KindCharge:
			p.systemShard(l, p.currencyOf(r.AccountID), store.SystemRoleRevenue, lane)
		case r.Kind == KindCredit:
			p.systemShard(l, p.currencyOf(r.AccountID), store.SystemRoleFunding, lane)
		}
	case KindHold:
		// A hold records the revenue account it names, not a shard.
		p.add(r.AccountID)
		if r.Counterparty != uuid.Nil {
			p.add(r.Counterparty)
		}
	case KindCapture, KindRelease:
		h, ok := p.facts.Holds[r.HoldID]
		if !ok {
			return // NOT_FOUND when decided
		}
		p.add(h.AccountID)
		p.lock.Holds = append(p.lock.Holds, h.ID)
		if r.Kind == KindRelease {
			return
		}
		switch {
		case h.RevenueShards != nil:
			s := l.pickShard(h.RevenueShards, lane)
			p.alias[h.RevenueAccountID] = s
			p.add(s)
		case h.RevenueAccountID != uuid.Nil:
			p.add(h.RevenueAccountID)
		default:
			p.systemShard(l, h.Currency, store.SystemRoleRevenue, lane)
		}
	case KindRefund:
		// A refund gives back from the very shard the charge credited.
		c, ok := p.facts.Charges[r.ChargeID]
		if !ok {
			return
		}
		p.add(c.DebitAccountID)
		p.add(c.CreditAccountID)
		p.lock.Charges = append(p.lock.Charges, c.ID)
	default:
		// Lifecycle changes and hold expiry: the account, and every shard
		// of it (a status applies to all of them).
		p.add(r.AccountID)
		if f, ok := p.facts.Accounts[r.AccountID]; ok && f.Shards != nil {
			p.shardsOf[r.AccountID] = f.Shards
			for _, s := range f.Shards {
				p.add(s)
			}
		}
	}
}

func (p *lockPlan) add(id uuid.UUID) { p.lock.Accounts = append(p.lock.Accounts, id) }

func (p *lockPlan) currencyOf(id uuid.UUID) string { return p.facts.Accounts[id].Currency }

// posting adds an account a posting names: itself, or for an account with
// shards the shard this committer posts to. A REVENUE or FUNDING account
// without shards (created before sharding) gets them in the background.
func (p *lockPlan) posting(l *Ledger, id uuid.UUID, lane int) {
	f, ok := p.facts.Accounts[id]
	switch {
	case ok && f.Shards != nil:
		s := l.pickShard(f.Shards, lane)
		p.alias[id] = s
		p.add(s)
		return
	case ok && f.ShardOf == uuid.Nil && (AccountType(f.Type) == AccountTypeRevenue || AccountType(f.Type) == AccountTypeFunding):
		l.widenShards(id)
	}
	p.add(id)
}

// systemShard adds the shard of the currency's default system account this
// committer posts to. An unknown currency adds nothing: the item then
// fails with systemMissingError, and is retried once the accounts exist.
func (p *lockPlan) systemShard(l *Ledger, currency, role string, lane int) {
	sys, ok := l.dir.systemOf(currency)
	if !ok {
		return
	}
	l.widenSystem(currency, sys)
	shards := sys.revenue
	if role == store.SystemRoleFunding {
		shards = sys.funding
	}
	s := l.pickShard(shards, lane)
	if p.system[currency] == nil {
		p.system[currency] = map[string]uuid.UUID{}
	}
	p.system[currency][role] = s
	p.add(s)
}
