package store

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Tx is one PostgreSQL transaction of a money movement. Every money-moving
// call runs in exactly one Tx and is acknowledged only after Commit.
type Tx struct {
	tx pgx.Tx
}

// InTx runs fn in a READ COMMITTED transaction and commits it when fn returns
// nil. A failure to commit (including a lost connection during COMMIT) is
// ErrUnavailable: the caller does not know the outcome and must retry with
// the same idempotency key.
func (s *Store) InTx(ctx context.Context, fn func(*Tx) error) (err error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return translate(err)
	}
	defer func() {
		if err != nil {
			// Rollback on a dead connection fails too; the server rolls the
			// transaction back when the connection drops.
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	if err = fn(&Tx{tx: tx}); err != nil {
		// Tx methods return translated errors already; anything else is the
		// caller's own error and passes through untouched.
		return err
	}
	if err = tx.Commit(ctx); err != nil {
		return translate(err)
	}
	return nil
}

const keyCols = `scope, idempotency_key, fingerprint, kind, transfer_id, account_id,
	coalesce(error_code, ''), coalesce(error_reason, ''), coalesce(error_message, ''), created_at`

func scanKey(r rowScanner) (KeyRecord, error) {
	var k KeyRecord
	err := r.Scan(&k.Scope, &k.Key, &k.Fingerprint, &k.Kind, &k.TransferID, &k.AccountID,
		&k.ErrorCode, &k.ErrorReason, &k.ErrorMessage, &k.CreatedAt)
	return k, err
}

// LockForPosting serializes on the idempotency key, reads its stored outcome
// and locks the accounts involved, in one round trip.
//
// The transaction-scoped advisory lock on the key makes concurrent requests
// with one key (from any tallyd process) run one after another: the first
// records the outcome, the rest find it and replay it. The key row's primary
// key backs this: two transactions that somehow both inserted a key cannot
// both commit. Accounts are locked in account_id order so that two postings
// touching the same pair never deadlock.
func (t *Tx) LockForPosting(ctx context.Context, p PostLock) (Locked, error) {
	b := &pgx.Batch{}
	b.Queue(`SELECT pg_advisory_xact_lock(hashtextextended(length($1)::text || ':' || $1 || $2, 0))`, p.Scope, p.Key)
	b.Queue(`SELECT `+keyCols+` FROM idempotency_keys WHERE scope = $1 AND idempotency_key = $2`, p.Scope, p.Key)
	b.Queue(`SELECT `+accountCols+` FROM accounts
		WHERE account_id = $1
		   OR account_id = $2::uuid
		   OR ($2::uuid IS NULL AND system_role = $3
		       AND currency = (SELECT currency FROM accounts WHERE account_id = $1))
		ORDER BY account_id
		FOR UPDATE`, p.Primary, p.Counterparty, p.SystemRole)
	b.Queue(`SELECT clock_timestamp()`)
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()

	var out Locked
	if _, err := br.Exec(); err != nil {
		return Locked{}, translate(err)
	}
	k, err := scanKey(br.QueryRow())
	switch {
	case err == nil:
		out.Key = &k
	case errors.Is(err, pgx.ErrNoRows):
	default:
		return Locked{}, translate(err)
	}
	rows, err := br.Query()
	if err != nil {
		return Locked{}, translate(err)
	}
	for rows.Next() {
		a, err := scanAccount(rows)
		if err != nil {
			rows.Close()
			return Locked{}, translate(err)
		}
		out.Accounts = append(out.Accounts, a)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return Locked{}, translate(err)
	}
	if err := br.QueryRow().Scan(&out.Now); err != nil {
		return Locked{}, translate(err)
	}
	return out, translate(br.Close())
}

// WritePosting writes a successful posting: the transfer, both entries, both
// account rows and the key's outcome, pipelined in one round trip.
func (t *Tx) WritePosting(ctx context.Context, p Posting) error {
	tr := p.Transfer
	b := &pgx.Batch{}
	b.Queue(`INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
		amount, currency, description, metadata, created_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		tr.ID, tr.Scope, tr.Key, tr.Kind, tr.DebitAccountID, tr.CreditAccountID,
		tr.Amount, tr.Currency, tr.Description, encodeMeta(tr.Metadata), tr.CreatedAt)
	for _, e := range p.Entries {
		b.Queue(`INSERT INTO entries (transfer_id, account_id, sequence, amount, balance_after, version_after, created_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7)`,
			e.TransferID, e.AccountID, e.Sequence, e.Amount, e.BalanceAfter, e.VersionAfter, e.CreatedAt)
	}
	for _, u := range p.Updates {
		b.Queue(`UPDATE accounts SET balance = $2, version = $3, last_sequence = $4, last_entry_at = $5
			WHERE account_id = $1 AND version = $6`,
			u.AccountID, u.Balance, u.Version, u.LastSequence, u.LastEntryAt, u.PrevVersion)
	}
	queueKey(b, p.Key)
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()
	for i := 0; i < b.Len(); i++ {
		tag, err := br.Exec()
		if err != nil {
			return translate(err)
		}
		if tag.RowsAffected() != 1 {
			// The rows were locked by LockForPosting; a version that moved
			// means the locking is broken. Abort rather than commit it.
			return &Error{Kind: ErrInternal, cause: fmt.Errorf("posting statement %d affected %d rows", i, tag.RowsAffected())}
		}
	}
	return translate(br.Close())
}

// WriteRejection records a business rejection as the key's final outcome.
func (t *Tx) WriteRejection(ctx context.Context, k KeyRecord) error {
	b := &pgx.Batch{}
	queueKey(b, k)
	return translate(t.tx.SendBatch(ctx, b).Close())
}

func queueKey(b *pgx.Batch, k KeyRecord) {
	b.Queue(`INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, kind, transfer_id, account_id,
		error_code, error_reason, error_message)
		VALUES ($1, $2, $3, $4, $5, $6, nullif($7, ''), nullif($8, ''), nullif($9, ''))`,
		k.Scope, k.Key, k.Fingerprint, k.Kind, k.TransferID, k.AccountID, k.ErrorCode, k.ErrorReason, k.ErrorMessage)
}

const transferCols = `transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
	amount, currency, description, metadata, created_at`

func scanTransfer(r rowScanner) (Transfer, error) {
	var t Transfer
	var meta []byte
	err := r.Scan(&t.ID, &t.Scope, &t.Key, &t.Kind, &t.DebitAccountID, &t.CreditAccountID,
		&t.Amount, &t.Currency, &t.Description, &meta, &t.CreatedAt)
	if err != nil {
		return Transfer{}, err
	}
	t.Metadata, err = decodeMeta(meta)
	return t, err
}

// GetTransfer returns a transfer by id.
func (s *Store) GetTransfer(ctx context.Context, id uuid.UUID) (Transfer, error) {
	t, err := scanTransfer(s.pool.QueryRow(ctx, `SELECT `+transferCols+` FROM transfers WHERE transfer_id = $1`, id))
	return t, translate(err)
}

// GetKey returns the stored outcome of an idempotency key.
func (s *Store) GetKey(ctx context.Context, scope, key string) (KeyRecord, error) {
	k, err := scanKey(s.pool.QueryRow(ctx, `SELECT `+keyCols+` FROM idempotency_keys WHERE scope = $1 AND idempotency_key = $2`, scope, key))
	return k, translate(err)
}

// GetEntry returns the entry a transfer made on one account.
func (s *Store) GetEntry(ctx context.Context, transferID, accountID uuid.UUID) (Entry, error) {
	var e Entry
	err := s.pool.QueryRow(ctx, `SELECT transfer_id, account_id, sequence, amount, balance_after, version_after, created_at
		FROM entries WHERE transfer_id = $1 AND account_id = $2`, transferID, accountID).
		Scan(&e.TransferID, &e.AccountID, &e.Sequence, &e.Amount, &e.BalanceAfter, &e.VersionAfter, &e.CreatedAt)
	return e, translate(err)
}
