package store

import (
	"time"

	"github.com/google/uuid"
)

// Account is an accounts row. Enum columns hold the proto enum numbers; the
// ledger package gives them types and meaning.
type Account struct {
	ID           uuid.UUID
	Currency     string
	Type         int16
	ExternalRef  string
	Floor        int16
	CreditLimit  int64
	Status       int16
	Metadata     map[string]string
	SystemRole   string
	Balance      int64
	Version      int64
	LastSequence int64
	LastEntryAt  *time.Time
	CreatedAt    time.Time
	// Held is the sum of the holds stored as open (see NextHoldExpiry).
	Held int64
	// NextHoldExpiry is the earliest expires_at among the holds stored as
	// open; nil when there are none. From then on Held includes expired holds
	// until a write records their expiry.
	NextHoldExpiry *time.Time
	// LowBalanceThreshold, when set, is the available amount below which a
	// debit reports threshold_crossed.
	LowBalanceThreshold *int64
	// TopUpThreshold is the threshold of the account's auto top-up rule
	// while the rule is active, nil otherwise (see topup_rules). The write
	// path reads it with the locked row, so a batch learns without another
	// statement whether it may have to start a top-up.
	TopUpThreshold *int64
	// ShardOf is, on a shard row, the account it is a shard of (uuid.Nil on
	// every account's own row, shard 0); ShardIndex its index (0 on shard
	// 0). ShardCount is, on shard 0, how many further shards exist.
	ShardOf    uuid.UUID
	ShardIndex int32
	ShardCount int32
}

// Sharded reports whether the row is one of several shards of an account,
// so its own balance is not the account's.
func (a *Account) Sharded() bool { return a.ShardCount > 0 || a.ShardOf != uuid.Nil }

// Transfer is a transfers row.
type Transfer struct {
	ID              uuid.UUID
	Scope           string
	Key             string
	Kind            int16
	DebitAccountID  uuid.UUID
	CreditAccountID uuid.UUID
	Amount          int64
	Currency        string
	Description     string
	Metadata        map[string]string
	CreatedAt       time.Time
	// CreatedByClient and CreatedByKey are the audit trail: the client and
	// key that created the transfer (uuid.Nil and "" are stored as NULL).
	CreatedByClient uuid.UUID
	CreatedByKey    string
	// RefundOf is the charge a REFUND reverses (uuid.Nil otherwise).
	RefundOf uuid.UUID
	// HoldID is the hold a capture's CHARGE came from (uuid.Nil otherwise).
	HoldID uuid.UUID
	// ThresholdCrossed: this transfer took its debited account's available
	// amount below its low-balance threshold.
	ThresholdCrossed bool
	// Refunded is how much of a CHARGE has been refunded; only reads fill it.
	Refunded int64
	// DebitAccountType and CreditAccountType are the types of the two
	// accounts, written with the transfer so that the database can check
	// the account-type rules (transfers_account_types_valid); reads leave
	// them 0.
	DebitAccountType, CreditAccountType int16
	// DebitShardOf and CreditShardOf are, where a side's account row is a
	// shard, the account it is a shard of (uuid.Nil otherwise). Not
	// written: the shard row says it.
	DebitShardOf, CreditShardOf uuid.UUID
}

// Entry is an entries row: one side of a transfer on one account.
type Entry struct {
	TransferID   uuid.UUID
	AccountID    uuid.UUID
	Sequence     int64
	Amount       int64
	BalanceAfter int64
	VersionAfter int64
	CreatedAt    time.Time
	// CreatedByClient and CreatedByKey come from the entry's transfer; only
	// ListEntries fills them (WriteBatch ignores them).
	CreatedByClient uuid.UUID
	CreatedByKey    string
	// Kind is the kind of the entry's transfer; only ListEntries fills it.
	Kind int16
}

// KeyRecord is an idempotency_keys row: the final outcome of one key.
type KeyRecord struct {
	Scope        string
	Key          string
	Fingerprint  []byte
	Kind         int16
	TransferID   uuid.NullUUID
	HoldID       uuid.NullUUID
	AccountID    uuid.UUID
	ErrorCode    string
	ErrorReason  string
	ErrorMessage string
	CreatedAt    time.Time
}

// BalanceRow is the part of an account a balance read needs.
type BalanceRow struct {
	AccountID   uuid.UUID
	Currency    string
	Floor       int16
	Balance     int64
	CreditLimit int64
	Version     int64
	ReadAt      time.Time
	// Held counts only holds that had not expired at ReadAt.
	Held int64
	// NextHoldExpiry is the earliest expiry after ReadAt of an open hold.
	NextHoldExpiry *time.Time
	Status         int16
	// Type says whether the balance may be cached (CUSTOMER accounts
	// only); for an account with shards, Balance and Version are the sums
	// over its shards, read in one snapshot.
	Type int16
}

// AccountUpdate is the new state of one account after a posting. PrevVersion
// guards the update: it must match the row locked earlier in the transaction.
type AccountUpdate struct {
	AccountID    uuid.UUID
	PrevVersion  int64
	Balance      int64
	Version      int64
	LastSequence int64
	LastEntryAt  *time.Time
	Held         int64
	// HoldsChanged makes the update recompute next_hold_expiry from the
	// open holds (after this batch's hold writes).
	HoldsChanged bool
	Status       int16
	CreditLimit  int64
	// Metadata replaces the account's metadata; nil keeps it (the common
	// case: money movement never changes it, so it is not rewritten).
	Metadata            map[string]string
	LowBalanceThreshold *int64
}

// Hold statuses as stored.
const (
	HoldOpen     int16 = 1
	HoldCaptured int16 = 2
	HoldReleased int16 = 3
	HoldExpired  int16 = 4
)

// Hold is a holds row.
type Hold struct {
	ID                uuid.UUID
	Scope             string
	Key               string
	AccountID         uuid.UUID
	RevenueAccountID  uuid.UUID // uuid.Nil: the currency's default
	Amount            int64
	Currency          string
	Status            int16
	ExpiresAt         time.Time
	CapturedAmount    int64
	CaptureTransferID uuid.UUID
	Description       string
	Metadata          map[string]string
	CreatedAt         time.Time
	FinalizedAt       *time.Time
	CreatedByClient   uuid.UUID
	CreatedByKey      string
	// AccountType and RevenueAccountType (0 without a revenue account) are
	// written for holds_account_types_valid; reads leave them 0.
	AccountType, RevenueAccountType int16
}

// HoldChange is the final action of a hold, written by WriteBatch.
type HoldChange struct {
	HoldID            uuid.UUID
	Status            int16
	CapturedAmount    int64
	CaptureTransferID uuid.UUID
	FinalizedAt       time.Time
}

// RefundAdd adds Amount to what has been refunded of a charge.
type RefundAdd struct {
	ChargeID     uuid.UUID
	ChargeAmount int64
	Amount       int64
}

// AccountChange is an account_changes row: who changed an account and how.
type AccountChange struct {
	AccountID       uuid.UUID
	Action          string
	VersionAfter    int64
	Before, After   map[string]any
	CreatedByClient uuid.UUID
	CreatedByKey    string
	CreatedAt       time.Time
	// Reason is why (empty: none given).
	Reason string
}

// BatchRecord is a batches row: the stored outcome of a SubmitBatch key.
type BatchRecord struct {
	Scope       string
	Key         string
	Fingerprint []byte
	Mode        int16
	Applied     bool
	Results     []byte // JSON, owned by the ledger
	CreatedAt   time.Time
}

// Role names of the per-currency default system accounts.
const (
	SystemRoleRevenue = "revenue"
	SystemRoleFunding = "funding"
)
