package api

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alphapb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/tap"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/tallyledger/tally/auth"
)

// Defaults of the limits against hostile clients. Each has a tallyd flag.
const (
	// RequestWaitMaxDefault bounds the time from a call's headers to its
	// request message (the whole message, and for a unary or
	// server-streaming call the end of the client's stream). A slow-loris
	// stream that sends headers and nothing more is closed after it.
	RequestWaitMaxDefault = 5 * time.Second
	// ConnectionsMaxDefault bounds concurrent client connections; one over
	// it is closed as soon as it is accepted.
	ConnectionsMaxDefault = 1000
	// AuthWaitMaxDefault bounds how long the check of a key not in the
	// verifier's cache may hold the connection's reader before the call is
	// answered UNAVAILABLE (the look-up goes on and fills the cache).
	AuthWaitMaxDefault = 2 * time.Second
	// UnauthenticatedMsgBytesMaxDefault bounds a message of the calls open
	// without credentials (health, reflection), whose requests are tiny.
	// Every other call is authenticated from its headers before any of its
	// body is read.
	UnauthenticatedMsgBytesMaxDefault = 16 << 10
	// revokedGrace is how long a stream whose key was revoked has to end by
	// itself (its handler sees its context end) before its transport stream
	// is cancelled too (a client that stops reading blocks the handler's Send).
	revokedGrace = time.Second
)

// Reasons of the limits in this file.
const (
	ReasonRequestWaitExceeded = "REQUEST_WAIT_EXCEEDED"
	ReasonMessageTooLarge     = "MESSAGE_TOO_LARGE"
)

var errRevoked = newStatus(codes.Unauthenticated, ReasonUnauthenticated,
	"the API key of this stream is no longer valid (revoked); open a new stream with a valid key", nil)

// ctlKey finds the streamCtl in a context.
type ctlKey struct{}

// streamCtl is the context the tap handler gives each stream. It ends the
// stream when the request message does not arrive within the request wait
// (Err() then says DeadlineExceeded, so the client gets DEADLINE_EXCEEDED,
// while no deadline is visible to handlers), or when its key is revoked.
// It also carries what the tap learnt: the principal and the key.
type streamCtl struct {
	context.Context // a cancelCtx: children attach to it directly
	cancel          context.CancelFunc
	timer           *time.Timer
	expired         atomic.Bool
	authorized      bool   // the tap authenticated and authorized the call
	token           string // the API key, for re-checks ("" for certificates and open calls)
}

func (c *streamCtl) Value(k any) any {
	if k == (ctlKey{}) {
		return c
	}
	return c.Context.Value(k)
}

func (c *streamCtl) Err() error {
	err := c.Context.Err()
	if err != nil && c.expired.Load() {
		return context.DeadlineExceeded
	}
	return err
}

// received stops the request-wait timer; it reports false when the wait
// had already expired.
func (c *streamCtl) received() bool {
	if c.timer != nil {
		c.timer.Stop()
	}
	return !c.expired.Load()
}

func ctlOf(ctx context.Context) *streamCtl {
	c, _ := ctx.Value(ctlKey{}).(*streamCtl)
	return c
}

// tapper is the server's tap.ServerInHandle: it runs on the connection's
// reader when a stream's headers arrive, before any of its body is read.
type tapper struct {
	auth           *authenticator // nil without authentication
	requestWaitMax time.Duration
	authWaitMax    time.Duration
	// refused reports a call refused here to the outer interceptors
	// (metrics, logging), which otherwise never see it.
	refused func(ctx context.Context, method string, err error)
}

