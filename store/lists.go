package store

import (
	"context"
	"time"

	"github.com/google/uuid"
)

// ListOpenHolds returns up to limit holds of an account that are open and
// unexpired (by PostgreSQL's clock), in (expires_at, hold_id) order after
// (afterExpiry, afterID) (afterID uuid.Nil: from the start), read through
// the partial index of open holds.
func (s *Store) ListOpenHolds(ctx context.Context, account uuid.UUID, afterExpiry time.Time, afterID uuid.UUID, limit int) ([]Hold, time.Time, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+holdCols+`, clock_timestamp() FROM holds
		WHERE account_id = $1 AND status = 1 AND expires_at > clock_timestamp()
		  AND ($3::uuid IS NULL OR (expires_at, hold_id) > ($2, $3))
		ORDER BY expires_at, hold_id LIMIT $4`, account, afterExpiry, nullUUID(afterID), limit)
	if err != nil {
		return nil, time.Time{}, translate(err)
	}
	defer rows.Close()
	var out []Hold
	var now time.Time
	for rows.Next() {
		h, err := scanHold(rows, &now)
		if err != nil {
			return nil, time.Time{}, translate(err)
		}
		out = append(out, h)
	}
	return out, now, translate(rows.Err())
}

// ListRefunds returns up to limit REFUND transfers of a charge in
// (created_at, transfer_id) order after (afterAt, afterID) (afterID
// uuid.Nil: from the start), through the refund_of index.
func (s *Store) ListRefunds(ctx context.Context, charge uuid.UUID, afterAt time.Time, afterID uuid.UUID, limit int) ([]Transfer, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+transferCols+` FROM transfers
		WHERE refund_of = $1 AND ($3::uuid IS NULL OR (created_at, transfer_id) > ($2, $3))
		ORDER BY created_at, transfer_id LIMIT $4`, charge, afterAt, nullUUID(afterID), limit)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []Transfer
	for rows.Next() {
		t, err := scanTransfer(rows)
		if err != nil {
			return nil, translate(err)
		}
		out = append(out, t)
	}
	return out, translate(rows.Err())
}

func nullUUID(id uuid.UUID) uuid.NullUUID { return uuid.NullUUID{UUID: id, Valid: id != uuid.Nil} }
