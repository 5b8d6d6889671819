package ledger

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// Event is one entry of the change feed: a committed transfer (any kind,
// refunds and captures included), a hold's creation or final action, an
// account change, or a low-balance crossing.
type Event struct {
	// Cursor is the feed position just after this event: resuming from it
	// continues with the next one.
	Cursor        string
	Kind          string
	Transfer      *Transfer
	Hold          *Hold
	AccountChange *AccountChangeEvent
	LowBalance    *LowBalanceEvent
	// TopUp is a top-up's new state (started, succeeded, failed).
	TopUp     *TopUp
	CreatedAt time.Time
}

// AccountChangeEvent records a lifecycle change of an account.
type AccountChangeEvent struct {
	AccountID       uuid.UUID
	Action          string
	VersionAfter    int64
	Before, After   map[string]any
	CreatedByClient uuid.UUID
	CreatedByKey    string
	CreatedAt       time.Time
}

// LowBalanceEvent records a debit or hold that took an account's available
// amount below its low-balance threshold.
type LowBalanceEvent struct {
	AccountID  uuid.UUID
	TransferID uuid.UUID
	HoldID     uuid.UUID
	Available  int64
	Threshold  int64
	CreatedAt  time.Time
}

// Event kinds.
const (
	EventTransfer      = store.EventTransfer
	EventHold          = store.EventHold
	EventAccountChange = store.EventAccountChange
	EventLowBalance    = store.EventLowBalance
	EventTopUp         = store.EventTopUp
)

// ExportPageSizeMaxDefault bounds the events one ReadEvents call returns.
const ExportPageSizeMaxDefault = 1000

// cursorPrefix versions the cursor format.
const cursorPrefix = "c1."

// FormatCursor renders a feed position. The zero position is "" (the start).
func formatCursor(xid uint64, id int64) string {
	return cursorPrefix + strconv.FormatUint(xid, 10) + "." + strconv.FormatInt(id, 10)
}

func parseCursor(s string) (uint64, int64, error) {
	if s == "" {
		return 0, 0, nil
	}
	rest, ok := strings.CutPrefix(s, cursorPrefix)
	x, i, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 {
		return 0, 0, invalid("cursor", "not a feed cursor")
	}
	xid, err := strconv.ParseUint(x, 10, 64)
	if err != nil {
		return 0, 0, invalid("cursor", "not a feed cursor")
	}
	id, err := strconv.ParseInt(i, 10, 64)
	if err != nil || id < 0 {
		return 0, 0, invalid("cursor", "not a feed cursor")
	}
	return xid, id, nil
}

// ReadEvents returns up to limit events after cursor ("" = the beginning)
// and the cursor to resume from (the given one when there is nothing new).
// Events appear only once every transaction that could precede them has
// finished, so a reader that always resumes from the returned cursor sees
// every committed event exactly once.
func (l *Ledger) ReadEvents(ctx context.Context, cursor string, limit int) ([]Event, string, error) {
	if limit <= 0 || limit > ExportPageSizeMaxDefault {
		limit = ExportPageSizeMaxDefault
	}
	xid, id, err := parseCursor(cursor)
	if err != nil {
		return nil, "", err
	}
	rows, err := l.st.ReadEvents(ctx, xid, id, limit)
	if err != nil {
		return nil, "", fromStore(err)
	}
	out := make([]Event, 0, len(rows))
	next := cursor
	for _, r := range rows {
		e := Event{Kind: r.Kind, CreatedAt: r.CreatedAt, Cursor: formatCursor(r.Xid, r.ID)}
		var target any
		switch r.Kind {
		case EventTransfer:
			e.Transfer = &Transfer{}
			target = e.Transfer
		case EventHold:
			e.Hold = &Hold{}
			target = e.Hold
		case EventAccountChange:
			e.AccountChange = &AccountChangeEvent{}
			target = e.AccountChange
		case EventLowBalance:
			e.LowBalance = &LowBalanceEvent{}
			target = e.LowBalance
		case EventTopUp:
			e.TopUp = &TopUp{}
			target = e.TopUp
		default:
			return nil, "", fromStore(fmt.Errorf("event kind %q: %w", r.Kind, store.ErrInternal))
		}
		if err := json.Unmarshal(r.Payload, target); err != nil {
			return nil, "", fromStore(fmt.Errorf("event %d payload: %v: %w", r.ID, err, store.ErrInternal))
		}
		out = append(out, e)
		next = e.Cursor
	}
	return out, next, nil
}

// feedEvents builds the change-feed rows of what wk is about to write.
func (wk *work) feedEvents() {
	add := func(kind string, subject, account uuid.UUID, v any, at time.Time) {
		b, err := json.Marshal(v)
		if err != nil {
			panic(fmt.Sprintf("ledger: encoding a %s event: %v", kind, err))
		}
		wk.w.Events = append(wk.w.Events, store.EventRow{Kind: kind, SubjectID: subject, AccountID: account, Payload: b, CreatedAt: at})
	}
	for _, h := range wk.w.Holds {
		add(EventHold, h.ID, h.AccountID, toHold(h, wk.now), h.CreatedAt)
	}
	for _, tr := range wk.w.Transfers {
		add(EventTransfer, tr.ID, tr.DebitAccountID, toTransfer(tr), tr.CreatedAt)
	}
	for _, c := range wk.w.HoldChanges {
		h := wk.holds[c.HoldID]
		if h == nil {
			panic(fmt.Sprintf("ledger: change of unknown hold %s", c.HoldID))
		}
		add(EventHold, h.ID, h.AccountID, toHold(*h, wk.now), c.FinalizedAt)
	}
	for _, c := range wk.w.Changes {
		add(EventAccountChange, c.AccountID, c.AccountID, AccountChangeEvent{
			AccountID: c.AccountID, Action: c.Action, VersionAfter: c.VersionAfter, Before: c.Before, After: c.After,
			CreatedByClient: c.CreatedByClient, CreatedByKey: c.CreatedByKey, CreatedAt: c.CreatedAt,
		}, c.CreatedAt)
	}
	for _, lb := range wk.lowBalance {
		subject := lb.TransferID
		if subject == uuid.Nil {
			subject = lb.HoldID
		}
		add(EventLowBalance, subject, lb.AccountID, lb, lb.CreatedAt)
	}
}

// CompareCursors orders two feed cursors: -1 when a is before b, 0 when
// they are the same position, +1 when a is after b.
func CompareCursors(a, b string) (int, error) {
	ax, ai, err := parseCursor(a)
	if err != nil {
		return 0, err
	}
	bx, bi, err := parseCursor(b)
	if err != nil {
		return 0, err
	}
	switch {
	case ax < bx || (ax == bx && ai < bi):
		return -1, nil
	case ax == bx && ai == bi:
		return 0, nil
	}
	return 1, nil
}
