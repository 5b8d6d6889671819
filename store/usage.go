package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// UsageAdd is what one batch adds to one rollup row. In BatchWrite.Usage
// AccountID names the customer account; in BatchWrite.UsageTotals it is
// uuid.Nil (the row sums all customers of the revenue account). Each row
// appears at most once per batch: an upsert may touch a row only once per
// statement, so the ledger sums first.
type UsageAdd struct {
	AccountID        uuid.UUID
	RevenueAccountID uuid.UUID
	// Day is the UTC date, as YYYY-MM-DD.
	Day      string
	Dims     [3]string
	Currency string
	Charged  int64
	Refunded int64
	Charges  int64
	Refunds  int64
}

// UsageDimensionSet returns the id of the rollup's dimension set for keys
// (in slot order), creating it the first time. The set is never deleted.
func (s *Store) UsageDimensionSet(ctx context.Context, keys []string) (int16, error) {
	if keys == nil {
		keys = []string{}
	}
	var id int16
	var err error
	// A concurrent first registration of the same keys makes ours insert
	// nothing, and its row is invisible to our statement's snapshot: then
	// the next attempt (a new snapshot) finds it.
	for range 3 {
		err = s.pool.QueryRow(ctx, `WITH ins AS (
				INSERT INTO usage_dimension_sets (keys) VALUES ($1::text[])
				ON CONFLICT (keys) DO NOTHING RETURNING set_id)
			SELECT set_id FROM ins UNION ALL SELECT set_id FROM usage_dimension_sets WHERE keys = $1::text[]
			LIMIT 1`, keys).Scan(&id)
		if !errors.Is(err, pgx.ErrNoRows) {
			break
		}
	}
	return id, translate(err)
}

