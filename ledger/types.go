package ledger

import (
	"time"

	"github.com/google/uuid"
)

// AccountType says what an account is for.
type AccountType int16

// Account types (numbers match the proto enum).
const (
	AccountTypeCustomer AccountType = 1
	AccountTypeRevenue  AccountType = 2
	AccountTypeFunding  AccountType = 3
)

// Floor is an account's lower-bound policy.
type Floor int16

// Floors.
const (
	// FloorNonNegative: balance may not go below -credit_limit.
	FloorNonNegative Floor = 1
	// FloorNone: balance may go negative without bound.
	FloorNone Floor = 2
)

// Status is an account's lifecycle state.
type Status int16

// Statuses.
const (
	StatusActive Status = 1
	// StatusFrozen: no debits.
	StatusFrozen Status = 2
	// StatusClosed: nothing.
	StatusClosed Status = 3
)

// Kind says which operation a request is, and which produced a transfer
// (transfers only have kinds Charge to Refund).
type Kind int16

// Operation kinds. The first four are also transfer kinds.
const (
	KindCharge   Kind = 1
	KindCredit   Kind = 2
	KindTransfer Kind = 3
	KindRefund   Kind = 4
	KindHold     Kind = 5
	KindCapture  Kind = 6
	KindRelease  Kind = 7
	// Account lifecycle operations: they carry no idempotency key (each is
	// naturally idempotent or a plain overwrite) and move no money.
	KindFreeze   Kind = 8
	KindUnfreeze Kind = 9
	KindClose    Kind = 10
	KindUpdate   Kind = 11
	// KindExpire only writes down the expiry of an account's expired holds
	// (the sweeper's operation).
	KindExpire Kind = 12
)

// keyed says whether an operation kind carries an idempotency key.
func (k Kind) keyed() bool { return k >= KindCharge && k <= KindRelease }

// HoldStatus is a hold's state. An open hold past its expiry reads as
// HoldExpired before any write has recorded it.
type HoldStatus int16

// Hold statuses (numbers match the proto enum and the holds table).
const (
	HoldOpen     HoldStatus = 1
	HoldCaptured HoldStatus = 2
	HoldReleased HoldStatus = 3
	HoldExpired  HoldStatus = 4
)

// Hold reserves funds on an account until it is captured, released or expires.
type Hold struct {
	ID               uuid.UUID
	IdempotencyKey   string
	AccountID        uuid.UUID
	RevenueAccountID uuid.UUID // uuid.Nil: the currency's default at capture
	Amount           int64
	Currency         string
	Status           HoldStatus
	ExpiresAt        time.Time
	CapturedAmount   int64
	// CaptureTransferID is the CHARGE a capture made.
	CaptureTransferID uuid.UUID
	Description       string
	Metadata          map[string]string
	CreatedAt         time.Time
	FinalizedAt       *time.Time
	CreatedByClient   uuid.UUID
	CreatedByKey      string
}

// Consistency selects where a balance read may come from.
type Consistency int

// Consistency levels.
const (
	// ConsistencyCached may be served by the cache (at most the cache TTL old).
	ConsistencyCached Consistency = iota
	// ConsistencyStrong always reads PostgreSQL.
	ConsistencyStrong
)

// Source says where a balance came from.
type Source int

// Balance sources.
const (
	SourceCache Source = 1
	SourceStore Source = 2
)

// Account is a ledger account.
type Account struct {
	ID          uuid.UUID
	Currency    string
	Type        AccountType
	ExternalRef string
	Floor       Floor
	CreditLimit int64
	Status      Status
	Metadata    map[string]string
	CreatedAt   time.Time
	Version     int64
	// LowBalanceThreshold, when set, is the available amount below which a
	// debit or hold reports ThresholdCrossed.
	LowBalanceThreshold *int64
	// ShardOf is, for a shard row, the account it is a shard of;
	// ShardCount, for an account with shards, how many further shards it
	// has (docs/ARCHITECTURE.md, "Sharded system accounts").
	ShardOf    uuid.UUID
	ShardCount int32
}

// Transfer is an immutable movement of Amount from DebitAccountID to
// CreditAccountID.
type Transfer struct {
	ID             uuid.UUID
	IdempotencyKey string
	Kind           Kind
	// DebitAccountID and CreditAccountID are the accounts as callers name
	// them; where a side posted to a shard of its account, DebitShardID or
	// CreditShardID names the shard (docs/ARCHITECTURE.md, "Sharded system
	// accounts").
	DebitAccountID  uuid.UUID
	CreditAccountID uuid.UUID
	DebitShardID    uuid.UUID
	CreditShardID   uuid.UUID
	Amount          int64
	Currency        string
	Description     string
	Metadata        map[string]string
	CreatedAt       time.Time
	// CreatedByClient and CreatedByKey name the principal that created the
	// transfer (uuid.Nil and "" when it was made without authentication).
	CreatedByClient uuid.UUID
	CreatedByKey    string
	// RefundOf is the charge a REFUND reverses.
	RefundOf uuid.UUID
	// HoldID is the hold a captured CHARGE came from.
	HoldID uuid.UUID
	// ThresholdCrossed: this transfer took the debited account's available
	// amount below its low-balance threshold.
	ThresholdCrossed bool
	// Refunded is how much of a CHARGE has been refunded so far.
	Refunded int64
}

