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
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
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
	MsgBytesMaxDefault = 4 << 20
	// CallTimeoutDefault applies to calls that arrive without a deadline, so
	// no call can hold a connection and row locks indefinitely.
	CallTimeoutDefault = 30 * time.Second
	// StreamsMaxDefault bounds concurrent streams per client connection
	// (HTTP/2's recommended minimum; a client queues calls over it).
	StreamsMaxDefault = 100
	// HeaderBytesMaxDefault bounds a call's metadata.
	HeaderBytesMaxDefault = 16 << 10
	// KeepaliveTimeDefault: the server pings a connection idle this long...
	KeepaliveTimeDefault = 30 * time.Second
	// KeepaliveTimeoutDefault: ...and closes it when the ping is not
	// answered within this time.
	KeepaliveTimeoutDefault = 10 * time.Second
	// KeepaliveMinTimeDefault: a client pinging more often than this is
	// disconnected (GOAWAY "too_many_pings").
	KeepaliveMinTimeDefault = 10 * time.Second
)

// ServerOptions configures NewGRPCServer.
type ServerOptions struct {
	Logger             *slog.Logger
	MsgBytesMax        int
	CallTimeoutDefault time.Duration
	StreamsMax         uint32
	HeaderBytesMax     uint32
	KeepaliveTime      time.Duration
	KeepaliveTimeout   time.Duration
	KeepaliveMinTime   time.Duration
	// Auth turns authentication on; nil serves every caller without it.
	Auth *AuthOptions
	// Creds is the transport security (TLS); nil serves plaintext.
	Creds credentials.TransportCredentials
	// NoReflection turns server reflection off.
	NoReflection bool
	// SubmitBatchBytesMax bounds one SubmitBatch request (0: the default).
	SubmitBatchBytesMax int
	// ExportPollInterval and ExportStreamDurationMax tune following feed
	// streams (0: the defaults).
	ExportPollInterval      time.Duration
	ExportStreamDurationMax time.Duration
	// ExportFollowStreamsPerKeyMax and ExportFollowStreamsMax bound
	// following feed streams per API key and per server (0: the defaults).
	ExportFollowStreamsPerKeyMax int
	ExportFollowStreamsMax       int
	// RequestWaitMax bounds the wait from a call's headers to its request
	// message, and a new connection's handshake (0: the default).
	RequestWaitMax time.Duration
	// AuthWaitMax bounds the check of an uncached key before the request
	// body is read (0: the default).
	AuthWaitMax time.Duration
	// UnauthenticatedMsgBytesMax bounds a request message of the open
	// services (health, reflection) (0: the default).
	UnauthenticatedMsgBytesMax int
	// ConnectionsMax bounds concurrent connections: give the listener to
	// LimitConnections with it (0: the default).
	ConnectionsMax int
	// UnaryInterceptors and StreamInterceptors run outside the built-in
	// chain, the first outermost, so they see every call with its final
	// status, refused and panicking ones included (metrics).
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
	// ExtraOptions are added to the server's options (for example a stats
	// handler for tracing).
	ExtraOptions []grpc.ServerOption
}

