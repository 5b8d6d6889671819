// Package ledger holds Tally's rules of money: double-entry posting, balance
// floors, overflow, account states and the exact idempotency semantics. It
// knows nothing of gRPC; it talks to PostgreSQL only through package store,
// and to Redis only through the balance cache on its read path.
//
// Invariants are asserted (a broken invariant panics: it is a bug, and the
// transaction it happened in is never committed); bad input returns errors.
package ledger

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sync/singleflight"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/store"
)

// BalanceCache is the read-through cache beside the read path. It is never
// consulted by the write path, so it cannot approve an overdraft or decide
// whether a key was used.
type BalanceCache interface {
	// Get returns a cached (version, balance) pair, or false on any miss.
	Get(ctx context.Context, id uuid.UUID) (cache.Balance, bool)
	// Put stores b unless the cache already holds a newer version.
	Put(ctx context.Context, b cache.Balance)
	// PutMany does what Put does for each of bs, in one round trip.
	PutMany(ctx context.Context, bs []cache.Balance)
	// Delete removes a cached pair, best-effort.
	Delete(ctx context.Context, id uuid.UUID)
}

// Config configures a Ledger.
type Config struct {
	Store  *store.Store
	Cache  BalanceCache // nil: no cache
	Logger *slog.Logger
	Limits Limits
	Batch  BatchConfig
	// UsageDimensions are up to three metadata keys that spend breakdowns
	// group charges by (tallyd --usage-dimensions); see
	// ValidateUsageDimensions.
	UsageDimensions []string
	// SystemShards is how many shards each REVENUE and FUNDING account
	// gets, its own row included (tallyd --system-shards; 0: the default).
	SystemShards int
	// AccountFactsMax bounds the accounts whose unchanging facts are kept
	// in memory for planning locks (tallyd --account-facts-max).
	AccountFactsMax int
	// TopUp configures auto top-up.
	TopUp TopUpConfig
}

// Ledger applies the rules of money on top of the store.
type Ledger struct {
	st     *store.Store
	cache  BalanceCache
	log    *slog.Logger
	limits Limits
	reads  singleflight.Group
	batch  *batcher
	// dir remembers what never changes: accounts' currencies, types and
	// shards, and each currency's default system accounts.
	dir          *directory
	systemShards int
	shardOffset  int
	// widened remembers when accounts were last given shards in the
	// background; shardGate opens once no previous release is connected.
	widened   sync.Map
	shardGate atomic.Bool
	refresh   refreshing
	usage     usageConfig
	topup     TopUpConfig
	// payments lists the top-up provider's payments (Reconcile).
	payments PaymentLister
}

