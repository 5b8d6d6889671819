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
}

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
}

// KeyRecord is an idempotency_keys row: the final outcome of one key.
type KeyRecord struct {
	Scope        string
	Key          string
	Fingerprint  []byte
	Kind         int16
	TransferID   uuid.NullUUID
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
}

// AccountUpdate is the new state of one account after a posting. PrevVersion
// guards the update: it must match the row locked earlier in the transaction.
type AccountUpdate struct {
	AccountID    uuid.UUID
	PrevVersion  int64
	Balance      int64
	Version      int64
	LastSequence int64
	LastEntryAt  time.Time
}

// Role names of the per-currency default system accounts.
const (
	SystemRoleRevenue = "revenue"
	SystemRoleFunding = "funding"
)