func (t *tapper) handle(ctx context.Context, info *tap.Info) (context.Context, error) {
	inner, cancel := context.WithCancel(ctx)
	c := &streamCtl{Context: inner, cancel: cancel}
	if t.auth != nil && !isOpen(info.FullMethodName) {
		actx, acancel := context.WithTimeout(ctx, t.authWaitMax)
		p, token, err := t.auth.check(actx, info.FullMethodName)
		acancel()
		if err != nil {
			cancel()
			if t.refused != nil {
				t.refused(ctx, info.FullMethodName, err)
			}
			return nil, err
		}
		c.Context = auth.WithPrincipal(inner, p)
		c.authorized, c.token = true, token
	}
	c.timer = time.AfterFunc(t.requestWaitMax, func() {
		c.expired.Store(true)
		cancel()
	})
	return c, nil
}

// firstMessageUnary runs once the request message has been read: a unary
// call's interceptors only run after it.
func firstMessageUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if c := ctlOf(ctx); c != nil && !c.received() {
		return nil, newStatus(codes.DeadlineExceeded, ReasonRequestWaitExceeded, "request message not received in time", nil)
	}
	if oversize(req) {
		return nil, errOpenTooLarge
	}
	return h(ctx, req)
}

var errOpenTooLarge = newStatus(codes.InvalidArgument, ReasonMessageTooLarge,
	"message larger than the limit for calls without credentials (--unauthenticated-msg-bytes-max)", nil)

// openLimitCodec is the proto codec, except that it does not decode a
// request of an open service (health, reflection) larger than max: it
// leaves the message empty but for oversizeMark, and the interceptors
// refuse it. (gRPC's own message limit is one for the whole server, and
// an error from a codec reaches the caller as INTERNAL.)
type openLimitCodec struct {
	encoding.CodecV2
	max int
}

// oversizeMark is an unknown field (the largest field number) no open
// service's request defines.
var oversizeMark = protowire.AppendVarint(protowire.AppendTag(nil, protowire.MaxValidNumber, protowire.VarintType), 1)

func (c openLimitCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if data.Len() > c.max && isOpenRequest(v) {
		m := v.(proto.Message)
		proto.Reset(m)
		m.ProtoReflect().SetUnknown(oversizeMark)
		return nil
	}
	return c.CodecV2.Unmarshal(data, v)
}

func isOpenRequest(v any) bool {
	switch v.(type) {
	case *healthpb.HealthCheckRequest, *healthpb.HealthListRequest,
		//lint:ignore SA1019 reflection.Register still serves v1alpha (older grpcurl asks it), open like v1 (see openServices)
		*reflectionpb.ServerReflectionRequest, *reflectionv1alphapb.ServerReflectionRequest:
		return true
	}
	return false
}

func oversize(v any) bool {
	m, ok := v.(proto.Message)
	return ok && isOpenRequest(v) && bytes.Equal(m.ProtoReflect().GetUnknown(), oversizeMark)
}

// firstMessageStream stops the request wait when the stream's first
// RecvMsg returns.
func firstMessageStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	c := ctlOf(ss.Context())
	if c == nil {
		return h(srv, ss)
	}
	return h(srv, &firstMsgStream{ServerStream: ss, c: c})
}

type firstMsgStream struct {
	grpc.ServerStream
	c    *streamCtl
	once sync.Once
}

func (s *firstMsgStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	s.once.Do(func() { s.c.received() })
	if err == nil && oversize(m) {
		return errOpenTooLarge
	}
	return err
}

