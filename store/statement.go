package store

import (
	"context"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// StatementQuery selects one page of an account's statement. Shards lists
// the rows backing the account (the account itself first); a position is
// (created_at, index into Shards, sequence).
type StatementQuery struct {
	Shards   []uuid.UUID
	From, To time.Time
	// After is the position of the last line of the previous page (Valid
	// false: the first page).
	After StatementPos
	Limit int
}

// StatementPos is a line's position in a statement.
type StatementPos struct {
	Valid bool
	At    time.Time
	Shard int
	Seq   int64
}

// StatementLine is an entry with its transfer's details.
type StatementLine struct {
	Entry
	Shard       int
	Description string
}

// KindTotal sums the entries of one transfer kind.
type KindTotal struct {
	Kind            int16
	Count           int64
	Credits, Debits int64
}

// StatementPage is what one statement page needs, all read in one
// snapshot: the balances before From, before the page and before To, the
// page's lines and the period's totals.
type StatementPage struct {
	Opening, PageOpening, Closing int64
	Lines                         []StatementLine
	Totals                        []KindTotal
	// Now is PostgreSQL's clock when the read ran.
	Now time.Time
}

// Statement reads one page of a statement in a read-only REPEATABLE READ
// transaction, so the balances, lines and totals agree. Every statement
// reads entries through the (account_id, created_at, sequence) index, one
// shard at a time.
func (s *Store) Statement(ctx context.Context, q StatementQuery) (StatementPage, error) {
	var p StatementPage
	tx, err := s.begin(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return p, translate(err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&p.Now); err != nil {
		return p, translate(err)
	}
	if p.Opening, err = balanceBefore(ctx, tx, q.Shards, StatementPos{Valid: true, At: q.From, Shard: -1}); err != nil {
		return p, err
	}
	if p.Closing, err = balanceBefore(ctx, tx, q.Shards, StatementPos{Valid: true, At: q.To, Shard: -1}); err != nil {
		return p, err
	}
	p.PageOpening = p.Opening
	if q.After.Valid {
		if p.PageOpening, err = balanceBefore(ctx, tx, q.Shards, q.After); err != nil {
			return p, err
		}
	}
	if p.Lines, err = statementLines(ctx, tx, q); err != nil {
		return p, err
	}
	if p.Totals, err = statementTotals(ctx, tx, q); err != nil {
		return p, err
	}
	return p, translate(tx.Commit(ctx))
}

// balanceBefore sums, over the shards, the balance_after of each shard's
// last entry at or before position pos (Shard -1 at At: every entry dated
// before At).
func balanceBefore(ctx context.Context, tx pgx.Tx, shards []uuid.UUID, pos StatementPos) (int64, error) {
	var sum int64
	err := tx.QueryRow(ctx, `SELECT coalesce(sum(x.balance_after), 0)::bigint
		FROM unnest($1::uuid[]) WITH ORDINALITY AS s(id, n), LATERAL (
			SELECT e.balance_after FROM entries e
			WHERE e.account_id = s.id AND e.created_at <= $2
			  AND (e.created_at < $2 OR s.n - 1 < $3 OR (s.n - 1 = $3 AND e.sequence <= $4))
			ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1) x`,
		shards, pos.At, pos.Shard, pos.Seq).Scan(&sum)
	return sum, translate(err)
}

// statementLines reads up to q.Limit lines after q.After, in position
// order: per shard a range of the (account_id, created_at, sequence)
// index, merged.
func statementLines(ctx context.Context, tx pgx.Tx, q StatementQuery) ([]StatementLine, error) {
	after := q.After
	if !after.Valid {
		after = StatementPos{At: q.From, Shard: -1, Seq: 0}
	}
	rows, err := tx.Query(ctx, `SELECT x.transfer_id, x.account_id, x.sequence, x.amount, x.balance_after,
			x.version_after, x.created_at, t.created_by_client, coalesce(t.created_by_key, ''), t.kind,
			(s.n - 1)::int, t.description
		FROM unnest($1::uuid[]) WITH ORDINALITY AS s(id, n), LATERAL (
			SELECT e.* FROM entries e
			WHERE e.account_id = s.id AND e.created_at >= $2 AND e.created_at < $3 AND e.created_at >= $4
			  AND (e.created_at > $4 OR s.n - 1 > $5 OR (s.n - 1 = $5 AND e.sequence > $6))
			ORDER BY e.created_at, e.sequence LIMIT $7) x
		JOIN transfers t ON t.transfer_id = x.transfer_id
		ORDER BY x.created_at, s.n, x.sequence
		LIMIT $7`, q.Shards, q.From, q.To, after.At, after.Shard, after.Seq, q.Limit)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []StatementLine
	for rows.Next() {
		var l StatementLine
		var by uuid.NullUUID
		if err := rows.Scan(&l.TransferID, &l.AccountID, &l.Sequence, &l.Amount, &l.BalanceAfter, &l.VersionAfter,
			&l.CreatedAt, &by, &l.CreatedByKey, &l.Kind, &l.Shard, &l.Description); err != nil {
			return nil, translate(err)
		}
		l.CreatedByClient = by.UUID
		out = append(out, l)
	}
	return out, translate(rows.Err())
}

// statementTotals sums the period's entries per transfer kind.
func statementTotals(ctx context.Context, tx pgx.Tx, q StatementQuery) ([]KindTotal, error) {
	rows, err := tx.Query(ctx, `SELECT t.kind, count(*), coalesce(sum(e.amount) FILTER (WHERE e.amount > 0), 0)::bigint,
			coalesce(sum(e.amount) FILTER (WHERE e.amount < 0), 0)::bigint
		FROM entries e JOIN transfers t ON t.transfer_id = e.transfer_id
		WHERE e.account_id = ANY ($1::uuid[]) AND e.created_at >= $2 AND e.created_at < $3
		GROUP BY t.kind ORDER BY t.kind`, q.Shards, q.From, q.To)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []KindTotal
	for rows.Next() {
		var k KindTotal
		if err := rows.Scan(&k.Kind, &k.Count, &k.Credits, &k.Debits); err != nil {
			return nil, translate(err)
		}
		out = append(out, k)
	}
	return out, translate(rows.Err())
}
