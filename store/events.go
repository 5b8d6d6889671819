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
// in (xid, event_id) order, but only from transactions below a bound that
// every transaction able to add a row there has passed: the reader's own
// snapshot's xmax, lowered to the oldest transaction still in progress in
// that snapshot. A reader that resumes from the last position it got never
// skips a committed event and never sees one twice.
//
// In-progress transactions that pg_stat_activity shows running in another
// database are left out of the bound: they cannot write this database's
// events, and counting them would let any long transaction on the cluster
// (a bulk load, a report) stall the feed. A transaction whose database is
// not known (it ended since the snapshot, or its session is hidden from this
// role) still counts: that only delays the feed until the next read.
func (s *Store) ReadEvents(ctx context.Context, afterXid uint64, afterID int64, limit int) ([]EventRow, error) {
	rows, err := s.pool.Query(ctx, `WITH snap AS (SELECT pg_current_snapshot() AS s),
		bound AS (
			SELECT least(pg_snapshot_xmax(snap.s), (
				SELECT min(x) FROM pg_snapshot_xip(snap.s) AS x
				WHERE NOT EXISTS (
					SELECT 1 FROM pg_stat_activity a
					WHERE a.datname IS NOT NULL AND a.datname <> current_database()
					  AND a.backend_xid IS NOT NULL
					  AND a.backend_xid::text = (x::text::numeric % 4294967296)::text))) AS b
			FROM snap)
		SELECT e.xid::text, e.event_id, e.kind, e.subject_id, e.account_id, e.payload, e.created_at
		FROM events e, bound
		WHERE (e.xid, e.event_id) > ($1::text::xid8, $2)
		  AND e.xid < bound.b
		ORDER BY e.xid, e.event_id
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