// UsageDimensionKeys returns every metadata key any dimension set has named.
func (s *Store) UsageDimensionKeys(ctx context.Context) (map[string]bool, error) {
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT unnest(keys) FROM usage_dimension_sets`)
	if err != nil {
		return nil, translate(err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, translate(err)
	}
	out := make(map[string]bool, len(keys))
	for _, k := range keys {
		out[k] = true
	}
	return out, nil
}

// queueUsage queues the rollup upsert of a batch: both tables in one
// statement (a data-modifying CTE), so the rollup costs one pipelined
// statement per batch. The database adds the sums.
func queueUsage(queue func(n int, sql string, args ...any), w BatchWrite) {
	cols := func(rows []UsageAdd) []any {
		n := len(rows)
		accts := make([]uuid.UUID, n)
		revs := make([]uuid.UUID, n)
		days := make([]string, n)
		d1 := make([]string, n)
		d2 := make([]string, n)
		d3 := make([]string, n)
		curs := make([]string, n)
		charged := make([]int64, n)
		refunded := make([]int64, n)
		charges := make([]int64, n)
		refunds := make([]int64, n)
		for i, r := range rows {
			accts[i], revs[i], days[i], curs[i] = r.AccountID, r.RevenueAccountID, r.Day, r.Currency
			d1[i], d2[i], d3[i] = r.Dims[0], r.Dims[1], r.Dims[2]
			charged[i], refunded[i], charges[i], refunds[i] = r.Charged, r.Refunded, r.Charges, r.Refunds
		}
		return []any{accts, revs, days, d1, d2, d3, curs, charged, refunded, charges, refunds}
	}
	args := append([]any{w.UsageSetID}, cols(w.Usage)...)
	args = append(args, cols(w.UsageTotals)[1:]...)
	queue(len(w.UsageTotals), `WITH per_account AS (
			INSERT INTO usage_daily AS u (account_id, revenue_account_id, day, set_id, dim1, dim2, dim3, currency,
			                              charged, refunded, charges, refunds)
			SELECT r.acct, r.rev, r.day::date, $1, r.d1, r.d2, r.d3, r.cur, r.charged, r.refunded, r.charges, r.refunds
			FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
			            $9::int8[], $10::int8[], $11::int8[], $12::int8[])
			  AS r(acct, rev, day, d1, d2, d3, cur, charged, refunded, charges, refunds)
			ON CONFLICT (account_id, day, revenue_account_id, set_id, dim1, dim2, dim3) DO UPDATE
			SET charged = u.charged + excluded.charged, refunded = u.refunded + excluded.refunded,
			    charges = u.charges + excluded.charges, refunds = u.refunds + excluded.refunds
			RETURNING 1)
		INSERT INTO usage_daily_totals AS t (revenue_account_id, day, set_id, dim1, dim2, dim3, currency,
		                                     charged, refunded, charges, refunds)
		SELECT r.rev, r.day::date, $1, r.d1, r.d2, r.d3, r.cur, r.charged, r.refunded, r.charges, r.refunds
		FROM unnest($13::uuid[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[],
		            $19::int8[], $20::int8[], $21::int8[], $22::int8[])
		  AS r(rev, day, d1, d2, d3, cur, charged, refunded, charges, refunds)
		ON CONFLICT (revenue_account_id, day, set_id, dim1, dim2, dim3) DO UPDATE
		SET charged = t.charged + excluded.charged, refunded = t.refunded + excluded.refunded,
		    charges = t.charges + excluded.charges, refunds = t.refunds + excluded.refunds`, args...)
}

// UsageQuery selects and groups rollup rows. Zero AccountID and empty
// ExternalRef select all accounts.
type UsageQuery struct {
	AccountID   uuid.UUID
	ExternalRef string
	// From and To are UTC dates: From <= day < To.
	From, To time.Time
	// GroupBy* say what the rows are grouped by besides currency.
	GroupByAccount, GroupByRevenue bool
	// Period is "", "day" or "month".
	Period string
	// Dims are metadata keys to group by.
	Dims []string
	// Limit bounds the rows returned.
	Limit int
}

// UsageRow is one group of a usage summary.
type UsageRow struct {
	Currency         string
	AccountID        uuid.UUID
	RevenueAccountID uuid.UUID
	// Period is the first day of the day or month grouped by (zero if none).
	Period time.Time
	// Dims holds the value of each grouped key; nil where the rows were
	// written under a dimension set that did not track the key.
	Dims     []*string
	Charged  int64
	Refunded int64
	Charges  int64
	Refunds  int64
}

// SummarizeUsage sums the rollup. Queries over all accounts that are not
// grouped by account read usage_daily_totals; the rest read usage_daily by
// its primary key.
func (s *Store) SummarizeUsage(ctx context.Context, q UsageQuery) ([]UsageRow, error) {
	table := "usage_daily_totals"
	if q.AccountID != uuid.Nil || q.ExternalRef != "" || q.GroupByAccount {
		table = "usage_daily"
	}
	args := []any{q.From, q.To}
	param := func(v any) string {
		args = append(args, v)
		return fmt.Sprintf("$%d", len(args))
	}
	where := []string{"u.day >= $1::date", "u.day < $2::date"}
	switch {
	case q.AccountID != uuid.Nil:
		where = append(where, "u.account_id = "+param(q.AccountID))
	case q.ExternalRef != "":
		where = append(where, "u.account_id IN (SELECT account_id FROM accounts WHERE external_ref = "+param(q.ExternalRef)+")")
	}
	groups := []string{"u.currency"}
	if q.GroupByAccount {
		groups = append(groups, "u.account_id")
	} else {
		groups = append(groups, "NULL::uuid")
	}
	if q.GroupByRevenue {
		// Rollup rows are keyed by the revenue shard a batch credited, so
		// concurrent committers never write one row; the sum is per
		// revenue account, over its shards.
		groups = append(groups, `coalesce((SELECT r.shard_of FROM accounts r
			WHERE r.account_id = u.revenue_account_id), u.revenue_account_id)`)
	} else {
		groups = append(groups, "NULL::uuid")
	}
	switch q.Period {
	case "day":
		groups = append(groups, "u.day")
	case "month":
		groups = append(groups, "date_trunc('month', u.day)::date")
	default:
		groups = append(groups, "NULL::date")
	}
	from := table + " u"
	if len(q.Dims) > 0 {
		from += " JOIN usage_dimension_sets s ON s.set_id = u.set_id"
	}
	for _, k := range q.Dims {
		p := param(k)
		groups = append(groups, fmt.Sprintf(
			"CASE WHEN s.keys[1] = %[1]s THEN u.dim1 WHEN s.keys[2] = %[1]s THEN u.dim2 WHEN s.keys[3] = %[1]s THEN u.dim3 END", p))
	}
	n := make([]string, len(groups))
	for i := range groups {
		n[i] = fmt.Sprint(i + 1)
	}
	sql := `SELECT ` + strings.Join(groups, ", ") + `,
		sum(u.charged)::int8, sum(u.refunded)::int8, sum(u.charges)::int8, sum(u.refunds)::int8
		FROM ` + from + ` WHERE ` + strings.Join(where, " AND ") + `
		GROUP BY ` + strings.Join(n, ", ") + ` ORDER BY ` + strings.Join(n, ", ") + ` LIMIT ` + param(q.Limit)
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []UsageRow
	for rows.Next() {
		var r UsageRow
		var acct, rev uuid.NullUUID
		var period *time.Time
		r.Dims = make([]*string, len(q.Dims))
		dest := []any{&r.Currency, &acct, &rev, &period}
		for i := range r.Dims {
			dest = append(dest, &r.Dims[i])
		}
		dest = append(dest, &r.Charged, &r.Refunded, &r.Charges, &r.Refunds)
		if err := rows.Scan(dest...); err != nil {
			return nil, translate(err)
		}
		r.AccountID, r.RevenueAccountID = acct.UUID, rev.UUID
		if period != nil {
			r.Period = *period
		}
		out = append(out, r)
	}
	return out, translate(rows.Err())
}
