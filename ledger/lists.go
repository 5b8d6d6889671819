package ledger

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
)

// ListOpenHolds pages through an account's open, unexpired holds, soonest
// expiry first.
func (l *Ledger) ListOpenHolds(ctx context.Context, account uuid.UUID, pageSize int, token string) ([]Hold, string, error) {
	size, err := l.limits.pageSize(pageSize)
	if err != nil {
		return nil, "", err
	}
	query := "holds|" + account.String()
	at, after, err := timeIDCursor(query, token)
	if err != nil {
		return nil, "", err
	}
	if token == "" {
		if _, err := l.GetAccount(ctx, account); err != nil {
			return nil, "", err
		}
	}
	rows, now, err := l.st.ListOpenHolds(ctx, account, at, after, size+1)
	if err != nil {
		return nil, "", fromStore(err)
	}
	out := make([]Hold, len(rows))
	for i, h := range rows {
		out[i] = toHold(h, now)
	}
	next := ""
	if n := pageCut(min(len(out), size), func(i int) int { return holdBytes(out[i]) }, l.limits.PageBytesMax); n < len(out) {
		out = out[:n]
		next = timeIDToken(query, out[n-1].ExpiresAt, out[n-1].ID)
	}
	return out, next, nil
}

// ListRefunds pages through the refunds of a charge, oldest first.
func (l *Ledger) ListRefunds(ctx context.Context, charge uuid.UUID, pageSize int, token string) ([]Transfer, string, error) {
	size, err := l.limits.pageSize(pageSize)
	if err != nil {
		return nil, "", err
	}
	query := "refunds|" + charge.String()
	at, after, err := timeIDCursor(query, token)
	if err != nil {
		return nil, "", err
	}
	if token == "" {
		if _, err := l.GetTransfer(ctx, charge); err != nil {
			return nil, "", err
		}
	}
	rows, err := l.st.ListRefunds(ctx, charge, at, after, size+1)
	if err != nil {
		return nil, "", fromStore(err)
	}
	out := make([]Transfer, len(rows))
	for i, t := range rows {
		out[i] = toTransfer(t)
	}
	next := ""
	if n := pageCut(min(len(out), size), func(i int) int { return transferBytes(out[i]) }, l.limits.PageBytesMax); n < len(out) {
		out = out[:n]
		next = timeIDToken(query, out[n-1].CreatedAt, out[n-1].ID)
	}
	return out, next, nil
}

// timeIDToken is a page token continuing after (at, id).
func timeIDToken(query string, at time.Time, id uuid.UUID) string {
	return encodeToken(query, pageCursor{After: fmt.Sprintf("%d|%s", at.UnixNano(), id)})
}

// timeIDCursor decodes a timeIDToken ("": the start, uuid.Nil).
func timeIDCursor(query, token string) (time.Time, uuid.UUID, error) {
	if token == "" {
		return time.Time{}, uuid.Nil, nil
	}
	c, err := decodeToken(query, token)
	if err != nil {
		return time.Time{}, uuid.Nil, err
	}
	var nanos int64
	var idText string
	if _, err := fmt.Sscanf(c.After, "%d|%s", &nanos, &idText); err == nil {
		if id, err := uuid.Parse(idText); err == nil && id != uuid.Nil {
			return time.Unix(0, nanos).UTC(), id, nil
		}
	}
	return time.Time{}, uuid.Nil, invalid("page_token", "page_token is malformed or belongs to another query")
}
