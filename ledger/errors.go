package ledger

import (
	"context"
	"errors"
	"fmt"

	"github.com/tallyledger/tally/store"
)

// Code classifies a ledger error. The api package maps each to one gRPC
// status code; the ledger itself knows nothing about gRPC.
type Code int

// Error codes.
const (
	// CodeInvalid is malformed input. Nothing was recorded.
	CodeInvalid Code = iota + 1
	// CodeNotFound names a missing account or transfer. Nothing was recorded.
	CodeNotFound
	// CodeFailedPrecondition is a business rejection (recorded under the key
	// for money movement).
	CodeFailedPrecondition
	// CodeAlreadyExists is a key reused with a different request, or an
	// account id reused with different attributes.
	CodeAlreadyExists
	// CodeOutOfRange is a balance that would overflow int64 (recorded).
	CodeOutOfRange
	// CodeUnavailable means PostgreSQL could not be reached; retry the same key.
	CodeUnavailable
	// CodeTimeout means the caller's deadline expired; retry the same key.
	CodeTimeout
	// CodeCanceled means the caller went away.
	CodeCanceled
	// CodeInternal is a bug.
	CodeInternal
	// CodeResourceExhausted means the service is overloaded; retry the same
	// key after a longer backoff.
	CodeResourceExhausted
	// CodePermissionDenied means the caller's role may not act on this
	// object. Nothing was recorded.
	CodePermissionDenied
)

// Machine-readable reasons, sent to callers in google.rpc.ErrorInfo.
const (
	ReasonInvalidArgument        = "INVALID_ARGUMENT"
	ReasonAccountNotFound        = "ACCOUNT_NOT_FOUND"
	ReasonTransferNotFound       = "TRANSFER_NOT_FOUND"
	ReasonInsufficientFunds      = "INSUFFICIENT_FUNDS"
	ReasonCurrencyMismatch       = "CURRENCY_MISMATCH"
	ReasonAccountNotActive       = "ACCOUNT_NOT_ACTIVE"
	ReasonAccountTypeMismatch    = "ACCOUNT_TYPE_MISMATCH"
	ReasonVersionNotReached      = "VERSION_NOT_REACHED"
	ReasonIdempotencyKeyReused   = "IDEMPOTENCY_KEY_REUSED"
	ReasonAccountExistsDifferent = "ACCOUNT_EXISTS_DIFFERENT"
	ReasonBalanceOverflow        = "BALANCE_OVERFLOW"
	ReasonDatabaseUnavailable    = "DATABASE_UNAVAILABLE"
	ReasonDeadlineExceeded       = "DEADLINE_EXCEEDED"
	ReasonCanceled               = "CANCELED"
	ReasonInternal               = "INTERNAL"
	ReasonOverloaded             = "OVERLOADED"
	ReasonHoldNotFound           = "HOLD_NOT_FOUND"
	ReasonHoldFinalized          = "HOLD_FINALIZED"
	ReasonHoldExpired            = "HOLD_EXPIRED"
	ReasonHoldAmountExceeded     = "HOLD_AMOUNT_EXCEEDED"
	ReasonHoldNotAllowed         = "HOLD_NOT_ALLOWED"
	ReasonNotACharge             = "NOT_A_CHARGE"
	ReasonRefundExceedsCharge    = "REFUND_EXCEEDS_CHARGE"
	ReasonAccountClosed          = "ACCOUNT_CLOSED"
	ReasonAccountNotEmpty        = "ACCOUNT_NOT_EMPTY"
	ReasonCreditLimitInUse       = "CREDIT_LIMIT_IN_USE"
	ReasonBatchItemFailed        = "BATCH_ITEM_FAILED"
	ReasonNotApplied             = "NOT_APPLIED"
	// ReasonSelfPosting: the debit and credit accounts would be the same
	// account (directly or through a default system account).
	ReasonSelfPosting = "SELF_POSTING"
	// ReasonSystemAccount: the operation is not allowed on a system
	// (REVENUE or FUNDING) account, or on a default one.
	ReasonSystemAccount    = "SYSTEM_ACCOUNT"
	ReasonPermissionDenied = "PERMISSION_DENIED"
	// ReasonShardAccount: a request named one shard of a sharded system
	// account; name the account itself.
	ReasonShardAccount = "SHARD_ACCOUNT"
	// ReasonBatchReplyTooLarge: a SubmitBatch whose reply could not be sent
	// (more than Limits.BatchReplyBytesMax); refused before COMMIT.
	ReasonBatchReplyTooLarge = "BATCH_REPLY_TOO_LARGE"
)

// Error is the only error type the ledger returns.
type Error struct {
	Code    Code
	Reason  string
	Message string
	// Field names the offending request field for CodeInvalid.
	Field string
	// Replayed is true when this rejection is the stored outcome of a key
	// that was already used.
	Replayed bool
	cause    error
}

func (e *Error) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("%s: %s (%s)", e.Reason, e.Message, e.Field)
	}
	return fmt.Sprintf("%s: %s", e.Reason, e.Message)
}

// Unwrap returns the underlying store error, for server logs.
func (e *Error) Unwrap() error { return e.cause }

func invalid(field, format string, args ...any) *Error {
	return &Error{Code: CodeInvalid, Reason: ReasonInvalidArgument, Field: field, Message: fmt.Sprintf(format, args...)}
}

func rejection(code Code, reason, format string, args ...any) *Error {
	return &Error{Code: code, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// fromStore translates a store error into a ledger error at the boundary.
func fromStore(err error) error {
	if err == nil {
		return nil
	}
	var le *Error
	if errors.As(err, &le) {
		return le
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		err = store.ErrTimeout
	case errors.Is(err, context.Canceled):
		err = store.ErrCanceled
	}
	switch {
	case errors.Is(err, store.ErrUnavailable):
		return &Error{Code: CodeUnavailable, Reason: ReasonDatabaseUnavailable, Message: "database unavailable; retry with the same idempotency key", cause: err}
	case errors.Is(err, store.ErrTimeout):
		return &Error{Code: CodeTimeout, Reason: ReasonDeadlineExceeded, Message: "deadline exceeded; retry with the same idempotency key", cause: err}
	case errors.Is(err, store.ErrCanceled):
		return &Error{Code: CodeCanceled, Reason: ReasonCanceled, Message: "request canceled", cause: err}
	case errors.Is(err, store.ErrConflict):
		// A concurrent writer with the same key won a race the advisory lock
		// should have prevented (for example across a failover). The key's
		// outcome now exists: a retry replays it.
		return &Error{Code: CodeUnavailable, Reason: ReasonDatabaseUnavailable, Message: "concurrent write; retry with the same idempotency key", cause: err}
	case errors.Is(err, store.ErrOutOfRange):
		return &Error{Code: CodeOutOfRange, Reason: ReasonBalanceOverflow, Message: "balance out of range", cause: err}
	}
	return &Error{Code: CodeInternal, Reason: ReasonInternal, Message: "internal error", cause: err}
}
