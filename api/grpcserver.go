package api

import (
	"context"
	"log/slog"
	"runtime/debug"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Defaults for the gRPC server's limits. Each has a tallyd flag.
const (
	// MsgBytesMaxDefault bounds request and response messages.
	MsgBytesMaxDefault = 1 << 20
	// CallTimeoutDefault applies to calls that arrive without a deadline, so
	// no call can hold a connection and row locks indefinitely.
	CallTimeoutDefault = 30 * time.Second
	// StreamsMaxDefault bounds concurrent streams per client connection.
	StreamsMaxDefault = 1024
)

// ServerOptions configures NewGRPCServer.
type ServerOptions struct {
	Logger             *slog.Logger
	MsgBytesMax        int
	CallTimeoutDefault time.Duration
	StreamsMax         uint32
}

// NewGRPCServer builds the gRPC server: LedgerService, grpc.health.v1 and
// reflection, with the interceptor chain logging → deadline → recovery
// (recovery innermost, so a panic is logged as the INTERNAL it becomes).
func NewGRPCServer(l *ledger.Ledger, hs *health.Server, o ServerOptions) *grpc.Server {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.MsgBytesMax <= 0 {
		o.MsgBytesMax = MsgBytesMaxDefault
	}
	if o.CallTimeoutDefault <= 0 {
		o.CallTimeoutDefault = CallTimeoutDefault
	}
	if o.StreamsMax == 0 {
		o.StreamsMax = StreamsMaxDefault
	}
	log := o.Logger
	logger := logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		log.Log(ctx, slog.Level(lvl), msg, fields...)
	})
	levels := logging.WithLevels(func(c codes.Code) logging.Level {
		switch c {
		case codes.OK:
			return logging.LevelDebug
		case codes.Internal, codes.Unknown, codes.DataLoss:
			return logging.LevelError
		case codes.Unavailable, codes.DeadlineExceeded:
			return logging.LevelWarn
		}
		return logging.LevelInfo
	})
	recoveryOpt := recovery.WithRecoveryHandlerContext(func(ctx context.Context, p any) error {
		log.ErrorContext(ctx, "panic in handler", "panic", p, "stack", string(debug.Stack()))
		return newStatus(codes.Internal, ledger.ReasonInternal, "internal error", nil)
	})
	s := grpc.NewServer(
		grpc.MaxRecvMsgSize(o.MsgBytesMax),
		grpc.MaxSendMsgSize(o.MsgBytesMax),
		grpc.MaxConcurrentStreams(o.StreamsMax),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(
			logging.UnaryServerInterceptor(logger, logging.WithLogOnEvents(logging.FinishCall), levels),
			deadlineInterceptor(o.CallTimeoutDefault),
			recovery.UnaryServerInterceptor(recoveryOpt),
		),
		grpc.ChainStreamInterceptor(
			logging.StreamServerInterceptor(logger, logging.WithLogOnEvents(logging.FinishCall), levels),
			recovery.StreamServerInterceptor(recoveryOpt),
		),
	)
	tallyv1.RegisterLedgerServiceServer(s, NewServer(l))
	healthpb.RegisterHealthServer(s, hs)
	reflection.Register(s)
	return s
}

func deadlineInterceptor(d time.Duration) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		return h(ctx, req)
	}
}
