package ledger

import (
	"context"
	"errors"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/store"
)

// cacheCallTimeout bounds the cache's share of a request even if the cache
// itself were misconfigured; the cache has its own, tighter timeout.
const cacheCallTimeout = 250 * time.Millisecond

// sharedReadTimeout bounds a balance read shared by concurrent cache misses.
const sharedReadTimeout = 5 * time.Second

func (l *Ledger) cachePut(ctx context.Context, b cache.Balance) {
	if l.cache == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cacheCallTimeout)
	defer cancel()
	l.cache.Put(ctx, b)
}

// refreshCache writes the final states of a committed batch's accounts to
// the cache in one round trip; a failure changes nothing but the cache's
// own state (reads fall back to PostgreSQL).
func (l *Ledger) refreshCache(ctx context.Context, bs []cache.Balance) {
	if l.cache == nil || len(bs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cacheCallTimeout)
	defer cancel()
	l.cache.PutMany(ctx, bs)
}

// GetBalance reads an account's balance.
//
// The promise: a cached read returns a (version, balance) pair that really
// existed and is at most the cache TTL old; a STRONG read comes from
// PostgreSQL; with minVersion > 0 the result is never older than minVersion
// (VERSION_NOT_REACHED when the account has not reached it).
func (l *Ledger) GetBalance(ctx context.Context, id uuid.UUID, c Consistency, minVersion int64) (Balance, error) {
	if minVersion < 0 {
		return Balance{}, invalid("min_version", "min_version must not be negative")
	}
	// Only an account this process knows to be a CUSTOMER account is read
	// from the cache: a REVENUE or FUNDING account may have shards (no one
	// row holds its balance), and a value found under its key was not
	// written by this release. The first read of an account in a process
	// learns its type from PostgreSQL.
	if c == ConsistencyCached && l.cache != nil && l.dir.customer(id) && !l.refresh.active(id) {
		cctx, cancel := context.WithTimeout(ctx, cacheCallTimeout)
		b, ok := l.cache.Get(cctx, id)
		cancel()
		if ok && b.Version >= minVersion {
			return Balance{
				AccountID: id, Currency: b.Currency, Balance: b.Balance, Available: b.Available,
				CreditLimit: b.CreditLimit, Version: b.Version, Source: SourceCache, AsOf: b.AsOf,
				Held: b.Held, Final: true,
			}, nil
		}
	}
	var row store.BalanceRow
	var err error
	if c == ConsistencyCached && minVersion == 0 {
		// Concurrent misses for one account share one PostgreSQL read. Only
		// for plain cached reads: a strong read must start after the caller
		// asked, so it may not join a read already in flight.
		// The shared read is detached from any one caller's cancellation but
		// still bounded; each caller waits only as long as its own context.
		ch := l.reads.DoChan(id.String(), func() (any, error) {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), sharedReadTimeout)
			defer cancel()
			return l.st.GetBalance(rctx, id)
		})
		select {
		case res := <-ch:
			err = res.Err
			if err == nil {
				row = res.Val.(store.BalanceRow)
			}
		case <-ctx.Done():
			err = ctx.Err()
		}
	} else {
		row, err = l.st.GetBalance(ctx, id)
	}
	if errors.Is(err, store.ErrNotFound) {
		return Balance{}, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", id)
	}
	if err != nil {
		return Balance{}, fromStore(err)
	}
	if row.Version < minVersion {
		return Balance{}, rejection(CodeFailedPrecondition, ReasonVersionNotReached,
			"account is at version %d, below min_version %d", row.Version, minVersion)
	}
	b := balanceFromRow(row)
	l.dir.rememberType(id, row.Currency, row.Type)
	if !cacheable(row.Type) {
		return b, nil
	}
	l.cachePut(ctx, cache.Balance{
		AccountID: id, Currency: b.Currency, Balance: b.Balance, CreditLimit: b.CreditLimit, Held: b.Held,
		Available: b.Available, Version: b.Version, AsOf: b.AsOf, ServeUntil: serveUntil(row.NextHoldExpiry),
	})
	return b, nil
}

