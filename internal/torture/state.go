package torture

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/tallyledger/tally/cache"
)

// AccountRow is an accounts row as the checker needs it.
type AccountRow struct {
	ID           string
	Currency     string
	Type         int16
	Floor        int16 // 1 FLOOR_NON_NEGATIVE, 2 FLOOR_NONE
	CreditLimit  int64
	SystemRole   string // "", "revenue", "funding"
	Balance      int64
	Version      int64
	LastSequence int64
	Held         int64
	Status       int16 // 1 ACTIVE, 2 FROZEN, 3 CLOSED
	// ShardOf is, on a shard row of a sharded system account, the account
	// it is a shard of ("" otherwise).
	ShardOf   string
	CreatedAt time.Time
	// MaxCreditLimit is the highest credit_limit account_changes shows
	// the account ever had (0 when it never changed).
	MaxCreditLimit int64
}

// Account statuses (accounts.status).
const (
	StatusActive = 1
	StatusFrozen = 2
	StatusClosed = 3
)

// EventRow is an events row (the change feed's outbox).
type EventRow struct {
	XID     uint64
	ID      int64
	Kind    string
	Subject string
}

// TransferRow is a transfers row.
type TransferRow struct {
	ID        string
	Scope     string
	Key       string
	Kind      int16
	Debit     string
	Credit    string
	Amount    int64
	Currency  string
	CreatedAt time.Time
	RefundOf  string // the CHARGE a REFUND reverses
	HoldID    string // the hold a captured CHARGE came from
}

// EntryRow is an entries row.
type EntryRow struct {
	TransferID   string
	Account      string
	Sequence     int64
	Amount       int64
	BalanceAfter int64
	VersionAfter int64
	CreatedAt    time.Time
}

// KeyRow is an idempotency_keys row.
type KeyRow struct {
	Scope       string
	Key         string
	Kind        int16
	TransferID  string // "" for a rejection (and a Hold or ReleaseHold)
	HoldID      string // a Hold's, CaptureHold's or ReleaseHold's hold
	Account     string
	ErrorCode   string
	ErrorReason string
}

// Hold statuses (holds.status).
const (
	HoldOpen     = 1
	HoldCaptured = 2
	HoldReleased = 3
	HoldExpired  = 4
)

// HoldRow is a holds row.
type HoldRow struct {
	ID                string
	Scope             string
	Key               string
	Account           string
	Revenue           string // "" for the currency's default
	Amount            int64
	Currency          string
	Status            int16
	CapturedAmount    int64
	CaptureTransferID string
	ExpiresAt         time.Time
	CreatedAt         time.Time
	// FinalizedAt is when the hold was captured, released or expired.
	FinalizedAt *time.Time
}

// ChargeRefundRow is a charge_refunds row.
type ChargeRefundRow struct {
	TransferID string
	Amount     int64
	Refunded   int64
}

// BatchRow is a batches row.
type BatchRow struct {
	Scope   string
	Key     string
	Mode    int16
	Applied bool
}

// DBState is a consistent snapshot of the ledger tables.
type DBState struct {
	Accounts  map[string]*AccountRow
	Transfers []TransferRow
	// Entries per account, ordered by sequence.
	Entries       map[string][]EntryRow
	Keys          []KeyRow
	Holds         []HoldRow
	ChargeRefunds []ChargeRefundRow
	Batches       []BatchRow
	// AccountChanges counts account_changes rows (lifecycle changes, each
	// of which advanced the version) per account.
	AccountChanges map[string]int64
	// Events is the events table in feed order (xid, event_id).
	Events []EventRow
	// TopUps and TopUpRules are the auto top-up tables; Payments are the
	// PaymentIntents the provider (the Stripe-compatible test server)
	// recorded, filled in by the runner.
	TopUps     []TopUpRow
	TopUpRules map[string]TopUpRuleRow
	Payments   []PaymentRow
}

