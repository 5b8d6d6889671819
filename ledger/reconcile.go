package ledger

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/store"
)

// Reconciliation check names, as reported in findings.
const (
	CheckBalanceVsEntries = "balance_vs_entries"
	CheckEntrySequence    = "entry_sequence"
	CheckRunningBalance   = "running_balance"
	CheckHeldVsHolds      = "held_vs_holds"
	CheckCacheMismatch    = "cache_mismatch"
	CheckCurrencySum      = store.CheckCurrencySum
	CheckTransferEntries  = store.CheckTransferEntries
	CheckRefundsWithin    = store.CheckRefundsWithin
	// CheckTopUpCredited and CheckTopUpCreditOrphan tie top-ups to their
	// credits (their findings' TransferID is the top-up or the credit).
	CheckTopUpCredited     = store.CheckTopUpCredited
	CheckTopUpCreditOrphan = store.CheckTopUpCreditOrphan
)

// Reconcile limits.
const (
	// ReconcilePageSizeDefault is how many accounts one short statement
	// checks; ReconcilePageSizeMax bounds what a caller may ask for.
	ReconcilePageSizeDefault = 500
	ReconcilePageSizeMax     = 5000
	// ReconcileAccountsMax bounds an explicit selection.
	ReconcileAccountsMax = 10000
	// ReconcileStatementTimeoutDefault bounds each ledger-wide check (one
	// statement over whole tables: tens of seconds at 10 million entries).
	ReconcileStatementTimeoutDefault = 10 * time.Minute
)

// ReconcileRequest selects what to check.
type ReconcileRequest struct {
	// AccountIDs selects accounts; empty checks all of them.
	AccountIDs []uuid.UUID
	PageSize   int
	// RepairCache deletes cached balances that disagree with PostgreSQL.
	RepairCache bool
	// Provider also compares the top-up provider's payments created in
	// [ProviderFrom, ProviderTo) with the top-ups (zero times: the last
	// ProviderWindowDefault).
	Provider                 bool
	ProviderFrom, ProviderTo time.Time
}

// Finding is one thing reconciliation found wrong.
type Finding struct {
	Check      string
	AccountID  uuid.UUID
	TransferID uuid.UUID
	Currency   string
	Detail     string
	// Repaired: the cached value was deleted (--repair-cache).
	Repaired bool
}

// ReconcileSummary is the outcome of a run.
type ReconcileSummary struct {
	AccountsChecked int64
	Findings        int64
}

// cacheDeleter is the part of the cache that repair needs.
type cacheDeleter interface {
	Delete(ctx context.Context, id uuid.UUID)
}

// Reconcile proves the books add up. Each page of accounts is checked in one
// short statement (no long snapshot holds back vacuum): balance = sum of
// entries, sequences gapless, running balances consistent, held = open
// holds, and the cached balance agrees with PostgreSQL. Then the global sums
// run, each as one statement. Findings and progress go to the callbacks as
// they come; an error from a callback stops the run.
func (l *Ledger) Reconcile(ctx context.Context, r ReconcileRequest, found func(Finding) error,
	progress func(checked, total int64) error) (ReconcileSummary, error) {
	if r.PageSize <= 0 {
		r.PageSize = ReconcilePageSizeDefault
	}
	if r.PageSize > ReconcilePageSizeMax {
		return ReconcileSummary{}, invalid("page_size", "page_size must be at most %d", ReconcilePageSizeMax)
	}
	if len(r.AccountIDs) > ReconcileAccountsMax {
		return ReconcileSummary{}, invalid("account_ids", "at most %d accounts per selection", ReconcileAccountsMax)
	}
	var sum ReconcileSummary
	report := func(f Finding) error {
		sum.Findings++
		return found(f)
	}
	total := int64(len(r.AccountIDs))
	if total == 0 {
		n, err := l.st.CountAccounts(ctx)
		if err != nil {
			return sum, fromStore(err)
		}
		total = n
	}
	after := uuid.Nil
	for page := 0; ; page++ {
		var only []uuid.UUID
		if len(r.AccountIDs) > 0 {
			lo := page * r.PageSize
			if lo >= len(r.AccountIDs) {
				break
			}
			only = r.AccountIDs[lo:min(lo+r.PageSize, len(r.AccountIDs))]
		}
		checks, err := l.st.CheckAccounts(ctx, after, only, r.PageSize)
		if err != nil {
			return sum, fromStore(err)
		}
		if len(checks) == 0 && only == nil {
			break
		}
		for _, c := range checks {
			after = c.AccountID
			for _, f := range accountFindings(c) {
				if err := report(f); err != nil {
					return sum, err
				}
			}
		}
		if err := l.checkCache(ctx, checks, r.RepairCache, report); err != nil {
			return sum, err
		}
		sum.AccountsChecked += int64(len(checks))
		if err := progress(sum.AccountsChecked, total); err != nil {
			return sum, err
		}
		if only == nil && len(checks) < r.PageSize {
			break
		}
	}
	if len(r.AccountIDs) == 0 {
		global, err := l.st.CheckGlobal(ctx, l.limits.ReconcileStatementTimeout)
		if err != nil {
			return sum, fromStore(err)
		}
		for _, g := range global {
			if err := report(Finding{Check: g.Check, Currency: g.Currency, TransferID: g.ID, Detail: g.Detail}); err != nil {
				return sum, err
			}
		}
	}
	if r.Provider {
		if err := l.reconcileProvider(ctx, r.ProviderFrom, r.ProviderTo, report); err != nil {
			return sum, err
		}
	}
	return sum, nil
}

