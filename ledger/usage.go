package ledger

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// Spend breakdowns: every batch adds its charges and refunds to two daily
// rollups in its own transaction (store/migrations/00005_usage.sql), and
// SummarizeUsage sums them. See docs/ARCHITECTURE.md, "Spend breakdowns".

// UsageDimensionsMax is how many metadata keys the rollup can group by.
const UsageDimensionsMax = 3

// UsageDimensionValueBytesMax bounds a dimension value in the rollup (a
// longer metadata value is cut at a UTF-8 boundary). It equals the default
// --metadata-value-bytes-max, so by default nothing is cut.
const UsageDimensionValueBytesMax = 512

// Group-by names other than dimension keys.
const (
	UsageGroupAccount = "account"
	UsageGroupRevenue = "revenue_account"
	UsageGroupDay     = "day"
	UsageGroupMonth   = "month"
)

// ValidateUsageDimensions checks a --usage-dimensions list: at most three
// distinct, non-empty metadata keys, none of them a reserved group-by name.
func ValidateUsageDimensions(keys []string) error {
	if len(keys) > UsageDimensionsMax {
		return fmt.Errorf("at most %d usage dimensions, got %d", UsageDimensionsMax, len(keys))
	}
	seen := map[string]bool{}
	for _, k := range keys {
		switch {
		case k == "":
			return fmt.Errorf("usage dimension names must not be empty")
		case k == UsageGroupAccount || k == UsageGroupRevenue || k == UsageGroupDay || k == UsageGroupMonth:
			return fmt.Errorf("usage dimension %q is a reserved group-by name", k)
		case seen[k]:
			return fmt.Errorf("usage dimension %q is listed twice", k)
		case len(k) > MetadataKeyBytesMaxDefault || strings.ContainsAny(k, "\x00,"):
			return fmt.Errorf("usage dimension %q is not a valid metadata key", k)
		}
		seen[k] = true
	}
	return nil
}

type usageConfig struct {
	keys []string
	mu   sync.Mutex
	set  int16 // 0 until resolved
}

// usageSetID returns the id of this process's dimension set, registering
// it on first use (one query per process).
func (l *Ledger) usageSetID(ctx context.Context) (int16, error) {
	l.usage.mu.Lock()
	defer l.usage.mu.Unlock()
	if l.usage.set != 0 {
		return l.usage.set, nil
	}
	id, err := l.st.UsageDimensionSet(ctx, l.usage.keys)
	if err != nil {
		return 0, err
	}
	l.usage.set = id
	return id, nil
}

// UsageDimensions returns the configured dimension keys.
func (l *Ledger) UsageDimensions() []string { return append([]string{}, l.usage.keys...) }

// usageDay is the rollup's day of an instant: its UTC date.
func usageDay(t time.Time) string { return t.UTC().Format(time.DateOnly) }

func usageDims(keys []string, meta map[string]string) [3]string {
	var d [3]string
	for i, k := range keys {
		v := meta[k]
		if len(v) > UsageDimensionValueBytesMax {
			v = v[:UsageDimensionValueBytesMax]
			for !utf8.ValidString(v) {
				v = v[:len(v)-1]
			}
		}
		d[i] = v
	}
	return d
}

// usageRollup adds what wk is about to write to the rollups: each CHARGE
// (captures and SubmitBatch charges included) to charged on its own day,
// each REFUND to refunded on its own day under its charge's dimensions.
// It sums per row first: an upsert may touch a row only once per statement.
func (wk *work) usageRollup(keys []string, set int16) {
	type key struct {
		acct, rev uuid.UUID
		day       string
		dims      [3]string
	}
	per := map[key]int{}
	tot := map[key]int{}
	add := func(m map[key]int, rows *[]store.UsageAdd, k key, currency string, amount int64, refund bool) {
		i, ok := m[k]
		if !ok {
			i = len(*rows)
			m[k] = i
			*rows = append(*rows, store.UsageAdd{AccountID: k.acct, RevenueAccountID: k.rev, Day: k.day, Dims: k.dims, Currency: currency})
		}
		r := &(*rows)[i]
		if refund {
			r.Refunded += amount
			r.Refunds++
		} else {
			r.Charged += amount
			r.Charges++
		}
	}
	for _, tr := range wk.w.Transfers {
		var (
			k      key
			meta   map[string]string
			refund bool
		)
		switch Kind(tr.Kind) {
		case KindCharge:
			k.acct, k.rev, meta = tr.DebitAccountID, tr.CreditAccountID, tr.Metadata
		case KindRefund:
			c, ok := wk.charges[tr.RefundOf]
			if !ok {
				panic(fmt.Sprintf("ledger: refund %s of a charge %s that was not read", tr.ID, tr.RefundOf))
			}
			k.acct, k.rev, meta, refund = tr.CreditAccountID, tr.DebitAccountID, c.Metadata, true
		default:
			continue
		}
		k.day, k.dims = usageDay(tr.CreatedAt), usageDims(keys, meta)
		add(per, &wk.w.Usage, k, tr.Currency, tr.Amount, refund)
		k.acct = uuid.Nil
		add(tot, &wk.w.UsageTotals, k, tr.Currency, tr.Amount, refund)
	}
	wk.w.UsageSetID = set
}

// UsageQuery asks for a spend breakdown.
type UsageQuery struct {
	// At most one of AccountID and ExternalRef (every account with that
	// external_ref); neither: all accounts.
	AccountID   uuid.UUID
	ExternalRef string
	// From and To are UTC midnights: the days From <= day < To.
	From, To time.Time
	// GroupBy names dimension keys, "account", "revenue_account", and one
	// of "day" and "month". Rows are always split by currency.
	GroupBy []string
}