// Entry is one side of a transfer on one account.
type Entry struct {
	TransferID   uuid.UUID
	AccountID    uuid.UUID
	Sequence     int64
	Amount       int64
	BalanceAfter int64
	VersionAfter int64
	CreatedAt    time.Time
	// CreatedByClient and CreatedByKey are those of the entry's transfer.
	CreatedByClient uuid.UUID
	CreatedByKey    string
	// Kind is the kind of the entry's transfer.
	Kind Kind
}

// Balance is an account's balance at one version.
type Balance struct {
	AccountID   uuid.UUID
	Currency    string
	Balance     int64
	Available   int64
	CreditLimit int64
	Version     int64
	Source      Source
	AsOf        time.Time
	// Held is the sum of the open, unexpired holds.
	Held int64
	// Final is false for a historical balance within the settle window of
	// now (a transaction dated before it may still commit); true otherwise.
	Final bool
	// NextHoldExpiry is when the earliest open hold expires (nil: none).
	NextHoldExpiry *time.Time
}

// TransferResult is the outcome of a money-moving call.
type TransferResult struct {
	Transfer Transfer
	// Balance of the account the caller named, as of this transfer.
	Balance Balance
	// Replayed is true when the key was already used.
	Replayed bool
	// Hold is the hold a Hold, CaptureHold or ReleaseHold acted on.
	Hold *Hold
	// Account is the account after a lifecycle change.
	Account *Account
	// ThresholdCrossed: this call took the named account's available amount
	// below its low-balance threshold (decided in the committing transaction).
	ThresholdCrossed bool
}

// CreateAccountRequest creates an account. A zero ID means "generate one".
type CreateAccountRequest struct {
	ID          uuid.UUID
	Currency    string
	Type        AccountType // 0 = customer
	ExternalRef string
	Floor       Floor // 0 = the type's default
	CreditLimit int64
	Metadata    map[string]string
}

// MoveRequest is a Charge, Credit or Transfer.
type MoveRequest struct {
	// Scope isolates idempotency keys per caller: the caller's client id,
	// so every key of one client shares it ("" without authentication).
	Scope string
	// CreatedByClient and CreatedByKey are recorded on the transfer as its
	// audit trail. They are not part of the request's fingerprint: a retry
	// with another key of the same client replays.
	CreatedByClient uuid.UUID
	CreatedByKey    string
	Kind            Kind
	// AccountID is the account the caller named: the charged or credited
	// account, or the debit account of a Transfer.
	AccountID uuid.UUID
	// Counterparty is the revenue account (Charge), funding account (Credit)
	// or credit account (Transfer). Zero means the currency's default
	// system account (Charge and Credit only).
	Counterparty   uuid.UUID
	Amount         int64
	IdempotencyKey string
	Description    string
	Metadata       map[string]string
	// HoldID names the hold of a CaptureHold or ReleaseHold.
	HoldID uuid.UUID
	// ChargeID names the charge a Refund reverses.
	ChargeID uuid.UUID
	// ExpiresAt and ExpiresIn set a Hold's expiry (at most one of them;
	// neither: the default hold lifetime).
	ExpiresAt *time.Time
	ExpiresIn time.Duration
	// Account changes (KindUpdate): nil fields stay as they are.
	NewCreditLimit  *int64
	NewMetadata     map[string]string
	NewThreshold    *int64
	ClearThreshold  bool
	ReplaceMetadata bool
	// Reason says why an account change was made (freeze, unfreeze),
	// recorded with who in account_changes; at most DescriptionBytesMax.
	Reason string
	// Restrict narrows what the request may act on, for callers whose role
	// is narrower than admin (the api package sets it from the caller's
	// role). It is not part of the fingerprint.
	Restrict Restrict
	// TopUpID and TopUpPaymentID are set only by CompleteTopUp: the credit
	// of a paid top-up, whose transaction also marks the top-up SUCCEEDED.
	// The api package never sets them.
	TopUpID        uuid.UUID
	TopUpPaymentID string
}

// Restrict narrows what a request may touch beyond the account-type rules
// that apply to every caller.
type Restrict struct {
	// OwnObjects: a Refund, CaptureHold or ReleaseHold acts only on a
	// charge or hold that CreatedByClient created; any other reads as
	// NOT_FOUND, exactly as GetTransfer and GetHold answer such a caller.
	OwnObjects bool
	// CustomerAccounts: lifecycle changes (freeze, unfreeze, close, update)
	// act only on CUSTOMER accounts; system accounts are admin's.
	CustomerAccounts bool
}

// AccountQuery filters FindAccounts.
type AccountQuery struct {
	ExternalRef string
	Currency    string
	Type        AccountType
	PageSize    int
	PageToken   string
}

// EntryQuery pages through ListEntries.
type EntryQuery struct {
	AccountID  uuid.UUID
	PageSize   int
	PageToken  string
	Start, End *time.Time
	// Kinds keeps only entries of transfers of these kinds (empty: all).
	Kinds []Kind
	// NewestFirst lists the newest entries first.
	NewestFirst bool
}
