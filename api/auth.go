package api

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/tallyledger/tally/auth"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Reasons of authentication and authorization errors (google.rpc.ErrorInfo).
const (
	ReasonUnauthenticated  = "UNAUTHENTICATED"
	ReasonPermissionDenied = "PERMISSION_DENIED"
	ReasonRateLimited      = "RATE_LIMITED"
	ReasonAuthUnavailable  = "AUTH_UNAVAILABLE"
)

var (
	readers  = []auth.Role{auth.RoleViewer, auth.RoleSupport, auth.RoleReconciler, auth.RoleAdmin}
	everyone = append([]auth.Role{auth.RoleCharger}, readers...)
)

// MethodRoles is the one table of who may call what: full gRPC method name →
// the roles allowed to call it. A method missing here is denied to every
// role (docs/SECURITY.md shows this table; a test checks every RPC of the
// service is listed). Charger's GetTransfer is further limited, in the
// handler, to its own transfers.
var MethodRoles = map[string][]auth.Role{
	tallyv1.LedgerService_CreateAccount_FullMethodName: {auth.RoleAdmin},
	tallyv1.LedgerService_GetAccount_FullMethodName:    readers,
	tallyv1.LedgerService_FindAccounts_FullMethodName:  readers,
	tallyv1.LedgerService_Charge_FullMethodName:        {auth.RoleCharger, auth.RoleAdmin},
	tallyv1.LedgerService_Credit_FullMethodName:        {auth.RoleAdmin},
	tallyv1.LedgerService_Transfer_FullMethodName:      {auth.RoleAdmin},
	tallyv1.LedgerService_GetBalance_FullMethodName:    everyone,
	tallyv1.LedgerService_GetTransfer_FullMethodName:   everyone,
	tallyv1.LedgerService_ListEntries_FullMethodName:   readers,
	// A product service refunds, reserves and captures its own usage;
	// support refunds and releases on a customer's behalf.
	tallyv1.LedgerService_Refund_FullMethodName:      {auth.RoleCharger, auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_Hold_FullMethodName:        {auth.RoleCharger, auth.RoleAdmin},
	tallyv1.LedgerService_CaptureHold_FullMethodName: {auth.RoleCharger, auth.RoleAdmin},
	tallyv1.LedgerService_ReleaseHold_FullMethodName: {auth.RoleCharger, auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_GetHold_FullMethodName:     everyone,
	// SubmitBatch further refuses credits and transfers from a charger.
	tallyv1.LedgerService_SubmitBatch_FullMethodName:     {auth.RoleCharger, auth.RoleAdmin},
	tallyv1.LedgerService_FreezeAccount_FullMethodName:   {auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_UnfreezeAccount_FullMethodName: {auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_CloseAccount_FullMethodName:    {auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_UpdateAccount_FullMethodName:   {auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_GetBalances_FullMethodName:     readers,
	// The feed shows every client's money movement: reconciliation jobs.
	tallyv1.LedgerService_ExportTransfers_FullMethodName: {auth.RoleReconciler, auth.RoleAdmin},
	tallyv1.LedgerService_Reconcile_FullMethodName:       {auth.RoleReconciler, auth.RoleAdmin},
	// Spend breakdowns: support screens, finance and reconciliation jobs.
	tallyv1.LedgerService_SummarizeUsage_FullMethodName: readers,
	// Auto top-up rules charge a customer's card: support and admin set
	// them; every reader sees them and the top-ups.
	tallyv1.LedgerService_SetAutoTopUp_FullMethodName:  {auth.RoleSupport, auth.RoleAdmin},
	tallyv1.LedgerService_GetAutoTopUp_FullMethodName:  readers,
	tallyv1.LedgerService_ListTopUps_FullMethodName:    readers,
	tallyv1.LedgerService_GetStatement_FullMethodName:  readers,
	tallyv1.LedgerService_ListOpenHolds_FullMethodName: readers,
	tallyv1.LedgerService_ListRefunds_FullMethodName:   readers,
}

// openServices need no credentials: health checks (load balancers, the
// container health check) and server reflection (when enabled).
var openServices = []string{"/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"}

func isOpen(method string) bool {
	for _, p := range openServices {
		if strings.HasPrefix(method, p) {
			return true
		}
	}
	return false
}

// Allowed reports whether role may call method.
func Allowed(method string, role auth.Role) bool {
	for _, r := range MethodRoles[method] {
		if r == role {
			return true
		}
	}
	return false
}

// AuthOptions configures authentication. A nil *AuthOptions in
// ServerOptions serves without authentication (tallyd --insecure-no-auth).
type AuthOptions struct {
	// Verifier checks API keys (required).
	Verifier *auth.Verifier
	// CertRoles maps a verified client certificate's subject common name to
	// a role: such a caller needs no API key. Only used with mTLS.
	CertRoles map[string]auth.Role
	// Limiter is the per-key rate limit (nil: none).
	Limiter *auth.Limiter
}

type authenticator struct {
	o   AuthOptions
	log *slog.Logger
}

// One answer for every bad credential, missing ones included
// (docs/SECURITY.md), so the message tells a caller nothing about which
// keys exist.
var (
	errBadKey = newStatus(codes.Unauthenticated, ReasonUnauthenticated,
		"missing or invalid API key: send the metadata \"authorization: Bearer <API key>\" with a valid key", nil)
	errNoKey = errBadKey
)

// authenticate returns the call's principal, or a status error. It never
// says which keys exist: every bad key gets the same answer.
func (a *authenticator) authenticate(ctx context.Context, method string) (auth.Principal, string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		if p, ok := a.certPrincipal(ctx); ok {
			return p, "", nil
		}
		a.log.InfoContext(ctx, "auth: call without credentials", "method", method, "peer", peerAddr(ctx))
		return auth.Principal{}, "", errNoKey
	}
	if len(vals) > 1 {
		return auth.Principal{}, "", errBadKey
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		a.log.InfoContext(ctx, "auth: authorization is not a bearer token", "method", method, "peer", peerAddr(ctx))
		return auth.Principal{}, "", errBadKey
	}
	token = strings.TrimSpace(token)
	p, err := a.o.Verifier.Verify(ctx, token)
	switch {
	case errors.Is(err, auth.ErrUnavailable):
		return auth.Principal{}, "", newStatus(codes.Unavailable, ReasonAuthUnavailable,
			"cannot check credentials now; retry with the same idempotency key", nil)
	case err != nil:
		// Log the key id whenever the token starts like a key ("tly_<id>_"):
		// a wrong secret of any shape still names the key it was tried
		// against (ParseKey, which checks the secret's shape too, gave "").
		// Never the secret, never caller-chosen garbage.
		keyID, _ := auth.KeyIDOf(token)
		a.log.InfoContext(ctx, "auth: invalid API key", "method", method, "key_id", keyID, "peer", peerAddr(ctx))
		return auth.Principal{}, "", errBadKey
	}
	return p, token, nil
}

// certPrincipal maps a verified client certificate to a principal.
func (a *authenticator) certPrincipal(ctx context.Context) (auth.Principal, bool) {
	if len(a.o.CertRoles) == 0 {
		return auth.Principal{}, false
	}
	pr, ok := peer.FromContext(ctx)
	if !ok {
		return auth.Principal{}, false
	}
	ti, ok := pr.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return auth.Principal{}, false
	}
	cert := ti.State.VerifiedChains[0][0]
	role, ok := roleOfCert(cert, a.o.CertRoles)
	if !ok {
		return auth.Principal{}, false
	}
	return auth.CertPrincipal(cert.Subject.CommonName, role), true
}

func roleOfCert(c *x509.Certificate, m map[string]auth.Role) (auth.Role, bool) {
	if c.Subject.CommonName == "" {
		return "", false
	}
	r, ok := m[c.Subject.CommonName]
	return r, ok
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

// check authenticates a call to a method that is not open, applies the
// rate limit and checks the role table. It returns the principal and the
// API key it used ("" for a client certificate).
func (a *authenticator) check(ctx context.Context, method string) (auth.Principal, string, error) {
	p, token, err := a.authenticate(ctx, method)
	if err != nil {
		return auth.Principal{}, "", err
	}
	if !a.o.Limiter.Allow(p.KeyID) {
		return auth.Principal{}, "", newStatus(codes.ResourceExhausted, ReasonRateLimited,
			"rate limit of this API key exceeded; retry after a backoff", nil)
	}
	if !Allowed(method, p.Role) {
		a.log.InfoContext(ctx, "auth: permission denied", "method", method, "key_id", p.KeyID, "role", string(p.Role))
		return auth.Principal{}, "", newStatus(codes.PermissionDenied, ReasonPermissionDenied,
			fmt.Sprintf("role %s may not call %s", p.Role, method), nil)
	}
	return p, token, nil
}

// authorize returns ctx carrying the call's principal. The tap handler has
// normally done the work before the request body was read; a call it did
// not see is checked here.
func (a *authenticator) authorize(ctx context.Context, method string) (context.Context, error) {
	if isOpen(method) {
		return ctx, nil
	}
	if c := ctlOf(ctx); c != nil && c.authorized {
		return ctx, nil
	}
	p, _, err := a.check(ctx, method)
	if err != nil {
		return nil, err
	}
	return auth.WithPrincipal(ctx, p), nil
}

func (a *authenticator) unary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		ctx, err := a.authorize(ctx, info.FullMethod)
		if err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
}

type principalStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s principalStream) Context() context.Context { return s.ctx }

func (a *authenticator) stream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		ctx, err := a.authorize(ss.Context(), info.FullMethod)
		if err != nil {
			return err
		}
		if c := ctlOf(ctx); c != nil && c.token != "" {
			// A long stream: end it when its key is revoked.
			return a.watchRevocation(srv, principalStream{ServerStream: ss, ctx: ctx}, h, c)
		}
		return h(srv, principalStream{ServerStream: ss, ctx: ctx})
	}
}
