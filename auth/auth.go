// Package auth is Tally's authentication: clients and their API keys, the
// roles they hold, the principal a call runs as, the in-process validation
// cache, and the per-key rate limiter. It knows nothing of gRPC (package api
// holds the interceptor and the table of which role may call which RPC); it
// talks to PostgreSQL only through package store.
package auth

import (
	"context"
	"fmt"
	"strings"

	"github.com/google/uuid"
)

// Role is what a client may do. The api package maps each RPC to the roles
// allowed to call it.
type Role string

// Roles.
const (
	// RoleCharger is a product service: it charges and reads its own outcomes.
	RoleCharger Role = "charger"
	// RoleViewer is support staff who look.
	RoleViewer Role = "viewer"
	// RoleSupport is support staff who act.
	RoleSupport Role = "support"
	// RoleReconciler is a reconciliation job.
	RoleReconciler Role = "reconciler"
	// RoleAdmin may do everything.
	RoleAdmin Role = "admin"
)

// Roles lists every role, least powerful first.
var Roles = []Role{RoleCharger, RoleViewer, RoleSupport, RoleReconciler, RoleAdmin}

// ParseRole returns the role named s.
func ParseRole(s string) (Role, error) {
	for _, r := range Roles {
		if string(r) == s {
			return r, nil
		}
	}
	names := make([]string, len(Roles))
	for i, r := range Roles {
		names[i] = string(r)
	}
	return "", fmt.Errorf("unknown role %q (one of %s)", s, strings.Join(names, ", "))
}

// Principal is who a call runs as.
type Principal struct {
	// ClientID is the caller's client: its idempotency scope and the
	// created_by_client of what it writes.
	ClientID uuid.UUID
	// KeyID is the API key id, or "tls:CN=<name>" for a caller authenticated
	// by a mapped client certificate.
	KeyID string
	Role  Role
}

// Scope is the principal's idempotency scope: its client id as text.
func (p Principal) Scope() string { return p.ClientID.String() }

type principalKey struct{}

// WithPrincipal returns ctx carrying p.
func WithPrincipal(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// FromContext returns the principal of the call, if it was authenticated.
func FromContext(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(Principal)
	return p, ok
}

// certNamespace derives stable client ids for certificate principals.
var certNamespace = uuid.MustParse("6f1d2b0e-7f7a-4c55-9a43-2f0b8d1c9e10")

// CertPrincipal is the principal of a caller whose verified client
// certificate has the subject common name cn, mapped to role. Its client id
// is derived from cn, so it is the same on every tallyd and every restart.
func CertPrincipal(cn string, role Role) Principal {
	return Principal{ClientID: uuid.NewSHA1(certNamespace, []byte("tls-cn:"+cn)), KeyID: "tls:CN=" + cn, Role: role}
}
