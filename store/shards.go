package store

import (
	"context"
	"fmt"
	"math"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// ShardsMax bounds the shards of one account (shard 0 included).
const ShardsMax = 64

// ShardBalanceMax bounds the balance of each shard of a sharded account
// (either sign), so that the account's balance, the sum of at most
// ShardsMax shards, always fits an int64 (accounts_shard_balance_range).
const ShardBalanceMax = math.MaxInt64 / ShardsMax

// ApplicationName is how tallyd's connections name themselves to
// PostgreSQL. Releases before sharded system accounts named theirs
// "tallyd" (previousApplicationName); PreviousReleaseConnected looks for
// those.
const (
	ApplicationName         = "tallyd/sharded"
	previousApplicationName = "tallyd"
)

// PreviousReleaseConnected reports whether a tallyd of a release that does
// not know shards is connected to this database. While one is, no shards
// are added: it would read a sharded account's own row as its balance, and
// change the status of that row only (docs/OPERATIONS.md, "Upgrading").
// Through a connection pooler that hides client names this sees none: the
// upgrade procedure there is to replace every tallyd before raising
// --system-shards above 1.
func (s *Store) PreviousReleaseConnected(ctx context.Context) (bool, error) {
	var found bool
	err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
		WHERE datname = current_database() AND application_name = $1)`, previousApplicationName).Scan(&found)
	return found, translate(err)
}

// AddShards makes sure account id has at least total shards (shard 0, its
// own row, included) and returns every shard's id in index order. Shards
// are only ever added, each a new accounts row with no history, under the
// lock of the account's own row, so running it online is safe: a batch
// that already locked a shard keeps it, and one that plans with an older,
// shorter list simply uses fewer shards.
func (s *Store) AddShards(ctx context.Context, id uuid.UUID, total int) ([]uuid.UUID, error) {
	if total < 1 || total > ShardsMax {
		return nil, &Error{Kind: ErrInternal, cause: fmt.Errorf("shards: total %d outside 1..%d", total, ShardsMax)}
	}
	var out []uuid.UUID
	err := s.InTx(ctx, func(t *Tx) error {
		var a Account
		var err error
		a, err = scanAccount(t.tx.QueryRow(ctx, `SELECT `+accountCols+` FROM accounts WHERE account_id = $1 FOR UPDATE`, id))
		if err != nil {
			return translate(err)
		}
		if a.ShardOf != uuid.Nil {
			return &Error{Kind: ErrInternal, cause: fmt.Errorf("shards: %s is itself a shard", id)}
		}
		for i := int(a.ShardCount) + 1; i < total; i++ {
			sid, err := uuid.NewV7()
			if err != nil {
				return &Error{Kind: ErrInternal, cause: err}
			}
			if _, err := t.tx.Exec(ctx, `INSERT INTO accounts
				(account_id, currency, type, floor, status, metadata, shard_of, shard_index)
				VALUES ($1, $2, $3, 2, $4, '{}', $5, $6)`, sid, a.Currency, a.Type, a.Status, id, i); err != nil {
				return translate(err)
			}
		}
		if int(a.ShardCount)+1 < total {
			if _, err := t.tx.Exec(ctx, `UPDATE accounts SET shard_count = $2 WHERE account_id = $1`, id, total-1); err != nil {
				return translate(err)
			}
		}
		out, err = shardIDs(ctx, t.tx, id)
		return err
	})
	return out, err
}

func shardIDs(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, id uuid.UUID) ([]uuid.UUID, error) {
	rows, err := q.Query(ctx, `SELECT account_id FROM accounts WHERE shard_of = $1 ORDER BY shard_index`, id)
	if err != nil {
		return nil, translate(err)
	}
	rest, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, translate(err)
	}
	return append([]uuid.UUID{id}, rest...), nil
}

// Shards returns the ids of an account's shards in index order (just the
// account itself when it has none).
func (s *Store) Shards(ctx context.Context, id uuid.UUID) ([]uuid.UUID, error) {
	return shardIDs(ctx, s.pool, id)
}

// AccountFacts are the attributes of an account that never change once it
// exists, which is why the ledger may keep them in memory and plan a
// batch's locks from them.
type AccountFacts struct {
	ID       uuid.UUID
	Currency string
	Type     int16
	// ShardOf is the account this row is a shard of (uuid.Nil: none).
	ShardOf uuid.UUID
	// Shards are, for an account with shards, every shard's id in index
	// order (itself first); nil otherwise. Shards are only ever added, so
	// the list can only be short, never wrong.
	Shards []uuid.UUID
}

// HoldFacts are the accounts a hold names, which never change.
type HoldFacts struct {
	ID, AccountID, RevenueAccountID uuid.UUID
	Currency                        string
	// RevenueShards are the shards of the named revenue account, when it
	// has shards (as AccountFacts.Shards).
	RevenueShards []uuid.UUID
}

// ChargeFacts are the accounts a transfer names, which never change.
type ChargeFacts struct {
	ID, DebitAccountID, CreditAccountID uuid.UUID
}

// Facts is what ReadFacts found; unknown ids are left out.
type Facts struct {
	Accounts map[uuid.UUID]AccountFacts
	Holds    map[uuid.UUID]HoldFacts
	Charges  map[uuid.UUID]ChargeFacts
}

// ReadFacts reads the unchanging facts of accounts, holds and transfers in
// one pipelined round trip, without locking anything: the ledger plans a
// batch's locks from them. Each id is found through its primary key.
func (t *Tx) ReadFacts(ctx context.Context, accounts, holds, charges []uuid.UUID) (Facts, error) {
	out := Facts{Accounts: map[uuid.UUID]AccountFacts{}, Holds: map[uuid.UUID]HoldFacts{}, Charges: map[uuid.UUID]ChargeFacts{}}
	b := &pgx.Batch{}
	// One primary-key probe per id, whatever the statistics say: the LIMIT
	// keeps each lookup a subquery of its own (the accounts a batch names
	// for the first time are often new, while the table's statistics are
	// still those of a smaller table).
	b.Queue(`SELECT a.* FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS q(id)) q,
		LATERAL (SELECT a.account_id, a.currency, a.type, a.shard_of,
			CASE WHEN a.shard_count > 0 THEN ARRAY(SELECT s.account_id FROM accounts s
			     WHERE s.shard_of = a.account_id ORDER BY s.shard_index) END
			FROM accounts a WHERE a.account_id = q.id LIMIT 1) a`, ids(accounts))
	b.Queue(`SELECT h.hold_id, h.account_id, h.revenue_account_id, h.currency,
			CASE WHEN r.shard_count > 0 THEN ARRAY(SELECT s.account_id FROM accounts s
			     WHERE s.shard_of = r.account_id ORDER BY s.shard_index) END
		FROM holds h LEFT JOIN accounts r ON r.account_id = h.revenue_account_id
		WHERE h.hold_id = ANY (ARRAY(SELECT unnest($1::uuid[])))`, ids(holds))
	b.Queue(`SELECT transfer_id, debit_account_id, credit_account_id FROM transfers
		WHERE transfer_id = ANY (ARRAY(SELECT unnest($1::uuid[])))`, ids(charges))
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()
	err := readEach(br, func(rows pgx.Rows) error {
		var f AccountFacts
		var shardOf uuid.NullUUID
		var rest []uuid.UUID
		if err := rows.Scan(&f.ID, &f.Currency, &f.Type, &shardOf, &rest); err != nil {
			return err
		}
		f.ShardOf, f.Shards = shardOf.UUID, shardList(f.ID, rest)
		out.Accounts[f.ID] = f
		return nil
	})
	if err != nil {
		return Facts{}, err
	}
	err = readEach(br, func(rows pgx.Rows) error {
		var h HoldFacts
		var rev uuid.NullUUID
		var rest []uuid.UUID
		if err := rows.Scan(&h.ID, &h.AccountID, &rev, &h.Currency, &rest); err != nil {
			return err
		}
		h.RevenueAccountID = rev.UUID
		h.RevenueShards = shardList(h.RevenueAccountID, rest)
		out.Holds[h.ID] = h
		return nil
	})
	if err != nil {
		return Facts{}, err
	}
	err = readEach(br, func(rows pgx.Rows) error {
		var c ChargeFacts
		if err := rows.Scan(&c.ID, &c.DebitAccountID, &c.CreditAccountID); err != nil {
			return err
		}
		out.Charges[c.ID] = c
		return nil
	})
	if err != nil {
		return Facts{}, err
	}
	return out, translate(br.Close())
}

// readEach reads the next result of a pipelined batch, calling scan for
// each row.
func readEach(br pgx.BatchResults, scan func(pgx.Rows) error) error {
	rows, err := br.Query()
	if err != nil {
		return translate(err)
	}
	defer rows.Close()
	for rows.Next() {
		if err := scan(rows); err != nil {
			return translate(err)
		}
	}
	return translate(rows.Err())
}

// shardList is the shard list of account id given its further shards as
// read (nil when it has none: rest is NULL for an account without shards).
func shardList(id uuid.UUID, rest []uuid.UUID) []uuid.UUID {
	if rest == nil {
		return nil
	}
	return append([]uuid.UUID{id}, rest...)
}