// New returns a Ledger.
func New(cfg Config) *Ledger {
	if cfg.Store == nil {
		panic("ledger: nil store")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Limits.fill()
	if err := ValidateUsageDimensions(cfg.UsageDimensions); err != nil {
		panic("ledger: " + err.Error())
	}
	cfg.TopUp.fill()
	if cfg.SystemShards <= 0 {
		cfg.SystemShards = SystemShardsDefault
	}
	if cfg.SystemShards > store.ShardsMax {
		panic(fmt.Sprintf("ledger: SystemShards %d above %d", cfg.SystemShards, store.ShardsMax))
	}
	l := &Ledger{st: cfg.Store, log: cfg.Logger, limits: cfg.Limits, dir: newDirectory(cfg.AccountFactsMax),
		systemShards: cfg.SystemShards, shardOffset: rand.IntN(cfg.SystemShards), topup: cfg.TopUp}
	l.usage.keys = append([]string{}, cfg.UsageDimensions...)
	if cfg.Cache != nil {
		l.cache = cfg.Cache
	}
	l.batch = newBatcher(l, cfg.Batch)
	return l
}

// Close stops group commit after the batches in flight finish. Call it after
// the gRPC server has drained, so no call is still waiting for a batch.
func (l *Ledger) Close() { l.batch.close() }

// Abort cancels the transactions of the batches in flight, for a shutdown
// that can wait no longer (after the gRPC server was stopped, so their
// callers are gone). Each rolls back, or, if cut during COMMIT, has an
// unknown outcome like any lost connection; either way a retry of its keys
// is safe. Close still has to be called.
func (l *Ledger) Abort() { l.batch.abort() }

// BatchStats reports what group commit has achieved so far.
func (l *Ledger) BatchStats() BatchStats { return l.batch.stats() }

// Limits returns the limits in force.
func (l *Ledger) Limits() Limits { return l.limits }

func defaultFloor(t AccountType) Floor {
	if t == AccountTypeCustomer {
		return FloorNonNegative
	}
	return FloorNone
}

// ensureSystemAccounts makes sure the currency's default revenue and funding
// accounts exist with their shards, so Charge and Credit can name them
// implicitly, and remembers them. They are never deleted and their shards
// only grow, so remembering them in process is safe.
func (l *Ledger) ensureSystemAccounts(ctx context.Context, currency string) error {
	if _, ok := l.dir.systemOf(currency); ok {
		return nil
	}
	sys, err := l.loadSystemAccounts(ctx, currency)
	if err != nil {
		return err
	}
	l.dir.setSystem(currency, sys)
	return nil
}

// loadSystemAccounts creates the currency's default system accounts if
// needed, gives them their shards where allowed, and returns them.
func (l *Ledger) loadSystemAccounts(ctx context.Context, currency string) (systemShards, error) {
	sys := systemShards{complete: true, at: time.Now()}
	for _, role := range []string{store.SystemRoleRevenue, store.SystemRoleFunding} {
		t := AccountTypeRevenue
		if role == store.SystemRoleFunding {
			t = AccountTypeFunding
		}
		id, err := l.st.EnsureSystemAccount(ctx, currency, role, int16(t), int16(FloorNone))
		if err != nil {
			return systemShards{}, fromStore(err)
		}
		shards, complete, err := l.ensureShards(ctx, id)
		if err != nil {
			return systemShards{}, err
		}
		sys.complete = sys.complete && complete
		if role == store.SystemRoleRevenue {
			sys.revenue = shards
		} else {
			sys.funding = shards
		}
		f := store.AccountFacts{ID: id, Currency: currency, Type: int16(t)}
		if len(shards) > 1 {
			f.Shards = shards
		}
		l.dir.remember(map[uuid.UUID]store.AccountFacts{id: f})
	}
	return sys, nil
}

// SystemAccount returns the currency's default revenue or funding account.
func (l *Ledger) SystemAccount(ctx context.Context, currency string, t AccountType) (uuid.UUID, error) {
	if err := validateCurrency(currency); err != nil {
		return uuid.Nil, err
	}
	if err := l.ensureSystemAccounts(ctx, currency); err != nil {
		return uuid.Nil, err
	}
	role := store.SystemRoleRevenue
	if t == AccountTypeFunding {
		role = store.SystemRoleFunding
	}
	id, err := l.st.SystemAccountID(ctx, currency, role)
	return id, fromStore(err)
}

// CreateAccount creates an account, or returns the existing one when the
// same id is created again with identical attributes.
func (l *Ledger) CreateAccount(ctx context.Context, r CreateAccountRequest) (Account, error) {
	if err := validateCurrency(r.Currency); err != nil {
		return Account{}, err
	}
	if r.Type == 0 {
		r.Type = AccountTypeCustomer
	}
	if r.Type < AccountTypeCustomer || r.Type > AccountTypeFunding {
		return Account{}, invalid("type", "unknown account type")
	}
	if r.Floor == 0 {
		r.Floor = defaultFloor(r.Type)
	}
	if r.Floor != FloorNonNegative && r.Floor != FloorNone {
		return Account{}, invalid("floor", "unknown floor policy")
	}
	if r.CreditLimit < 0 || r.CreditLimit > l.limits.CreditLimitMax {
		return Account{}, invalid("credit_limit", "credit_limit must be between 0 and %d", l.limits.CreditLimitMax)
	}
	if r.CreditLimit != 0 && r.Floor == FloorNone {
		return Account{}, invalid("credit_limit", "credit_limit only applies to FLOOR_NON_NEGATIVE accounts")
	}
	if len(r.ExternalRef) > l.limits.ExternalRefBytesMax {
		return Account{}, invalid("external_ref", "external_ref is longer than %d bytes", l.limits.ExternalRefBytesMax)
	}
	if !validText(r.ExternalRef) {
		return Account{}, invalid("external_ref", "external_ref must be valid UTF-8 without NUL characters")
	}
	if err := l.limits.validateMetadata(r.Metadata); err != nil {
		return Account{}, err
	}
	if r.ID == uuid.Nil {
		id, err := uuid.NewV7()
		if err != nil {
			return Account{}, fromStore(err)
		}
		r.ID = id
	}
	if err := l.ensureSystemAccounts(ctx, r.Currency); err != nil {
		return Account{}, err
	}
	want := store.Account{
		ID: r.ID, Currency: r.Currency, Type: int16(r.Type), ExternalRef: r.ExternalRef,
		Floor: int16(r.Floor), CreditLimit: r.CreditLimit, Status: int16(StatusActive), Metadata: r.Metadata,
	}
	got, created, err := l.st.CreateAccount(ctx, want)
	if err != nil {
		return Account{}, fromStore(err)
	}
	l.dir.rememberType(got.ID, got.Currency, got.Type)
	if created && r.Type != AccountTypeCustomer {
		// A REVENUE or FUNDING account is sharded from the start. Should
		// this fail, it gets its shards on first use (widenShards).
		if _, _, err := l.ensureShards(ctx, got.ID); err != nil {
			l.log.Warn("adding shards to a new account failed", "account", got.ID, "err", err)
		}
	}
	if !created && !sameAccount(want, got) {
		return Account{}, rejection(CodeAlreadyExists, ReasonAccountExistsDifferent,
			"account %s exists with different attributes", r.ID)
	}
	return toAccount(got), nil
}

func sameAccount(a, b store.Account) bool {
	if a.Currency != b.Currency || a.Type != b.Type || a.Floor != b.Floor || a.CreditLimit != b.CreditLimit ||
		a.ExternalRef != b.ExternalRef || len(a.Metadata) != len(b.Metadata) {
		return false
	}
	for k, v := range a.Metadata {
		if w, ok := b.Metadata[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// GetAccount returns one account.
func (l *Ledger) GetAccount(ctx context.Context, id uuid.UUID) (Account, error) {
	a, err := l.st.GetAccount(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return Account{}, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", id)
	}
	if err != nil {
		return Account{}, fromStore(err)
	}
	return toAccount(a), nil
}

// FindAccounts pages through accounts matching q, in account_id order.
func (l *Ledger) FindAccounts(ctx context.Context, q AccountQuery) ([]Account, string, error) {
	size, err := l.limits.pageSize(q.PageSize)
	if err != nil {
		return nil, "", err
	}
	if q.Currency != "" {
		if err := validateCurrency(q.Currency); err != nil {
			return nil, "", err
		}
	}
	if q.Type < 0 || q.Type > AccountTypeFunding {
		return nil, "", invalid("type", "unknown account type")
	}
	if len(q.ExternalRef) > l.limits.ExternalRefBytesMax || !validText(q.ExternalRef) {
		return nil, "", invalid("external_ref", "external_ref must be valid UTF-8, at most %d bytes", l.limits.ExternalRefBytesMax)
	}
	query := fmt.Sprintf("accounts|%q|%q|%d", q.ExternalRef, q.Currency, q.Type)
	f := store.AccountFilter{ExternalRef: q.ExternalRef, Currency: q.Currency, Type: int16(q.Type), Limit: size + 1}
	if q.PageToken != "" {
		after, err := accountsCursor(query, q.PageToken)
		if err != nil {
			return nil, "", err
		}
		f.After = uuid.NullUUID{UUID: after, Valid: true}
	}
	rows, err := l.st.FindAccounts(ctx, f)
	if err != nil {
		return nil, "", fromStore(err)
	}
	out := make([]Account, len(rows))
	for i, a := range rows {
		out[i] = toAccount(a)
	}
	// A page ends at size items or PageBytesMax bytes, whichever comes
	// first (accounts with large metadata), so its reply always fits.
	next := ""
	if n := pageCut(min(len(out), size), func(i int) int { return accountBytes(out[i]) }, l.limits.PageBytesMax); n < len(out) {
		out = out[:n]
		next = encodeToken(query, pageCursor{After: out[n-1].ID.String()})
	}
	return out, next, nil
}

// ListEntries pages through an account's statement, oldest first.
func (l *Ledger) ListEntries(ctx context.Context, q EntryQuery) ([]Entry, string, error) {
	size, err := l.limits.pageSize(q.PageSize)
	if err != nil {
		return nil, "", err
	}
	if q.Start != nil && q.End != nil && q.End.Before(*q.Start) {
		return nil, "", invalid("end_time", "end_time is before start_time")
	}
	kinds := make([]int16, 0, len(q.Kinds))
	for _, k := range q.Kinds {
		if k < KindCharge || k > KindRefund {
			return nil, "", invalid("kinds", "unknown transfer kind %d", k)
		}
		kinds = append(kinds, int16(k))
	}
	// Tokens bind the query; the filters added later join the string only
	// when used, so tokens of the previous release stay valid.
	query := fmt.Sprintf("entries|%s|%v|%v", q.AccountID, timeKey(q.Start), timeKey(q.End))
	if len(kinds) > 0 || q.NewestFirst {
		query += fmt.Sprintf("|%v|%v", kinds, q.NewestFirst)
	}
	shards, err := l.st.Shards(ctx, q.AccountID)
	if err != nil {
		return nil, "", fromStore(err)
	}
	if len(shards) > 1 {
		// A sharded account's history is its shards' entries, shard after
		// shard; each entry names its shard. The token carries the shard.
		query += "|shards"
	}
	f := store.EntryFilter{Start: q.Start, End: q.End, Kinds: kinds, NewestFirst: q.NewestFirst}
	pos := 0
	if q.PageToken != "" {
		c, err := decodeToken(query, q.PageToken)
		if err != nil {
			return nil, "", err
		}
		if pos, err = strconv.Atoi(c.After); (err != nil && c.After != "") || c.Seq < 0 || pos < 0 || pos >= max(len(shards), 1) {
			return nil, "", invalid("page_token", "page_token is malformed or belongs to another query")
		}
		f.AfterSequence = c.Seq
	} else if _, err := l.GetAccount(ctx, q.AccountID); err != nil {
		// An unknown account is NOT_FOUND, not an empty statement.
		return nil, "", err
	}
	rows, at, err := l.shardEntries(ctx, f, shards, pos, size+1)
	if err != nil {
		return nil, "", err
	}
	// A page ends at size items or PageBytesMax bytes.
	next := ""
	if n := pageCut(min(len(rows), size), func(i int) int {
		return entryBytes(Entry{CreatedByKey: rows[i].CreatedByKey})
	}, l.limits.PageBytesMax); n < len(rows) {
		rows = rows[:n]
		c := pageCursor{Seq: rows[n-1].Sequence}
		if len(shards) > 1 {
			c.After = strconv.Itoa(at[n-1])
		}
		next = encodeToken(query, c)
	}
	out := make([]Entry, len(rows))
	for i, e := range rows {
		out[i] = Entry{
			TransferID: e.TransferID, AccountID: e.AccountID, Sequence: e.Sequence, Amount: e.Amount,
			BalanceAfter: e.BalanceAfter, VersionAfter: e.VersionAfter, CreatedAt: e.CreatedAt,
			CreatedByClient: e.CreatedByClient, CreatedByKey: e.CreatedByKey, Kind: Kind(e.Kind),
		}
	}
	return out, next, nil
}

// shardEntries reads up to limit entries of shards, from position pos
// (newest shard first when f.NewestFirst) and f.AfterSequence within it,
// and the position of each entry's shard.
func (l *Ledger) shardEntries(ctx context.Context, f store.EntryFilter, shards []uuid.UUID, pos, limit int) ([]store.Entry, []int, error) {
	var rows []store.Entry
	var at []int
	for ; pos < len(shards) && len(rows) < limit; pos++ {
		i := pos
		if f.NewestFirst {
			i = len(shards) - 1 - pos
		}
		f.AccountID, f.Limit = shards[i], limit-len(rows)
		got, err := l.st.ListEntries(ctx, f)
		if err != nil {
			return nil, nil, fromStore(err)
		}
		for range got {
			at = append(at, pos)
		}
		rows = append(rows, got...)
		f.AfterSequence = 0
	}
	return rows, at, nil
}

// GetTransfer returns a transfer by id.
func (l *Ledger) GetTransfer(ctx context.Context, id uuid.UUID) (Transfer, error) {
	t, err := l.st.GetTransfer(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return Transfer{}, rejection(CodeNotFound, ReasonTransferNotFound, "transfer %s not found", id)
	}
	if err != nil {
		return Transfer{}, fromStore(err)
	}
	return toTransfer(t), nil
}

// GetTransferByKey returns the stored outcome of an idempotency key: the
// transfer it produced, or the rejection it got (as an *Error with
// Replayed set), so a client recovering from a crash learns either.
func (l *Ledger) GetTransferByKey(ctx context.Context, scope, key string) (Transfer, error) {
	if err := validateKey(key); err != nil {
		return Transfer{}, err
	}
	k, err := l.st.GetKey(ctx, scope, key)
	if errors.Is(err, store.ErrNotFound) {
		return Transfer{}, rejection(CodeNotFound, ReasonTransferNotFound, "no outcome recorded for this idempotency key")
	}
	if err != nil {
		return Transfer{}, fromStore(err)
	}
	if !k.TransferID.Valid {
		return Transfer{}, storedRejection(k)
	}
	return l.GetTransfer(ctx, k.TransferID.UUID)
}

func storedRejection(k store.KeyRecord) *Error {
	code := CodeFailedPrecondition
	if k.ErrorCode == codeNameOutOfRange {
		code = CodeOutOfRange
	}
	return &Error{Code: code, Reason: k.ErrorReason, Message: k.ErrorMessage, Replayed: true}
}

// Names stored in idempotency_keys.error_code (a CHECK constraint lists them).
const (
	codeNameFailedPrecondition = "FAILED_PRECONDITION"
	codeNameOutOfRange         = "OUT_OF_RANGE"
)

// available is what a FLOOR_NON_NEGATIVE account may still debit or hold:
// balance - held + credit_limit; an account without a floor has no holds
// and its available amount is its balance.
func available(floor Floor, bal, held, creditLimit int64) int64 {
	if floor == FloorNone {
		return bal
	}
	// The schema's accounts_available_range and accounts_held_within_floor
	// CHECKs keep this in range (held and credit_limit are non-negative).
	if bal > math.MaxInt64-creditLimit {
		panic(fmt.Sprintf("ledger: available overflows: balance %d credit_limit %d", bal, creditLimit))
	}
	return bal - held + creditLimit
}

func toAccount(a store.Account) Account {
	return Account{
		ID: a.ID, Currency: a.Currency, Type: AccountType(a.Type), ExternalRef: a.ExternalRef,
		Floor: Floor(a.Floor), CreditLimit: a.CreditLimit, Status: Status(a.Status), Metadata: a.Metadata,
		CreatedAt: a.CreatedAt, Version: a.Version, LowBalanceThreshold: a.LowBalanceThreshold,
		ShardOf: a.ShardOf, ShardCount: a.ShardCount,
	}
}

func toTransfer(t store.Transfer) Transfer {
	out := Transfer{
		ID: t.ID, IdempotencyKey: t.Key, Kind: Kind(t.Kind), DebitAccountID: t.DebitAccountID,
		CreditAccountID: t.CreditAccountID, Amount: t.Amount, Currency: t.Currency,
		Description: t.Description, Metadata: t.Metadata, CreatedAt: t.CreatedAt,
		CreatedByClient: t.CreatedByClient, CreatedByKey: t.CreatedByKey,
		RefundOf: t.RefundOf, HoldID: t.HoldID, ThresholdCrossed: t.ThresholdCrossed, Refunded: t.Refunded,
	}
	if t.DebitShardOf != uuid.Nil {
		out.DebitAccountID, out.DebitShardID = t.DebitShardOf, t.DebitAccountID
	}
	if t.CreditShardOf != uuid.Nil {
		out.CreditAccountID, out.CreditShardID = t.CreditShardOf, t.CreditAccountID
	}
	return out
}