// NewGRPCServer builds the gRPC server: LedgerService, grpc.health.v1 and
// reflection, with the interceptor chain [o.UnaryInterceptors] → logging →
// auth → deadline → recovery (auth after logging, so refused calls are
// logged; recovery innermost, so a panic is logged as the INTERNAL it
// becomes).
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
	if o.HeaderBytesMax == 0 {
		o.HeaderBytesMax = HeaderBytesMaxDefault
	}
	if o.KeepaliveTime <= 0 {
		o.KeepaliveTime = KeepaliveTimeDefault
	}
	if o.KeepaliveTimeout <= 0 {
		o.KeepaliveTimeout = KeepaliveTimeoutDefault
	}
	if o.KeepaliveMinTime <= 0 {
		o.KeepaliveMinTime = KeepaliveMinTimeDefault
	}
	if o.RequestWaitMax <= 0 {
		o.RequestWaitMax = RequestWaitMaxDefault
	}
	if o.AuthWaitMax <= 0 {
		o.AuthWaitMax = AuthWaitMaxDefault
	}
	if o.UnauthenticatedMsgBytesMax <= 0 {
		o.UnauthenticatedMsgBytesMax = UnauthenticatedMsgBytesMaxDefault
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
	unary := append(append([]grpc.UnaryServerInterceptor{}, o.UnaryInterceptors...),
		logging.UnaryServerInterceptor(logger, logging.WithLogOnEvents(logging.FinishCall), levels))
	stream := append(append([]grpc.StreamServerInterceptor{}, o.StreamInterceptors...),
		logging.StreamServerInterceptor(logger, logging.WithLogOnEvents(logging.FinishCall), levels))
	// Calls refused by the tap handler are replayed through the outer
	// interceptors (metrics, logging) so they are counted and logged.
	streaming := map[string]bool{}
	tp := &tapper{requestWaitMax: o.RequestWaitMax, authWaitMax: o.AuthWaitMax}
	tp.refused = refusedReporter(append([]grpc.UnaryServerInterceptor{}, unary...),
		append([]grpc.StreamServerInterceptor{}, stream...), func(m string) bool { return streaming[m] })
	unary = append(unary, firstMessageUnary)
	stream = append(stream, firstMessageStream)
	if o.Auth != nil {
		if o.Auth.Verifier == nil {
			panic("api: AuthOptions without a Verifier")
		}
		a := &authenticator{o: *o.Auth, log: log}
		tp.auth = a
		unary = append(unary, a.unary())
		stream = append(stream, a.stream())
	}
	// Malformed requests and replies too large to send get final statuses
	// with an ErrorInfo (malformed.go, replies.go).
	unary = append(unary, malformedUnary(), replyFits(o.MsgBytesMax),
		deadlineInterceptor(o.CallTimeoutDefault), recovery.UnaryServerInterceptor(recoveryOpt))
	stream = append(stream, malformedStream(), recovery.StreamServerInterceptor(recoveryOpt))
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(o.MsgBytesMax),
		grpc.MaxSendMsgSize(o.MsgBytesMax),
		grpc.MaxConcurrentStreams(o.StreamsMax),
		grpc.MaxHeaderListSize(o.HeaderBytesMax),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: o.KeepaliveTime, Timeout: o.KeepaliveTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: o.KeepaliveMinTime, PermitWithoutStream: true}),
		// Authentication and the request wait start when a stream's
		// headers arrive, before its body is read.
		grpc.InTapHandle(tp.handle),
		grpc.ConnectionTimeout(o.RequestWaitMax),
		// The proto codec, limiting open services' requests (hostile.go),
		// and never failing to decode: it marks malformed requests for
		// malformedUnary and malformedStream (malformed.go).
		grpc.ForceServerCodecV2(tolerantCodec{base: openLimitCodec{CodecV2: encoding.GetCodecV2(protoenc.Name), max: o.UnauthenticatedMsgBytesMax}}),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}
	if o.Creds != nil {
		opts = append(opts, grpc.Creds(o.Creds))
	}
	opts = append(opts, o.ExtraOptions...)
	s := grpc.NewServer(opts...)
	ls := NewServer(l)
	ls.SubmitBatchBytesMax = o.SubmitBatchBytesMax
	ls.ExportPollInterval, ls.ExportStreamDurationMax = o.ExportPollInterval, o.ExportStreamDurationMax
	ls.ExportFollowStreamsPerKeyMax, ls.ExportFollowStreamsMax = o.ExportFollowStreamsPerKeyMax, o.ExportFollowStreamsMax
	ls.Logger = log
	tallyv1.RegisterLedgerServiceServer(s, ls)
	healthpb.RegisterHealthServer(s, hs)
	if !o.NoReflection {
		reflection.Register(s)
	}
	// Written before Serve, only read afterwards.
	for name, info := range s.GetServiceInfo() {
		for _, m := range info.Methods {
			if m.IsClientStream || m.IsServerStream {
				streaming["/"+name+"/"+m.Name] = true
			}
		}
	}
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
