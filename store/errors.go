package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Errors returned by the store. Callers match them with errors.Is; pgx and
// PostgreSQL errors never cross this package's boundary unwrapped, so SQL text
// cannot leak to a caller.
var (
	// ErrNotFound means the row asked for does not exist.
	ErrNotFound = errors.New("store: not found")
	// ErrUnavailable means PostgreSQL could not be reached or the connection
	// was lost. The outcome of a write that fails this way is unknown until
	// the caller retries with the same idempotency key.
	ErrUnavailable = errors.New("store: database unavailable")
	// ErrConflict means a unique constraint rejected the write (for example a
	// concurrent insert of the same key from another process).
	ErrConflict = errors.New("store: unique constraint conflict")
	// ErrOutOfRange means a numeric value left the int64 range.
	ErrOutOfRange = errors.New("store: numeric value out of range")
	// ErrCheckViolation means a CHECK constraint rejected the write: the code
	// missed an invariant the database still enforces.
	ErrCheckViolation = errors.New("store: check constraint violated")
	// ErrTimeout means the caller's deadline expired.
	ErrTimeout = errors.New("store: deadline exceeded")
	// ErrCanceled means the caller went away.
	ErrCanceled = errors.New("store: canceled")
	// ErrInternal is anything else: a bug, never a fault of the network.
	ErrInternal = errors.New("store: internal error")
	// ErrSchemaOutdated means the database schema is older than this binary.
	ErrSchemaOutdated = errors.New("store: schema is older than this binary; run `tallyd migrate` or pass --migrate")
)

// Error wraps a store sentinel with the constraint name or detail that caused
// it, for logs. Its Error text never contains SQL.
type Error struct {
	Kind       error
	Constraint string
	cause      error
}

func (e *Error) Error() string {
	if e.Constraint != "" {
		return fmt.Sprintf("%v (%s)", e.Kind, e.Constraint)
	}
	return e.Kind.Error()
}

// Is lets errors.Is match the sentinel.
func (e *Error) Is(target error) bool { return target == e.Kind }

// Cause returns the underlying driver error, for server-side logs only.
func (e *Error) Cause() error { return e.cause }

// translate maps a pgx/pgconn/network error to a store error. It is applied
// to every error leaving this package.
func translate(err error) error {
	if err == nil {
		return nil
	}
	var se *Error
	if errors.As(err, &se) {
		return err
	}
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrSchemaOutdated) {
		return err
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &Error{Kind: ErrTimeout, cause: err}
	}
	if errors.Is(err, context.Canceled) {
		return &Error{Kind: ErrCanceled, cause: err}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == pgerrcode.UniqueViolation:
			return &Error{Kind: ErrConflict, Constraint: pgErr.ConstraintName, cause: err}
		case pgErr.Code == pgerrcode.CheckViolation:
			return &Error{Kind: ErrCheckViolation, Constraint: pgErr.ConstraintName, cause: err}
		case pgErr.Code == pgerrcode.NumericValueOutOfRange:
			return &Error{Kind: ErrOutOfRange, cause: err}
		case pgErr.Code == pgerrcode.QueryCanceled:
			// statement_timeout or a cancel request sent on context expiry.
			return &Error{Kind: ErrTimeout, cause: err}
		case pgerrcode.IsConnectionException(pgErr.Code),
			pgErr.Code == pgerrcode.AdminShutdown,
			pgErr.Code == pgerrcode.CrashShutdown,
			pgErr.Code == pgerrcode.CannotConnectNow,
			pgErr.Code == pgerrcode.TooManyConnections,
			pgErr.Code == pgerrcode.DeadlockDetected,
			pgErr.Code == pgerrcode.SerializationFailure,
			pgErr.Code == pgerrcode.ReadOnlySQLTransaction,
			pgErr.Code == pgerrcode.IdleInTransactionSessionTimeout,
			pgerrcode.IsInsufficientResources(pgErr.Code),
			pgerrcode.IsOperatorIntervention(pgErr.Code),
			pgerrcode.IsSystemError(pgErr.Code):
			// The database (not the request) failed; the transaction did not
			// commit or its outcome is unknown. Retrying the same key is safe.
			return &Error{Kind: ErrUnavailable, cause: err}
		}
		return &Error{Kind: ErrInternal, Constraint: pgErr.ConstraintName, cause: err}
	}
	// Everything that is not a server-reported error is the connection
	// failing: dial errors, resets, EOF, a closed pool, a lost COMMIT.
	var netErr net.Error
	var connErr *pgconn.ConnectError
	switch {
	case errors.As(err, &connErr), errors.As(err, &netErr),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.EPIPE), pgconn.SafeToRetry(err), pgconn.Timeout(err):
		return &Error{Kind: ErrUnavailable, cause: err}
	}
	// pgx reports a dead connection or a closed pool with plain errors
	// ("conn closed", "closed pool"); treat all unclassified driver errors as
	// unavailability, since a wrong UNAVAILABLE only costs a safe retry while
	// a wrong INTERNAL tells the caller to give up on a charge.
	return &Error{Kind: ErrUnavailable, cause: err}
}