// Querier is what LoadDBState needs: a pgx.Conn, pgxpool.Pool or pgx.Tx.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// LoadDBState reads every account, transfer, entry and idempotency key. Run
// it inside a REPEATABLE READ transaction (or on a quiet database) so the
// tables agree with each other.
func LoadDBState(ctx context.Context, q Querier) (*DBState, error) {
	s := &DBState{Accounts: map[string]*AccountRow{}, Entries: map[string][]EntryRow{}, AccountChanges: map[string]int64{}}

	rows, err := q.Query(ctx, `SELECT account_id::text, currency, type, floor, credit_limit, coalesce(system_role, ''),
		balance, version, last_sequence, held, status, coalesce(shard_of::text, ''), created_at FROM accounts`)
	if err != nil {
		return nil, fmt.Errorf("load accounts: %w", err)
	}
	for rows.Next() {
		var a AccountRow
		if err := rows.Scan(&a.ID, &a.Currency, &a.Type, &a.Floor, &a.CreditLimit, &a.SystemRole, &a.Balance, &a.Version, &a.LastSequence,
			&a.Held, &a.Status, &a.ShardOf, &a.CreatedAt); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load accounts: %w", err)
		}
		s.Accounts[a.ID] = &a
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load accounts: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT transfer_id::text, scope, idempotency_key, kind, debit_account_id::text,
		credit_account_id::text, amount, currency, created_at, coalesce(refund_of::text, ''), coalesce(hold_id::text, '')
		FROM transfers`)
	if err != nil {
		return nil, fmt.Errorf("load transfers: %w", err)
	}
	for rows.Next() {
		var t TransferRow
		if err := rows.Scan(&t.ID, &t.Scope, &t.Key, &t.Kind, &t.Debit, &t.Credit, &t.Amount, &t.Currency, &t.CreatedAt,
			&t.RefundOf, &t.HoldID); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load transfers: %w", err)
		}
		s.Transfers = append(s.Transfers, t)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load transfers: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT transfer_id::text, account_id::text, sequence, amount, balance_after,
		version_after, created_at FROM entries ORDER BY account_id, sequence`)
	if err != nil {
		return nil, fmt.Errorf("load entries: %w", err)
	}
	for rows.Next() {
		var e EntryRow
		if err := rows.Scan(&e.TransferID, &e.Account, &e.Sequence, &e.Amount, &e.BalanceAfter, &e.VersionAfter, &e.CreatedAt); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load entries: %w", err)
		}
		s.Entries[e.Account] = append(s.Entries[e.Account], e)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load entries: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT scope, idempotency_key, kind, coalesce(transfer_id::text, ''), coalesce(hold_id::text, ''),
		account_id::text, coalesce(error_code, ''), coalesce(error_reason, '') FROM idempotency_keys`)
	if err != nil {
		return nil, fmt.Errorf("load idempotency keys: %w", err)
	}
	for rows.Next() {
		var k KeyRow
		if err := rows.Scan(&k.Scope, &k.Key, &k.Kind, &k.TransferID, &k.HoldID, &k.Account, &k.ErrorCode, &k.ErrorReason); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load idempotency keys: %w", err)
		}
		s.Keys = append(s.Keys, k)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load idempotency keys: %w", err)
	}
	if err := loadTopUps(ctx, q, s); err != nil {
		return nil, err
	}
	if err := loadHoldTables(ctx, q, s); err != nil {
		return nil, err
	}
	return s, nil
}

// loadHoldTables reads holds, charge_refunds, batches and the number of
// account_changes per account (auto top-up rule changes, which leave the
// version alone, not counted).
func loadHoldTables(ctx context.Context, q Querier, s *DBState) error {
	rows, err := q.Query(ctx, `SELECT hold_id::text, scope, idempotency_key, account_id::text, coalesce(revenue_account_id::text, ''),
		amount, currency, status, captured_amount, coalesce(capture_transfer_id::text, ''), expires_at, created_at, finalized_at FROM holds`)
	if err != nil {
		return fmt.Errorf("load holds: %w", err)
	}
	for rows.Next() {
		var h HoldRow
		if err := rows.Scan(&h.ID, &h.Scope, &h.Key, &h.Account, &h.Revenue, &h.Amount, &h.Currency, &h.Status,
			&h.CapturedAmount, &h.CaptureTransferID, &h.ExpiresAt, &h.CreatedAt, &h.FinalizedAt); err != nil {
			rows.Close()
			return fmt.Errorf("load holds: %w", err)
		}
		s.Holds = append(s.Holds, h)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load holds: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT transfer_id::text, amount, refunded FROM charge_refunds`)
	if err != nil {
		return fmt.Errorf("load charge_refunds: %w", err)
	}
	for rows.Next() {
		var r ChargeRefundRow
		if err := rows.Scan(&r.TransferID, &r.Amount, &r.Refunded); err != nil {
			rows.Close()
			return fmt.Errorf("load charge_refunds: %w", err)
		}
		s.ChargeRefunds = append(s.ChargeRefunds, r)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load charge_refunds: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT scope, batch_key, mode, applied FROM batches`)
	if err != nil {
		return fmt.Errorf("load batches: %w", err)
	}
	for rows.Next() {
		var b BatchRow
		if err := rows.Scan(&b.Scope, &b.Key, &b.Mode, &b.Applied); err != nil {
			rows.Close()
			return fmt.Errorf("load batches: %w", err)
		}
		s.Batches = append(s.Batches, b)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load batches: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT account_id::text, count(*),
		max(greatest(coalesce((before->>'credit_limit')::bigint, 0), coalesce((after->>'credit_limit')::bigint, 0)))
		FROM account_changes WHERE action <> 'auto_topup' GROUP BY account_id`)
	if err != nil {
		return fmt.Errorf("load account_changes: %w", err)
	}
	for rows.Next() {
		var id string
		var n, maxLimit int64
		if err := rows.Scan(&id, &n, &maxLimit); err != nil {
			rows.Close()
			return fmt.Errorf("load account_changes: %w", err)
		}
		s.AccountChanges[id] = n
		if a := s.Accounts[id]; a != nil {
			a.MaxCreditLimit = maxLimit
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load account_changes: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT xid::text, event_id, kind, subject_id::text FROM events ORDER BY xid, event_id`)
	if err != nil {
		return fmt.Errorf("load events: %w", err)
	}
	for rows.Next() {
		var e EventRow
		var xid string
		if err := rows.Scan(&xid, &e.ID, &e.Kind, &e.Subject); err != nil {
			rows.Close()
			return fmt.Errorf("load events: %w", err)
		}
		if e.XID, err = strconv.ParseUint(xid, 10, 64); err != nil {
			rows.Close()
			return fmt.Errorf("load events: xid %q: %w", xid, err)
		}
		s.Events = append(s.Events, e)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load events: %w", err)
	}
	return nil
}

// LoadDBStateSnapshot opens a REPEATABLE READ READ ONLY transaction on conn
// and loads the state from it.
func LoadDBStateSnapshot(ctx context.Context, conn *pgx.Conn) (*DBState, error) {
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	return LoadDBState(ctx, tx)
}

// CachedValue is one balance key found in Redis.
type CachedValue struct {
	Key     string
	Account string
	Raw     string
	// PTTL is the remaining time to live; negative: -1 no expiry, -2 gone.
	PTTL time.Duration
	// Parsed fields; OK is false when Raw is not a valid v1 value.
	OK      bool
	Version int64
	Balance int64
}

// CacheState is every balance key under a prefix in Redis.
type CacheState struct {
	Prefix string
	Values []CachedValue
}

// LoadCacheState scans Redis for every key under prefix (for tallyd,
// "tally:bal:") and reads each value with its remaining TTL.
func LoadCacheState(ctx context.Context, rdb redis.UniversalClient, prefix string) (*CacheState, error) {
	cs := &CacheState{Prefix: prefix}
	var keys []string
	var cursor uint64
	for i := 0; ; i++ {
		if i > 1_000_000 {
			return nil, errors.New("redis SCAN did not finish")
		}
		ks, next, err := rdb.Scan(ctx, cursor, escapeGlob(prefix)+"*", 1000).Result()
		if err != nil {
			return nil, fmt.Errorf("redis scan: %w", err)
		}
		keys = append(keys, ks...)
		cursor = next
		if cursor == 0 {
			break
		}
	}
	sort.Strings(keys)
	keys = dedupe(keys)
	// Each tallyd's cache probe key (a short-lived write check, not a
	// balance) lives under the prefix too.
	probes := cache.ProbeKeyPrefix(prefix)
	kept := keys[:0]
	for _, k := range keys {
		if !strings.HasPrefix(k, probes) {
			kept = append(kept, k)
		}
	}
	keys = kept
	for start := 0; start < len(keys); start += 500 {
		batch := keys[start:min(start+500, len(keys))]
		pipe := rdb.Pipeline()
		gets := make([]*redis.StringCmd, len(batch))
		ttls := make([]*redis.DurationCmd, len(batch))
		for i, k := range batch {
			gets[i] = pipe.Get(ctx, k)
			ttls[i] = pipe.PTTL(ctx, k)
		}
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("redis read: %w", err)
		}
		for i, k := range batch {
			raw, err := gets[i].Result()
			if errors.Is(err, redis.Nil) {
				continue // expired between SCAN and GET
			}
			if err != nil {
				return nil, fmt.Errorf("redis get %s: %w", k, err)
			}
			v := CachedValue{Key: k, Account: strings.TrimPrefix(k, prefix), Raw: raw, PTTL: ttls[i].Val()}
			v.Version, v.Balance, v.OK = ParseCacheValue(raw)
			cs.Values = append(cs.Values, v)
		}
	}
	return cs, nil
}

func dedupe(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

func escapeGlob(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `*`, `\*`, `?`, `\?`, `[`, `\[`, `]`, `\]`)
	return r.Replace(s)
}

// CacheValue renders a balance in the cache's v2 value format (see package
// cache): v2|version|balance|credit_limit|available|currency|asof_unix_nanos|held|serve_until,
// with nothing held.
func CacheValue(version, balance, creditLimit, available int64, currency string, asOf time.Time) string {
	var ns int64
	if !asOf.IsZero() {
		ns = asOf.UnixNano()
	}
	return strings.Join([]string{"v2", strconv.FormatInt(version, 10), strconv.FormatInt(balance, 10),
		strconv.FormatInt(creditLimit, 10), strconv.FormatInt(available, 10), currency, strconv.FormatInt(ns, 10), "0", "0"}, "|")
}

// ParseCacheValue parses a v2 cache value as strictly as the cache does.
func ParseCacheValue(s string) (version, balance int64, ok bool) {
	f := strings.Split(s, "|")
	if len(f) != 9 || f[0] != "v2" || f[5] == "" {
		return 0, 0, false
	}
	var n [7]int64
	for i, idx := range []int{1, 2, 3, 4, 6, 7, 8} {
		v, err := strconv.ParseInt(f[idx], 10, 64)
		if err != nil || strconv.FormatInt(v, 10) != f[idx] {
			return 0, 0, false
		}
		n[i] = v
	}
	if n[0] < 0 || n[5] < 0 {
		return 0, 0, false
	}
	return n[0], n[1], true
}