// watchRevocation re-checks a stream's API key every half cache TTL, so a
// revoked key's stream ends within one TTL with UNAUTHENTICATED. A key
// that cannot be checked (PostgreSQL down) ends it with UNAVAILABLE: the
// client resumes once the key can be checked again.
func (a *authenticator) watchRevocation(srv any, ss grpc.ServerStream, h grpc.StreamHandler, c *streamCtl) error {
	ctx, cancel := context.WithCancelCause(ss.Context())
	defer cancel(nil)
	every := a.o.Verifier.CacheTTL() / 2
	var stopped atomic.Bool
	var timer *time.Timer
	var mu sync.Mutex
	var check func()
	check = func() {
		vctx, vcancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := a.o.Verifier.VerifyWithin(vctx, c.token, every)
		vcancel()
		if stopped.Load() || ctx.Err() != nil {
			return
		}
		switch {
		case err == nil:
			mu.Lock()
			if !stopped.Load() {
				timer = time.AfterFunc(every, check)
			}
			mu.Unlock()
			return
		case errors.Is(err, auth.ErrUnavailable):
			cancel(errAuthUnavailable)
		default:
			a.log.InfoContext(ctx, "auth: ending a stream whose key is no longer valid", "key_id", principalKey(ctx))
			cancel(errRevoked)
		}
		// A handler blocked in Send (a client that stopped reading) does
		// not see ctx; end its transport stream after a grace.
		time.AfterFunc(revokedGrace, c.cancel)
	}
	mu.Lock()
	timer = time.AfterFunc(every, check)
	mu.Unlock()
	err := h(srv, principalStream{ServerStream: ss, ctx: ctx})
	stopped.Store(true)
	mu.Lock()
	timer.Stop()
	mu.Unlock()
	if cause := context.Cause(ctx); cause == errRevoked || cause == errAuthUnavailable {
		return cause
	}
	return err
}

var errAuthUnavailable = newStatus(codes.Unavailable, ReasonAuthUnavailable,
	"cannot check credentials now; resume the stream later", nil)

func principalKey(ctx context.Context) string {
	p, _ := auth.FromContext(ctx)
	return p.KeyID
}

// refusedReporter replays a call refused by the tap handler through the
// outer interceptors (metrics, logging), as if its handler had returned
// err, so refused calls are counted and logged as before.
func refusedReporter(unary []grpc.UnaryServerInterceptor, stream []grpc.StreamServerInterceptor, streaming func(string) bool) func(context.Context, string, error) {
	return func(ctx context.Context, method string, err error) {
		if streaming(method) {
			ss := &refusedStream{ctx: ctx}
			var run grpc.StreamHandler = func(any, grpc.ServerStream) error { return err }
			for i := len(stream) - 1; i >= 0; i-- {
				ic, next := stream[i], run
				run = func(srv any, ss grpc.ServerStream) error {
					return ic(srv, ss, &grpc.StreamServerInfo{FullMethod: method, IsServerStream: true}, next)
				}
			}
			_ = run(nil, ss)
			return
		}
		var run grpc.UnaryHandler = func(context.Context, any) (any, error) { return nil, err }
		for i := len(unary) - 1; i >= 0; i-- {
			ic, next := unary[i], run
			run = func(ctx context.Context, req any) (any, error) {
				return ic(ctx, req, &grpc.UnaryServerInfo{FullMethod: method}, next)
			}
		}
		_, _ = run(ctx, nil)
	}
}

// refusedStream stands for a stream refused before it existed.
type refusedStream struct{ ctx context.Context }

func (s *refusedStream) SetHeader(metadata.MD) error  { return nil }
func (s *refusedStream) SendHeader(metadata.MD) error { return nil }
func (s *refusedStream) SetTrailer(metadata.MD)       {}
func (s *refusedStream) Context() context.Context     { return s.ctx }
func (s *refusedStream) SendMsg(any) error            { return errors.New("refused") }
func (s *refusedStream) RecvMsg(any) error            { return errors.New("refused") }

// LimitConnections returns a listener that holds at most max client
// connections open (max <= 0: ConnectionsMaxDefault). A connection over
// the cap is closed as soon as it is accepted, so the client fails fast
// (UNAVAILABLE, which clients retry) instead of waiting in the backlog.
func LimitConnections(l net.Listener, max int) net.Listener {
	if max <= 0 {
		max = ConnectionsMaxDefault
	}
	return &limitListener{Listener: l, slots: make(chan struct{}, max)}
}

type limitListener struct {
	net.Listener
	slots chan struct{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &limitConn{Conn: c, release: func() { <-l.slots }}, nil
		default:
			_ = c.Close()
		}
	}
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
