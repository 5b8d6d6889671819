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
	if c == ConsistencyCached && l.cache != nil {
		cctx, cancel := context.WithTimeout(ctx, cacheCallTimeout)
		b, ok := l.cache.Get(cctx, id)
		cancel()
		if ok && b.Version >= minVersion {
			return Balance{
				AccountID: id, Currency: b.Currency, Balance: b.Balance, Available: b.Available,
				CreditLimit: b.CreditLimit, Version: b.Version, Source: SourceCache, AsOf: b.AsOf,
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
	b := Balance{
		AccountID: id, Currency: row.Currency, Balance: row.Balance,
		Available: available(Floor(row.Floor), row.Balance, row.CreditLimit), CreditLimit: row.CreditLimit,
		Version: row.Version, Source: SourceStore, AsOf: row.ReadAt,
	}
	l.cachePut(ctx, cache.Balance{
		AccountID: id, Currency: b.Currency, Balance: b.Balance, CreditLimit: b.CreditLimit,
		Available: b.Available, Version: b.Version, AsOf: b.AsOf,
	})
	return b, nil
}