func accountFindings(c store.AccountCheck) []Finding {
	var out []Finding
	add := func(check, format string, args ...any) {
		out = append(out, Finding{Check: check, AccountID: c.AccountID, Currency: c.Currency, Detail: fmt.Sprintf(format, args...)})
	}
	if !c.BalanceOK {
		add(CheckBalanceVsEntries, "balance %d, entries sum to %s", c.Balance, c.EntrySum)
	}
	if !c.SequenceOK {
		add(CheckEntrySequence, "last_sequence %d, %d entries", c.LastSequence, c.Entries)
	}
	if !c.RunningOK {
		add(CheckRunningBalance, "some balance_after is not the running sum of amounts")
	}
	if !c.HeldOK {
		add(CheckHeldVsHolds, "held %d, open holds sum to %s", c.Held, c.OpenHeld)
	}
	return out
}

// cachePeeker reads many cached values in one round trip.
type cachePeeker interface {
	Peek(ctx context.Context, ids []uuid.UUID) map[uuid.UUID]cache.Balance
}

// checkCache compares a page's cached balances (read first, in one round
// trip) with PostgreSQL's (read after, in one statement): a cached version
// ahead of PostgreSQL's, or the same version with other figures, is a value
// that never existed. Older cached versions are allowed (the TTL promise).
func (l *Ledger) checkCache(ctx context.Context, page []store.AccountCheck, repair bool, report func(Finding) error) error {
	p, ok := l.cache.(cachePeeker)
	if l.cache == nil || !ok || len(page) == 0 {
		return nil
	}
	ids := make([]uuid.UUID, len(page))
	for i, c := range page {
		ids[i] = c.AccountID
	}
	cctx, cancel := context.WithTimeout(ctx, cacheCallTimeout)
	cached := p.Peek(cctx, ids)
	cancel()
	if len(cached) == 0 {
		return nil
	}
	hit := make([]uuid.UUID, 0, len(cached))
	for id := range cached {
		hit = append(hit, id)
	}
	rows, err := l.st.GetBalances(ctx, hit)
	if err != nil {
		return fromStore(err)
	}
	for _, row := range rows {
		c := cached[row.AccountID]
		if c.Version < row.Version || (c.Version == row.Version && c.Balance == row.Balance && c.Held == row.Held) {
			continue
		}
		f := Finding{Check: CheckCacheMismatch, AccountID: row.AccountID, Currency: row.Currency,
			Detail: fmt.Sprintf("cache has version %d balance %d held %d; PostgreSQL version %d balance %d held %d",
				c.Version, c.Balance, c.Held, row.Version, row.Balance, row.Held)}
		if d, ok := l.cache.(cacheDeleter); ok && repair {
			dctx, cancel := context.WithTimeout(ctx, cacheCallTimeout)
			d.Delete(dctx, row.AccountID)
			cancel()
			f.Repaired = true
		}
		if err := report(f); err != nil {
			return err
		}
	}
	return nil
}
