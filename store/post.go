package store

import (
	"context"
	"time"

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
	tx, err := s.begin(ctx, pgx.TxOptions{})
	if err != nil {
		return translate(err)
	}
	committed := false
	defer func() {
		if !committed {
			// Also runs when fn panics. Rollback on a dead connection fails
			// too; the server rolls the transaction back when it drops.
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	if err = fn(&Tx{tx: tx}); err != nil {
		// Tx methods return translated errors already; anything else is the
		// caller's own error and passes through untouched.
		return err
	}
	committed = true
	if err = tx.Commit(ctx); err != nil {
		return translate(err)
	}
	return nil
}

const keyCols = `scope, idempotency_key, fingerprint, kind, transfer_id, account_id,
	coalesce(error_code, ''), coalesce(error_reason, ''), coalesce(error_message, ''), created_at, hold_id`

func scanKey(r rowScanner) (KeyRecord, error) {
	var k KeyRecord
	err := r.Scan(&k.Scope, &k.Key, &k.Fingerprint, &k.Kind, &k.TransferID, &k.AccountID,
		&k.ErrorCode, &k.ErrorReason, &k.ErrorMessage, &k.CreatedAt, &k.HoldID)
	return k, err
}

const transferCols = `transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
	amount, currency, description, metadata, created_at, created_by_client, coalesce(created_by_key, ''),
	refund_of, hold_id, threshold_crossed,
	coalesce((SELECT r.refunded FROM charge_refunds r WHERE r.transfer_id = transfers.transfer_id), 0),
	(SELECT s.shard_of FROM accounts s WHERE s.account_id = transfers.debit_account_id),
	(SELECT s.shard_of FROM accounts s WHERE s.account_id = transfers.credit_account_id)`

func scanTransfer(r rowScanner) (Transfer, error) {
	var t Transfer
	var meta []byte
	var by, refundOf, hold, debitOf, creditOf uuid.NullUUID
	err := r.Scan(&t.ID, &t.Scope, &t.Key, &t.Kind, &t.DebitAccountID, &t.CreditAccountID,
		&t.Amount, &t.Currency, &t.Description, &meta, &t.CreatedAt, &by, &t.CreatedByKey,
		&refundOf, &hold, &t.ThresholdCrossed, &t.Refunded, &debitOf, &creditOf)
	if err != nil {
		return Transfer{}, err
	}
	t.DebitShardOf, t.CreditShardOf = debitOf.UUID, creditOf.UUID
	t.CreatedByClient, t.RefundOf, t.HoldID = by.UUID, refundOf.UUID, hold.UUID
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

// Now returns PostgreSQL's clock, which decides hold expiry.
func (s *Store) Now(ctx context.Context) (time.Time, error) {
	var now time.Time
	err := s.pool.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now)
	return now, translate(err)
}