// holdExpirySkewMax is how far tallyd's clock may run behind PostgreSQL's
// (whose clock decides hold expiry): a cached balance stops being served
// this long before its account's next hold expiry.
const holdExpirySkewMax = time.Second

// serveUntil is when a cached balance whose next hold expires at next must
// stop being served (zero: no hold, no limit but the TTL).
func serveUntil(next *time.Time) time.Time {
	if next == nil {
		return time.Time{}
	}
	return next.Add(-holdExpirySkewMax)
}

func balanceFromRow(row store.BalanceRow) Balance {
	return Balance{
		AccountID: row.AccountID, Currency: row.Currency, Balance: row.Balance, Held: row.Held,
		Available: available(Floor(row.Floor), row.Balance, row.Held, row.CreditLimit), CreditLimit: row.CreditLimit, Version: row.Version, Source: SourceStore,
		AsOf: row.ReadAt, Final: true, NextHoldExpiry: row.NextHoldExpiry,
	}
}

// GetBalanceAt returns an account's balance at instant at, from its entries,
// exact to the entry. Final is false when at is within the settle window of
// now, since a transaction dated before at may still commit; older answers
// never change. Version is 0: versions are not kept by time.
func (l *Ledger) GetBalanceAt(ctx context.Context, id uuid.UUID, at time.Time) (Balance, error) {
	bs, err := l.GetBalances(ctx, []uuid.UUID{id}, &at)
	if err != nil {
		return Balance{}, err
	}
	if len(bs) == 0 {
		return Balance{}, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", id)
	}
	return bs[0], nil
}

// GetBalances reads many balances from PostgreSQL in one statement: the
// current ones, or with at those at that instant. Unknown accounts are left
// out; ids may hold at most Limits.BalancesAccountsMax accounts.
func (l *Ledger) GetBalances(ctx context.Context, ids []uuid.UUID, at *time.Time) ([]Balance, error) {
	if len(ids) == 0 {
		return nil, invalid("account_ids", "account_ids is required")
	}
	if len(ids) > l.limits.BalancesAccountsMax {
		return nil, invalid("account_ids", "at most %d accounts per call", l.limits.BalancesAccountsMax)
	}
	if n := l.limits.PageBytesMax / (balanceBytesMax + messageOverhead); len(ids) > n {
		// Balances have a fixed size: the reply is bounded by the count.
		return nil, invalid("account_ids", "at most %d accounts per call (the reply would pass --page-bytes-max)", n)
	}
	for _, id := range ids {
		if id == uuid.Nil {
			return nil, invalid("account_ids", "account_ids must be UUIDs")
		}
	}
	if at == nil {
		rows, err := l.st.GetBalances(ctx, ids)
		if err != nil {
			return nil, fromStore(err)
		}
		out := make([]Balance, len(rows))
		for i, r := range rows {
			out[i] = balanceFromRow(r)
		}
		return out, nil
	}
	rows, err := l.st.BalancesAt(ctx, ids, *at)
	if err != nil {
		return nil, fromStore(err)
	}
	out := make([]Balance, len(rows))
	for i, r := range rows {
		if at.After(r.Now) {
			return nil, invalid("at", "at is in the future")
		}
		out[i] = Balance{
			AccountID: r.AccountID, Currency: r.Currency, Balance: r.Balance, Held: r.Held,
			Available:   available(Floor(r.Floor), r.Balance, r.Held, r.CreditLimit),
			CreditLimit: r.CreditLimit, Source: SourceStore, AsOf: *at,
			Final: !at.After(r.Now.Add(-l.limits.HistorySettleWindow)),
		}
	}
	return out, nil
}

// GetHold returns a hold; an open hold past its expiry reads as EXPIRED.
func (l *Ledger) GetHold(ctx context.Context, id uuid.UUID) (Hold, error) {
	h, err := l.st.GetHold(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return Hold{}, rejection(CodeNotFound, ReasonHoldNotFound, "hold %s not found", id)
	}
	if err != nil {
		return Hold{}, fromStore(err)
	}
	now, err := l.st.Now(ctx)
	if err != nil {
		return Hold{}, fromStore(err)
	}
	return toHold(h, now), nil
}
