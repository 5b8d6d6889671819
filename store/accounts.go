package store

import (
	"context"
	"encoding/json"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

const accountCols = `account_id, currency, type, external_ref, floor, credit_limit, status, metadata,
	coalesce(system_role, ''), balance, version, last_sequence, last_entry_at, created_at,
	held, next_hold_expiry, low_balance_threshold, shard_of, shard_index, shard_count, topup_threshold`

// accountViewCols are accountCols as callers see an account: the balance
// and version of an account with shards are the sums over its shards, read
// in the statement's one snapshot (a shard's own row reads as itself).
var accountViewCols = strings.Replace(strings.Replace(accountCols,
	` balance,`, ` balance + `+shardSum("balance", "accounts")+` AS balance,`, 1),
	` version,`, ` version + `+shardSum("version", "accounts")+` AS version,`, 1)

// shardSum is the sum of column col over the further shards of the
// accounts row aliased t (0 when it has none: one integer test, no probe).
func shardSum(col, t string) string {
	return `CASE WHEN ` + t + `.shard_count > 0 THEN (SELECT coalesce(sum(s.` + col + `), 0) FROM accounts s
		WHERE s.shard_of = ` + t + `.account_id)::bigint ELSE 0 END`
}

type rowScanner interface{ Scan(dest ...any) error }

func scanAccount(r rowScanner) (Account, error) {
	var a Account
	var meta []byte
	var shardOf uuid.NullUUID
	err := r.Scan(&a.ID, &a.Currency, &a.Type, &a.ExternalRef, &a.Floor, &a.CreditLimit, &a.Status, &meta,
		&a.SystemRole, &a.Balance, &a.Version, &a.LastSequence, &a.LastEntryAt, &a.CreatedAt,
		&a.Held, &a.NextHoldExpiry, &a.LowBalanceThreshold, &shardOf, &a.ShardIndex, &a.ShardCount, &a.TopUpThreshold)
	if err != nil {
		return Account{}, err
	}
	a.ShardOf = shardOf.UUID
	a.Metadata, err = decodeMeta(meta)
	return a, err
}

func encodeMeta(m map[string]string) []byte {
	if m == nil {
		m = map[string]string{}
	}
	b, err := json.Marshal(m)
	if err != nil {
		panic(err) // a map[string]string always marshals
	}
	return b
}

func decodeMeta(b []byte) (map[string]string, error) {
	m := map[string]string{}
	if len(b) == 0 {
		return m, nil
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, &Error{Kind: ErrInternal, cause: err}
	}
	return m, nil
}

// CreateAccount inserts a. When an account with a.ID exists already, it
// returns the stored one with created=false and changes nothing.
func (s *Store) CreateAccount(ctx context.Context, a Account) (acct Account, created bool, err error) {
	row := s.pool.QueryRow(ctx, `INSERT INTO accounts
		(account_id, currency, type, external_ref, floor, credit_limit, status, metadata, system_role)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, nullif($9, ''))
		ON CONFLICT (account_id) DO NOTHING
		RETURNING `+accountCols,
		a.ID, a.Currency, a.Type, a.ExternalRef, a.Floor, a.CreditLimit, a.Status, encodeMeta(a.Metadata), a.SystemRole)
	acct, err = scanAccount(row)
	if err == nil {
		return acct, true, nil
	}
	if err != pgx.ErrNoRows {
		return Account{}, false, translate(err)
	}
	acct, err = s.GetAccount(ctx, a.ID)
	return acct, false, err
}

// EnsureSystemAccount returns the currency's default account of the given
// role ("revenue" or "funding"), creating it on first use. Concurrent callers
// agree on one account through the partial unique index.
func (s *Store) EnsureSystemAccount(ctx context.Context, currency, role string, typ, floor int16) (uuid.UUID, error) {
	id, err := s.SystemAccountID(ctx, currency, role)
	if err == nil {
		return id, nil
	}
	if err != ErrNotFound {
		return uuid.Nil, err
	}
	newID, err := uuid.NewV7()
	if err != nil {
		return uuid.Nil, &Error{Kind: ErrInternal, cause: err}
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO accounts (account_id, currency, type, floor, status, system_role, metadata)
		VALUES ($1, $2, $3, $4, 1, $5, '{}')
		ON CONFLICT (currency, system_role) WHERE system_role IS NOT NULL DO NOTHING`,
		newID, currency, typ, floor, role)
	if err != nil {
		return uuid.Nil, translate(err)
	}
	return s.SystemAccountID(ctx, currency, role)
}

// SystemAccountID returns the currency's default account of the given role.
func (s *Store) SystemAccountID(ctx context.Context, currency, role string) (uuid.UUID, error) {
	var id uuid.UUID
	err := s.pool.QueryRow(ctx, `SELECT account_id FROM accounts WHERE currency = $1 AND system_role = $2`, currency, role).Scan(&id)
	return id, translate(err)
}

// GetAccount returns one account.
func (s *Store) GetAccount(ctx context.Context, id uuid.UUID) (Account, error) {
	a, err := scanAccount(s.pool.QueryRow(ctx, `SELECT `+accountViewCols+` FROM accounts WHERE account_id = $1`, id))
	return a, translate(err)
}

// AccountFilter selects accounts for FindAccounts. Zero fields match all.
type AccountFilter struct {
	ExternalRef string
	Currency    string
	Type        int16
	// After is the keyset cursor: only accounts with a larger id.
	After uuid.NullUUID
	Limit int
}

// FindAccounts returns up to f.Limit accounts matching f, ordered by id.
func (s *Store) FindAccounts(ctx context.Context, f AccountFilter) ([]Account, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+accountViewCols+` FROM accounts
		WHERE shard_of IS NULL AND ($1 = '' OR external_ref = $1)
		  AND ($2 = '' OR currency = $2)
		  AND ($3 = 0 OR type = $3)
		  AND ($4::uuid IS NULL OR account_id > $4)
		ORDER BY account_id
		LIMIT $5`, f.ExternalRef, f.Currency, f.Type, f.After, f.Limit)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []Account
	for rows.Next() {
		a, err := scanAccount(rows)
		if err != nil {
			return nil, translate(err)
		}
		out = append(out, a)
	}
	return out, translate(rows.Err())
}

// balanceSelect reads accounts a as of the time c.now, counting only holds
// that had not expired by then (held as stored may still include expired
// ones, see Account.Held), and the next expiry after c.now.
var balanceSelect = `SELECT a.account_id, a.currency, a.floor, a.balance + ` + shardSum("balance", "a") + `,
		a.credit_limit, a.version + ` + shardSum("version", "a") + `, c.now,
		a.held - CASE WHEN a.next_hold_expiry <= c.now THEN
			(SELECT coalesce(sum(h.amount), 0) FROM holds h
			 WHERE h.account_id = a.account_id AND h.status = 1 AND h.expires_at <= c.now)::bigint ELSE 0 END,
		CASE WHEN a.next_hold_expiry <= c.now THEN
			(SELECT min(h.expires_at) FROM holds h
			 WHERE h.account_id = a.account_id AND h.status = 1 AND h.expires_at > c.now)
		ELSE a.next_hold_expiry END,
		a.status, a.type`

func scanBalance(r rowScanner) (BalanceRow, error) {
	var b BalanceRow
	err := r.Scan(&b.AccountID, &b.Currency, &b.Floor, &b.Balance, &b.CreditLimit, &b.Version, &b.ReadAt,
		&b.Held, &b.NextHoldExpiry, &b.Status, &b.Type)
	return b, err
}

// GetBalance reads an account's balance straight from PostgreSQL. Held
// counts only the holds that have not expired by PostgreSQL's clock.
func (s *Store) GetBalance(ctx context.Context, id uuid.UUID) (BalanceRow, error) {
	b, err := scanBalance(s.pool.QueryRow(ctx, balanceSelect+`
		FROM accounts a, (SELECT clock_timestamp() AS now) c WHERE a.account_id = $1`, id))
	return b, translate(err)
}

// GetBalances reads many balances in one statement, in the order of ids;
// unknown ids are left out. The redundant account_id = ANY (...) makes the
// accounts be found through the primary key (a join with unnest alone may
// be planned as a hash join over every account).
func (s *Store) GetBalances(ctx context.Context, ids []uuid.UUID) ([]BalanceRow, error) {
	rows, err := s.pool.Query(ctx, balanceSelect+`
		FROM unnest($1::uuid[]) WITH ORDINALITY AS q(id, n)
		JOIN accounts a ON a.account_id = q.id, (SELECT clock_timestamp() AS now) c
		WHERE a.account_id = ANY (ARRAY(SELECT unnest($1::uuid[])))
		ORDER BY q.n`, ids)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []BalanceRow
	for rows.Next() {
		b, err := scanBalance(rows)
		if err != nil {
			return nil, translate(err)
		}
		out = append(out, b)
	}
	return out, translate(rows.Err())
}

// HistoricalBalance is an account's balance at an instant, from its entries.
type HistoricalBalance struct {
	AccountID   uuid.UUID
	Currency    string
	Floor       int16
	CreditLimit int64
	Balance     int64
	Held        int64
	// Sequence is the account's last entry at the instant (0: none yet).
	Sequence int64
	// Now is PostgreSQL's clock when the read ran.
	Now time.Time
}

// BalancesAt returns each account's balance at instant at: the balance_after
// of its last entry dated at or before it, and the holds open at it. The
// credit limit is today's (limit changes are in account_changes). As in
// GetBalances, account_id = ANY (...) keeps accounts read by primary key.
func (s *Store) BalancesAt(ctx context.Context, ids []uuid.UUID, at time.Time) ([]HistoricalBalance, error) {
	rows, err := s.pool.Query(ctx, `SELECT a.account_id, a.currency, a.floor, a.credit_limit,
			coalesce(e.balance_after, 0) + CASE WHEN a.shard_count > 0 THEN (
				SELECT coalesce(sum(x.balance_after), 0) FROM accounts s, LATERAL (
					SELECT balance_after FROM entries
					WHERE account_id = s.account_id AND created_at <= $2
					ORDER BY created_at DESC, sequence DESC LIMIT 1) x
				WHERE s.shard_of = a.account_id)::bigint ELSE 0 END,
			coalesce(e.sequence, 0),
			(SELECT coalesce(sum(h.amount), 0) FROM holds h
			 WHERE h.account_id = a.account_id AND h.created_at <= $2
			   AND (h.finalized_at IS NULL OR h.finalized_at > $2) AND h.expires_at > $2)::bigint,
			clock_timestamp()
		FROM unnest($1::uuid[]) WITH ORDINALITY AS q(id, n)
		JOIN accounts a ON a.account_id = q.id
		LEFT JOIN LATERAL (
			SELECT balance_after, sequence FROM entries
			WHERE account_id = a.account_id AND created_at <= $2
			ORDER BY created_at DESC, sequence DESC LIMIT 1) e ON true
		WHERE a.account_id = ANY (ARRAY(SELECT unnest($1::uuid[])))
		ORDER BY q.n`, ids, at)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []HistoricalBalance
	for rows.Next() {
		var h HistoricalBalance
		if err := rows.Scan(&h.AccountID, &h.Currency, &h.Floor, &h.CreditLimit, &h.Balance, &h.Sequence,
			&h.Held, &h.Now); err != nil {
			return nil, translate(err)
		}
		out = append(out, h)
	}
	return out, translate(rows.Err())
}

// EntryFilter pages through an account's entries by sequence.
type EntryFilter struct {
	AccountID     uuid.UUID
	AfterSequence int64
	Start, End    *time.Time
	// Kinds, when not empty, keeps only entries of transfers of these kinds.
	Kinds []int16
	// NewestFirst pages backwards: sequences below AfterSequence (0: from
	// the newest).
	NewestFirst bool
	Limit       int
}

// ListEntries returns up to f.Limit entries of an account, oldest first,
// each with the audit trail of its transfer.
func (s *Store) ListEntries(ctx context.Context, f EntryFilter) ([]Entry, error) {
	// Two spellings rather than one ORDER BY CASE, so each walks the
	// (account_id, sequence) primary key in its direction instead of
	// sorting an account's whole history.
	cond, order := `e.sequence > $2`, `e.sequence`
	if f.NewestFirst {
		cond, order = `($2 = 0 OR e.sequence < $2)`, `e.sequence DESC`
	}
	rows, err := s.pool.Query(ctx, `SELECT e.transfer_id, e.account_id, e.sequence, e.amount, e.balance_after,
		e.version_after, e.created_at, t.created_by_client, coalesce(t.created_by_key, ''), t.kind
		FROM entries e JOIN transfers t ON t.transfer_id = e.transfer_id
		WHERE e.account_id = $1 AND `+cond+`
		  AND ($3::timestamptz IS NULL OR e.created_at >= $3)
		  AND ($4::timestamptz IS NULL OR e.created_at < $4)
		  AND (cardinality($6::int2[]) = 0 OR t.kind = ANY($6))
		ORDER BY `+order+`
		LIMIT $5`, f.AccountID, f.AfterSequence, f.Start, f.End, f.Limit, kinds(f.Kinds))
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []Entry
	for rows.Next() {
		var e Entry
		var by uuid.NullUUID
		if err := rows.Scan(&e.TransferID, &e.AccountID, &e.Sequence, &e.Amount, &e.BalanceAfter, &e.VersionAfter,
			&e.CreatedAt, &by, &e.CreatedByKey, &e.Kind); err != nil {
			return nil, translate(err)
		}
		e.CreatedByClient = by.UUID
		out = append(out, e)
	}
	return out, translate(rows.Err())
}

func kinds(k []int16) []int16 {
	if k == nil {
		return []int16{}
	}
	return k
}

// ExpiringAccounts returns up to limit accounts with a hold stored as open
// past its expiry (by PostgreSQL's clock), for the sweeper.
func (s *Store) ExpiringAccounts(ctx context.Context, limit int) ([]uuid.UUID, error) {
	rows, err := s.pool.Query(ctx, `SELECT account_id FROM accounts
		WHERE next_hold_expiry <= clock_timestamp() ORDER BY next_hold_expiry LIMIT $1`, limit)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []uuid.UUID
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			return nil, translate(err)
		}
		out = append(out, id)
	}
	return out, translate(rows.Err())
}
