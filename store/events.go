package store

import (
	"context"
	"strconv"
	"time"

	"github.com/google/uuid"
)

// EventRow is an events row: one change in the feed. Payload is JSON owned
// by the ledger.
type EventRow struct {
	// Xid and ID are the feed position: the writing transaction's id and the
	// event's id within the table.
	Xid       uint64
	ID        int64
	Kind      string
	SubjectID uuid.UUID
	AccountID uuid.UUID
	Payload   []byte
	CreatedAt time.Time
}

// Event kinds.
const (
	EventTransfer      = "transfer"
	EventHold          = "hold"
	EventAccountChange = "account_change"
	EventLowBalance    = "low_balance"
)

// ReadEvents returns up to limit events after position (afterXid, afterID),
// in (xid, event_id) order, but only from transactions below the xmin of a
// fresh snapshot: every transaction that could still add a row before that
// bound has finished, so a reader that resumes from the last position it got
// never skips a committed event and never sees one twice.
func (s *Store) ReadEvents(ctx context.Context, afterXid uint64, afterID int64, limit int) ([]EventRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT xid::text, event_id, kind, subject_id, account_id, payload, created_at
		FROM events
		WHERE (xid, event_id) > ($1::text::xid8, $2)
		  AND xid < pg_snapshot_xmin(pg_current_snapshot())
		ORDER BY xid, event_id
		LIMIT $3`, strconv.FormatUint(afterXid, 10), afterID, limit)
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []EventRow
	for rows.Next() {
		var e EventRow
		var xid string
		var acct uuid.NullUUID
		if err := rows.Scan(&xid, &e.ID, &e.Kind, &e.SubjectID, &acct, &e.Payload, &e.CreatedAt); err != nil {
			return nil, translate(err)
		}
		e.AccountID = acct.UUID
		if e.Xid, err = strconv.ParseUint(xid, 10, 64); err != nil {
			return nil, &Error{Kind: ErrInternal, cause: err}
		}
		out = append(out, e)
	}
	return out, translate(rows.Err())
}