// UsageRow is one group of a spend breakdown. Amounts are minor units.
type UsageRow struct {
	Currency         string
	AccountID        uuid.UUID // when grouped by account
	RevenueAccountID uuid.UUID // when grouped by revenue_account
	// Period is YYYY-MM-DD (by day), YYYY-MM (by month) or "".
	Period string
	// Dimensions holds each grouped key's value ("" when the charges did
	// not carry the key). A key is absent when the rows were written while
	// tallyd was not configured to track it.
	Dimensions map[string]string
	Charged    int64
	Refunded   int64
	// Net is Charged - Refunded.
	Net     int64
	Charges int64
	Refunds int64
}

// UsageSummary is SummarizeUsage's answer.
type UsageSummary struct {
	Rows []UsageRow
	// Dimensions are the keys this tallyd tracks now.
	Dimensions []string
}

func parseUsageDay(field, s string) (time.Time, error) {
	t, err := time.Parse(time.DateOnly, s)
	if err != nil {
		return time.Time{}, invalid(field, "%s must be a date YYYY-MM-DD", field)
	}
	return t, nil
}

// ParseUsageDays parses a [from, to) range of YYYY-MM-DD dates (UTC).
func ParseUsageDays(from, to string) (time.Time, time.Time, error) {
	f, err := parseUsageDay("from_day", from)
	if err != nil {
		return time.Time{}, time.Time{}, err
	}
	t, err := parseUsageDay("to_day", to)
	if err != nil {
		return time.Time{}, time.Time{}, err
	}
	return f, t, nil
}

// SummarizeUsage totals charges and refunds over [From, To), grouped as
// asked, from the rollups.
func (l *Ledger) SummarizeUsage(ctx context.Context, q UsageQuery) (UsageSummary, error) {
	if q.AccountID != uuid.Nil && q.ExternalRef != "" {
		return UsageSummary{}, invalid("account_id", "give at most one of account_id and external_ref")
	}
	if len(q.ExternalRef) > l.limits.ExternalRefBytesMax {
		return UsageSummary{}, invalid("external_ref", "external_ref is longer than %d bytes", l.limits.ExternalRefBytesMax)
	}
	for _, t := range []struct {
		field string
		v     time.Time
	}{{"from_day", q.From}, {"to_day", q.To}} {
		if t.v.IsZero() || !t.v.Equal(t.v.UTC().Truncate(24*time.Hour)) {
			return UsageSummary{}, invalid(t.field, "%s must be a UTC day boundary", t.field)
		}
	}
	if !q.From.Before(q.To) {
		return UsageSummary{}, invalid("to_day", "to_day must be after from_day")
	}
	if days := q.To.Sub(q.From) / (24 * time.Hour); days > time.Duration(l.limits.UsageRangeDaysMax) {
		return UsageSummary{}, invalid("to_day", "the range spans %d days; at most %d (--usage-range-days-max)", days, l.limits.UsageRangeDaysMax)
	}
	sq := store.UsageQuery{AccountID: q.AccountID, ExternalRef: q.ExternalRef, From: q.From.UTC(), To: q.To.UTC(),
		Limit: l.limits.UsageRowsMax + 1}
	seen := map[string]bool{}
	var known map[string]bool
	for _, g := range q.GroupBy {
		if seen[g] {
			return UsageSummary{}, invalid("group_by", "group_by lists %q twice", g)
		}
		seen[g] = true
		switch g {
		case UsageGroupAccount:
			sq.GroupByAccount = true
		case UsageGroupRevenue:
			sq.GroupByRevenue = true
		case UsageGroupDay, UsageGroupMonth:
			if sq.Period != "" {
				return UsageSummary{}, invalid("group_by", "group by day or by month, not both")
			}
			sq.Period = g
		default:
			if known == nil {
				var err error
				if known, err = l.st.UsageDimensionKeys(ctx); err != nil {
					return UsageSummary{}, fromStore(err)
				}
				for _, k := range l.usage.keys {
					known[k] = true
				}
			}
			if !known[g] {
				return UsageSummary{}, invalid("group_by", "%q is not a usage dimension (tracked: %s)", g, strings.Join(l.usage.keys, ", "))
			}
			sq.Dims = append(sq.Dims, g)
		}
	}
	rows, err := l.st.SummarizeUsage(ctx, sq)
	if err != nil {
		return UsageSummary{}, fromStore(err)
	}
	if len(rows) > l.limits.UsageRowsMax {
		return UsageSummary{}, invalid("group_by", "the breakdown has more than %d rows (--usage-rows-max); narrow the range, the accounts or the grouping",
			l.limits.UsageRowsMax)
	}
	out := UsageSummary{Rows: make([]UsageRow, 0, len(rows)), Dimensions: l.UsageDimensions()}
	for _, r := range rows {
		u := UsageRow{Currency: r.Currency, AccountID: r.AccountID, RevenueAccountID: r.RevenueAccountID,
			Charged: r.Charged, Refunded: r.Refunded, Net: r.Charged - r.Refunded, Charges: r.Charges, Refunds: r.Refunds}
		switch sq.Period {
		case UsageGroupDay:
			u.Period = r.Period.Format(time.DateOnly)
		case UsageGroupMonth:
			u.Period = r.Period.Format("2006-01")
		}
		if len(sq.Dims) > 0 {
			u.Dimensions = map[string]string{}
			for i, k := range sq.Dims {
				if r.Dims[i] != nil {
					u.Dimensions[k] = *r.Dims[i]
				}
			}
		}
		out.Rows = append(out.Rows, u)
	}
	return out, nil
}
