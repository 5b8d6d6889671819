// Package console is the support console tallyd serves on --console-addr:
// server-rendered HTML (html/template, assets embedded, no JavaScript, no
// framework, no CDN) for support staff to find a customer, read its
// balance, holds and statement, look up a transfer, and freeze or unfreeze
// an account.
//
// The console holds no rules of its own about who may do what: every page
// reads and writes through tallyd's own gRPC API with the signed-in key, so
// the API's one role table (api.MethodRoles), its validation and its audit
// trail apply unchanged. The console only asks the same table (api.Allowed)
// whether to show a control. An API key is exchanged at sign-in for a
// server-side session (a random id in an HttpOnly, SameSite=Strict cookie,
// Secure under TLS); the key never appears in a URL, a page or a log, and
// every page re-checks it (through the verifier's cache), so revoking it
// ends its sessions within --auth-cache-ttl.
package console

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/tallyledger/tally/auth"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Defaults of the console's limits; each has a tallyd flag (--console-…).
const (
	// SessionTTLDefault is how long a session lasts after sign-in
	// (--console-session-ttl).
	SessionTTLDefault = 8 * time.Hour
	// SessionsMaxDefault bounds the live sessions (--console-sessions-max);
	// a sign-in past it is refused until sessions expire.
	SessionsMaxDefault = 10_000
	// SearchBytesMaxDefault bounds a search term (--console-search-bytes-max).
	SearchBytesMaxDefault = 256
	// ReasonBytesMaxDefault bounds a freeze or unfreeze reason
	// (--console-reason-bytes-max).
	ReasonBytesMaxDefault = 500
	// PageSizeDefault is the statement lines per page
	// (--console-page-size); the server's --page-size-max still applies.
	PageSizeDefault = 50
	// FormBytesMaxDefault bounds a request body (--console-form-bytes-max).
	FormBytesMaxDefault = 16 << 10
	// DownloadLinesMaxDefault bounds the lines of a CSV or PDF download
	// (--console-download-lines-max).
	DownloadLinesMaxDefault = 100_000
	// CallTimeout bounds each page's calls to the API.
	CallTimeout = 30 * time.Second
)

// Limits are the console's bounds; zero fields take the defaults.
type Limits struct {
	SessionTTL       time.Duration
	SessionsMax      int
	SearchBytesMax   int
	ReasonBytesMax   int
	PageSize         int
	FormBytesMax     int
	DownloadLinesMax int
}

func (l *Limits) fill() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	if l.SessionTTL <= 0 {
		l.SessionTTL = SessionTTLDefault
	}
	def(&l.SessionsMax, SessionsMaxDefault)
	def(&l.SearchBytesMax, SearchBytesMaxDefault)
	def(&l.ReasonBytesMax, ReasonBytesMaxDefault)
	def(&l.PageSize, PageSizeDefault)
	def(&l.FormBytesMax, FormBytesMaxDefault)
	def(&l.DownloadLinesMax, DownloadLinesMaxDefault)
}

// Config configures a console.
type Config struct {
	// Conn reaches tallyd's gRPC API (the console adds the session's key
	// to every call).
	Conn grpc.ClientConnInterface
	// Verify checks an API key as the API does (auth.Verifier.Verify).
	Verify func(ctx context.Context, key string) (auth.Principal, error)
	Logger *slog.Logger
	Limits Limits
	// Now is the clock (tests); nil: time.Now.
	Now func() time.Time
}

// Console serves the support console.
type Console struct {
	api      tallyv1.LedgerServiceClient
	verify   func(ctx context.Context, key string) (auth.Principal, error)
	log      *slog.Logger
	limits   Limits
	now      func() time.Time
	sessions *sessions
	pages    *pages
}

// New returns a console.
func New(cfg Config) *Console {
	if cfg.Conn == nil || cfg.Verify == nil {
		panic("console: Conn and Verify are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.Limits.fill()
	c := &Console{api: tallyv1.NewLedgerServiceClient(cfg.Conn), verify: cfg.Verify, log: cfg.Logger,
		limits: cfg.Limits, now: cfg.Now, pages: mustParsePages()}
	c.sessions = newSessions(cfg.Limits.SessionsMax, cfg.Limits.SessionTTL, cfg.Now)
	return c
}

// Handler returns the console's HTTP handler.
func (c *Console) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(staticFS())))
	mux.HandleFunc("GET /signin", c.signInPage)
	mux.HandleFunc("POST /signin", c.signIn)
	mux.HandleFunc("POST /signout", c.authed(c.signOut))
	mux.HandleFunc("GET /{$}", c.authed(c.home))
	mux.HandleFunc("GET /search", c.authed(c.search))
	mux.HandleFunc("GET /accounts/{id}", c.authed(c.account))
	mux.HandleFunc("GET /accounts/{id}/statement.csv", c.authed(c.statementCSV))
	mux.HandleFunc("GET /accounts/{id}/statement.pdf", c.authed(c.statementPDF))
	mux.HandleFunc("POST /accounts/{id}/status", c.authed(c.changeStatus))
	mux.HandleFunc("GET /transfers/{id}", c.authed(c.transfer))
	mux.HandleFunc("GET /holds/{id}", c.authed(c.hold))
	return securityHeaders(http.MaxBytesHandler(mux, int64(c.limits.FormBytesMax)))
}

// call returns a context for an API call made with the session's key.
func (c *Console) call(r *http.Request, s *session) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(r.Context(), CallTimeout)
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+s.key), cancel
}

// securityHeaders sends the headers every console response carries: a
// strict Content-Security-Policy (own styles and images only, no scripts,
// forms only to the console, no framing), no framing, no referrer, no
// sniffing, no caching.
func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "+
			"frame-ancestors 'none'; base-uri 'none'")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Cache-Control", "no-store")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		next.ServeHTTP(w, r)
	})
}
