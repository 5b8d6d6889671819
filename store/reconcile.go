package store

import (
	"context"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// AccountCheck is what reconciliation found for one account: the stored
// figures and the ones recomputed from entries and holds. Each *OK field is
// decided by PostgreSQL (numeric arithmetic, so a tampered row cannot make
// the check itself overflow).
type AccountCheck struct {
	AccountID    uuid.UUID
	Currency     string
	Balance      int64
	Held         int64
	Version      int64
	LastSequence int64
	// EntrySum and OpenHeld are the recomputed values, as decimal text.
	EntrySum   string
	Entries    int64
	OpenHeld   string
	BalanceOK  bool // balance = sum of entries
	SequenceOK bool // sequences are exactly 1..last_sequence
	RunningOK  bool // each balance_after = running sum of amounts
	HeldOK     bool // held = sum of holds stored as open
}

// CheckAccounts checks up to limit accounts after the keyset cursor after
// (or exactly the accounts only, when given) in one short statement.
func (s *Store) CheckAccounts(ctx context.Context, after uuid.UUID, only []uuid.UUID, limit int) ([]AccountCheck, error) {
	rows, err := s.pool.Query(ctx, `WITH a AS (
			SELECT account_id, currency, balance, held, version, last_sequence FROM accounts
			WHERE (cardinality($2::uuid[]) = 0 AND account_id > $1) OR account_id = ANY($2::uuid[])
			ORDER BY account_id LIMIT $3),
		r AS (
			SELECT e.account_id, e.sequence, e.amount, e.balance_after,
			       sum(e.amount::numeric) OVER (PARTITION BY e.account_id ORDER BY e.sequence) AS running
			FROM entries e WHERE e.account_id IN (SELECT account_id FROM a)),
		e AS (
			SELECT account_id, count(*) AS n, sum(amount::numeric) AS total, min(sequence) AS mins, max(sequence) AS maxs,
			       count(*) FILTER (WHERE balance_after::numeric <> running) AS bad_running
			FROM r GROUP BY account_id),
		h AS (
			SELECT account_id, sum(amount::numeric) AS held FROM holds
			WHERE status = 1 AND account_id IN (SELECT account_id FROM a) GROUP BY account_id)
		SELECT a.account_id, a.currency, a.balance, a.held, a.version, a.last_sequence,
		       coalesce(e.total, 0)::text, coalesce(e.n, 0), coalesce(h.held, 0)::text,
		       a.balance::numeric = coalesce(e.total, 0),
		       coalesce(e.n, 0) = a.last_sequence AND (e.n IS NULL OR (e.mins = 1 AND e.maxs = e.n)),
		       coalesce(e.bad_running, 0) = 0,
		       a.held::numeric = coalesce(h.held, 0)
		FROM a LEFT JOIN e USING (account_id) LEFT JOIN h USING (account_id)
		ORDER BY a.account_id`, after, ids(only), limit)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []AccountCheck
	for rows.Next() {
		var c AccountCheck
		if err := rows.Scan(&c.AccountID, &c.Currency, &c.Balance, &c.Held, &c.Version, &c.LastSequence,
			&c.EntrySum, &c.Entries, &c.OpenHeld, &c.BalanceOK, &c.SequenceOK, &c.RunningOK, &c.HeldOK); err != nil {
			return nil, translate(err)
		}
		out = append(out, c)
	}
	return out, translate(rows.Err())
}

// GlobalFinding is one problem found by a ledger-wide check.
type GlobalFinding struct {
	Check    string
	Currency string
	ID       uuid.UUID // the transfer concerned, if any
	Detail   string
}

// Global check names.
const (
	CheckCurrencySum     = "currency_sum"
	CheckTransferEntries = "transfer_entries"
	CheckRefundsWithin   = "refunds_within_charge"
	// CheckTopUpCredited: a SUCCEEDED top-up without exactly one CREDIT of
	// its amount (the one it names); CheckTopUpCreditOrphan: a top-up
	// CREDIT without a SUCCEEDED top-up of its amount naming it.
	CheckTopUpCredited     = "topup_credited"
	CheckTopUpCreditOrphan = "topup_credit_orphan"
	globalFindingsPerKind  = 100
)

// TopUpScope is the idempotency scope of top-up credits (their keys are
// "topup:<top-up id>"); no API client's scope can equal it.
const TopUpScope = "tally:topup"

// CheckGlobal runs the ledger-wide checks, each as one statement: per
// currency all balances sum to zero; every transfer has exactly two entries
// summing to zero; the refunds of every charge add up to its recorded
// refunded total, which is at most the charge. At most 100 findings per check.
//
// Each statement reads whole tables, so it runs under its own statement
// timeout (timeout), not the short one that guards the write path; they run
// one after another in a read-only transaction that holds no locks.
func (s *Store) CheckGlobal(ctx context.Context, timeout time.Duration) ([]GlobalFinding, error) {
	tx, err := s.begin(ctx, pgx.TxOptions{AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, translate(err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, `SELECT set_config('statement_timeout', $1, true)`, strconv.FormatInt(timeout.Milliseconds(), 10)); err != nil {
		return nil, translate(err)
	}
	var out []GlobalFinding
	queries := []struct {
		check, sql string
	}{
		{CheckCurrencySum, `SELECT currency, NULL::uuid, 'balances sum to ' || sum(balance::numeric)::text
			FROM accounts GROUP BY currency HAVING sum(balance::numeric) <> 0 LIMIT $1`},
		{CheckTransferEntries, `SELECT t.currency, t.transfer_id, 'entries: ' || coalesce(x.n, 0)::text || ', sum ' || coalesce(x.total, 0)::text
			FROM transfers t
			LEFT JOIN (SELECT transfer_id, count(*) AS n, sum(amount::numeric) AS total FROM entries GROUP BY transfer_id) x
			  ON x.transfer_id = t.transfer_id
			WHERE x.n IS DISTINCT FROM 2 OR x.total <> 0
			LIMIT $1`},
		{CheckRefundsWithin, `SELECT c.currency, c.transfer_id,
			'charge ' || c.amount::text || ', refunds ' || coalesce(s.total, 0)::text || ', recorded ' || coalesce(r.refunded, 0)::text
			FROM transfers c
			LEFT JOIN charge_refunds r ON r.transfer_id = c.transfer_id
			LEFT JOIN (SELECT refund_of, sum(amount::numeric) AS total FROM transfers WHERE refund_of IS NOT NULL GROUP BY refund_of) s
			  ON s.refund_of = c.transfer_id
			WHERE (s.total IS NOT NULL OR r.refunded IS NOT NULL)
			  AND (coalesce(s.total, 0) <> coalesce(r.refunded, 0) OR coalesce(s.total, 0) > c.amount OR c.kind <> 1)
			LIMIT $1`},
		{CheckTopUpCredited, `SELECT p.currency, p.topup_id, 'top-up of ' || p.amount::text || ': ' || count(t.transfer_id)::text
			    || ' credits summing to ' || coalesce(sum(t.amount), 0)::text
			FROM topups p
			LEFT JOIN transfers t ON t.scope = '` + TopUpScope + `' AND t.idempotency_key = 'topup:' || p.topup_id::text
			WHERE p.status = 2
			GROUP BY p.topup_id, p.currency, p.amount, p.credit_transfer_id, p.account_id
			HAVING count(t.transfer_id) <> 1 OR coalesce(sum(t.amount), 0) <> p.amount
			    OR bool_or(t.transfer_id IS DISTINCT FROM p.credit_transfer_id OR t.kind <> 2 OR t.credit_account_id <> p.account_id)
			LIMIT $1`},
		{CheckTopUpCreditOrphan, `SELECT t.currency, t.transfer_id, 'a top-up credit of ' || t.amount::text
			    || ' (key ' || t.idempotency_key || ') without a SUCCEEDED top-up of that amount naming it'
			FROM transfers t
			WHERE t.scope = '` + TopUpScope + `' AND NOT EXISTS (
			  SELECT 1 FROM topups p WHERE p.credit_transfer_id = t.transfer_id AND p.status = 2 AND p.amount = t.amount)
			LIMIT $1`},
	}
	for _, q := range queries {
		rows, err := tx.Query(ctx, q.sql, globalFindingsPerKind)
		if err != nil {
			return nil, translate(err)
		}
		for rows.Next() {
			f := GlobalFinding{Check: q.check}
			var id uuid.NullUUID
			if err := rows.Scan(&f.Currency, &id, &f.Detail); err != nil {
				rows.Close()
				return nil, translate(err)
			}
			f.ID = id.UUID
			out = append(out, f)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, translate(err)
		}
	}
	return out, nil
}

// CountAccounts returns how many accounts exist (for progress).
func (s *Store) CountAccounts(ctx context.Context) (int64, error) {
	var n int64
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM accounts`).Scan(&n)
	return n, translate(err)
}
