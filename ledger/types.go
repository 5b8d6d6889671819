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

// Kind says which operation produced a transfer.
type Kind int16

// Transfer kinds.
const (
	KindCharge   Kind = 1
	KindCredit   Kind = 2
	KindTransfer Kind = 3
)

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
}

// Transfer is an immutable movement of Amount from DebitAccountID to
// CreditAccountID.
type Transfer struct {
	ID              uuid.UUID
	IdempotencyKey  string
	Kind            Kind
	DebitAccountID  uuid.UUID
	CreditAccountID uuid.UUID
	Amount          int64
	Currency        string
	Description     string
	Metadata        map[string]string
	CreatedAt       time.Time
	// CreatedByClient and CreatedByKey name the principal that created the
	// transfer (uuid.Nil and "" when it was made without authentication).
	CreatedByClient uuid.UUID
	CreatedByKey    string
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
}

// TransferResult is the outcome of a money-moving call.
type TransferResult struct {
	Transfer Transfer
	// Balance of the account the caller named, as of this transfer.
	Balance Balance
	// Replayed is true when the key was already used.
	Replayed bool
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
}
