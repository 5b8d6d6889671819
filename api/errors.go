package api

import (
	"context"
	"errors"
	"log/slog"
	"strconv"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/ledger"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of every Tally error.
const ErrorDomain = "tally.v1"

// codeOf maps ledger error codes to gRPC codes. This is the only place the
// mapping lives.
var codeOf = map[ledger.Code]codes.Code{
	ledger.CodeInvalid:            codes.InvalidArgument,
	ledger.CodeNotFound:           codes.NotFound,
	ledger.CodeFailedPrecondition: codes.FailedPrecondition,
	ledger.CodeAlreadyExists:      codes.AlreadyExists,
	ledger.CodeOutOfRange:         codes.OutOfRange,
	ledger.CodeUnavailable:        codes.Unavailable,
	ledger.CodeTimeout:            codes.DeadlineExceeded,
	ledger.CodeCanceled:           codes.Canceled,
	ledger.CodeInternal:           codes.Internal,
	ledger.CodeResourceExhausted:  codes.ResourceExhausted,
	ledger.CodePermissionDenied:   codes.PermissionDenied,
}

// statusError turns a ledger error into a gRPC status with an ErrorInfo
// detail. The message is the ledger's own text; SQL and stack traces never
// reach it.
func statusError(err error) error {
	if err == nil {
		return nil
	}
	var le *ledger.Error
	if !errors.As(err, &le) {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			// A stream's own context ended: the caller went away or its
			// deadline passed. CANCELLED or DEADLINE_EXCEEDED, never INTERNAL.
			return status.FromContextError(err).Err()
		}
		// Not a ledger error: a bug in this package. Say nothing more.
		return newStatus(codes.Internal, ledger.ReasonInternal, "internal error", nil)
	}
	md := map[string]string{}
	if le.Field != "" {
		md["field"] = le.Field
	}
	if le.Replayed {
		md["replayed"] = strconv.FormatBool(true)
	}
	c, ok := codeOf[le.Code]
	if !ok {
		c = codes.Internal
	}
	if cause := le.Unwrap(); cause != nil && (c == codes.Internal || c == codes.Unavailable) {
		// The cause (driver error text, constraint names) stays in the
		// server's log; the caller gets only the ledger's message.
		slog.Warn("ledger error", "code", c.String(), "reason", le.Reason, "cause", causeText(cause))
	}
	return newStatus(c, le.Reason, le.Message, md)
}

func newStatus(c codes.Code, reason, msg string, md map[string]string) error {
	st := status.New(c, msg)
	if withInfo, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: md}); err == nil {
		st = withInfo
	}
	return st.Err()
}

func invalidArg(field, msg string) error {
	return newStatus(codes.InvalidArgument, ledger.ReasonInvalidArgument, msg, map[string]string{"field": field})
}

// ErrorInfo extracts the ErrorInfo detail of a Tally status error, if any.
func ErrorInfo(err error) (*errdetails.ErrorInfo, bool) {
	st, ok := status.FromError(err)
	if !ok {
		return nil, false
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info, true
		}
	}
	return nil, false
}

// causeText unwraps store errors to the driver's own message for logs.
func causeText(err error) string {
	type causer interface{ Cause() error }
	var c causer
	if errors.As(err, &c) && c.Cause() != nil {
		return err.Error() + ": " + c.Cause().Error()
	}
	return err.Error()
}
