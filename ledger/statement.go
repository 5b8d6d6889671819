package ledger

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// StatementQuery selects one page of an account's statement for the period
// [From, To).
type StatementQuery struct {
	AccountID uuid.UUID
	From, To  time.Time
	PageSize  int
	PageToken string
}

// StatementLine is one entry of a statement with the account's running
// balance after it.
type StatementLine struct {
	CreatedAt       time.Time
	Kind            Kind
	Description     string
	Amount          int64
	RunningBalance  int64
	TransferID      uuid.UUID
	CreatedByClient uuid.UUID
	CreatedByKey    string
	// ShardID is the entry's shard when it is a further shard of the
	// account (uuid.Nil for the account's own row).
	ShardID  uuid.UUID
	Sequence int64
}

// StatementTotal sums one kind's lines over the whole period.
type StatementTotal struct {
	Kind            Kind
	Count           int64
	Credits, Debits int64
}

// Statement is one page of a statement. Opening + the amounts of every
// line of every page = Closing; each line's RunningBalance is the previous
// line's (or the opening's) plus its amount.
type Statement struct {
	AccountID        uuid.UUID
	Currency         string
	From, To         time.Time
	Opening, Closing int64
	Lines            []StatementLine
	Totals           []StatementTotal
	// Final is false while To is within the settle window of now, as for
	// GetBalanceAt.
	Final         bool
	NextPageToken string
}

// GetStatement returns one page of an account's statement: the opening
// balance (entries dated before From), the period's entries in order with
// running balances, the closing balance (entries dated before To) and
// totals per kind, all read in one snapshot. A sharded account's lines are
// its shards' entries in (created_at, shard, sequence) order and its
// running balance is the sum over its shards.
func (l *Ledger) GetStatement(ctx context.Context, q StatementQuery) (Statement, error) {
	size, err := l.limits.pageSize(q.PageSize)
	if err != nil {
		return Statement{}, err
	}
	if err := validatePeriod(q.From, q.To); err != nil {
		return Statement{}, err
	}
	acct, err := l.GetAccount(ctx, q.AccountID)
	if err != nil {
		return Statement{}, err
	}
	shards, err := l.st.Shards(ctx, q.AccountID)
	if err != nil {
		return Statement{}, fromStore(err)
	}
	query := fmt.Sprintf("statement|%s|%d|%d", q.AccountID, q.From.UnixNano(), q.To.UnixNano())
	sq := store.StatementQuery{Shards: shards, From: q.From, To: q.To, Limit: size + 1}
	if q.PageToken != "" {
		if sq.After, err = statementCursor(query, q.PageToken, len(shards)); err != nil {
			return Statement{}, err
		}
	}
	page, err := l.st.Statement(ctx, sq)
	if err != nil {
		return Statement{}, fromStore(err)
	}
	if q.To.After(page.Now) {
		return Statement{}, invalid("to", "to is in the future")
	}
	st := Statement{
		AccountID: acct.ID, Currency: acct.Currency, From: q.From, To: q.To,
		Opening: page.Opening, Closing: page.Closing, Totals: totalsOf(page.Totals),
		Final: !q.To.After(page.Now.Add(-l.limits.HistorySettleWindow)),
	}
	st.Lines = linesOf(page, shards)
	n := pageCut(min(len(st.Lines), size), func(i int) int { return statementLineBytes(st.Lines[i]) }, l.limits.PageBytesMax)
	if n < len(st.Lines) {
		st.Lines = st.Lines[:n]
		last := page.Lines[n-1]
		st.NextPageToken = encodeToken(query, pageCursor{
			After: strconv.Itoa(last.Shard) + "|" + strconv.FormatInt(last.CreatedAt.UnixNano(), 10), Seq: last.Sequence,
		})
	}
	return st, nil
}

// validatePeriod checks a statement period.
func validatePeriod(from, to time.Time) error {
	switch {
	case from.IsZero():
		return invalid("from", "from is required")
	case to.IsZero():
		return invalid("to", "to is required")
	case !from.Before(to):
		return invalid("to", "to must be after from")
	}
	return nil
}

// linesOf turns a page's entries into lines with the account's running
// balance, from the balance before the page.
func linesOf(page store.StatementPage, shards []uuid.UUID) []StatementLine {
	out := make([]StatementLine, len(page.Lines))
	running := page.PageOpening
	for i, e := range page.Lines {
		running += e.Amount
		out[i] = StatementLine{
			CreatedAt: e.CreatedAt, Kind: Kind(e.Kind), Description: e.Description, Amount: e.Amount,
			RunningBalance: running, TransferID: e.TransferID, CreatedByClient: e.CreatedByClient,
			CreatedByKey: e.CreatedByKey, Sequence: e.Sequence,
		}
		if e.Shard > 0 {
			out[i].ShardID = shards[e.Shard]
		}
	}
	return out
}

func totalsOf(ts []store.KindTotal) []StatementTotal {
	out := make([]StatementTotal, len(ts))
	for i, t := range ts {
		out[i] = StatementTotal{Kind: Kind(t.Kind), Count: t.Count, Credits: t.Credits, Debits: t.Debits}
	}
	return out
}

// statementCursor decodes a GetStatement page token: the position
// (shard|created_at nanoseconds, sequence) of the previous page's last line.
func statementCursor(query, tok string, shards int) (store.StatementPos, error) {
	bad := invalid("page_token", "page_token is malformed or belongs to another query")
	c, err := decodeToken(query, tok)
	if err != nil {
		return store.StatementPos{}, err
	}
	var shard int
	var nanos int64
	if _, err := fmt.Sscanf(c.After, "%d|%d", &shard, &nanos); err != nil || shard < 0 || shard >= shards || c.Seq < 1 {
		return store.StatementPos{}, bad
	}
	return store.StatementPos{Valid: true, At: time.Unix(0, nanos).UTC(), Shard: shard, Seq: c.Seq}, nil
}

// statementLineBytes bounds a tally.v1.StatementLine: 3 ids, 2 strings, 4
// scalars and a timestamp.
func statementLineBytes(s StatementLine) int {
	return messageOverhead + 3*idBytes + stringBytes(s.Description) + stringBytes(s.CreatedByKey) + 4*scalarBytes + timestampBytes
}
