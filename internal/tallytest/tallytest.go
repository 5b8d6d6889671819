// Package tallytest runs a real Tally for tests: the real gRPC server on a
// 127.0.0.1 port, over a real PostgreSQL database and (optionally) a real
// Redis. Nothing is mocked.
package tallytest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
	"github.com/tallyledger/tally/topup"
)

// RedisURL is the shared test Redis: $TALLY_TEST_REDIS_URL or the local default.
func RedisURL() string {
	if u := os.Getenv("TALLY_TEST_REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

// DBOptions returns testdb options whose template is migrated with Tally's
// schema and named after the migrations, so a schema change rebuilds it.
func DBOptions() testdb.Options {
	return testdb.Options{
		Migrate:      store.Migrate,
		TemplateName: "tally_template_" + store.MigrationsFingerprint(),
	}
}

// Options configures Start.
type Options struct {
	DatabaseURL string
	// RedisURL enables the cache; "" runs without one.
	RedisURL string
	// KeyPrefix isolates this env's cache keys in a shared Redis (default: random).
	KeyPrefix       string
	CacheTTL        time.Duration
	CacheOpTimeout  time.Duration
	FailuresMax     int
	BreakerCooldown time.Duration
	// CacheProbeInterval is the cache's probe interval (default
	// cache.ProbeIntervalDefault; negative: no probe).
	CacheProbeInterval time.Duration
	Limits             ledger.Limits
	// UsageDimensions are the metadata keys of spend breakdowns (tallyd
	// --usage-dimensions).
	UsageDimensions []string
	// ClientPolicy overrides the client's retry policy.
	ClientPolicy client.Policy
	// PoolConnsMax overrides the store's pool size.
	PoolConnsMax int32
	// Pooler is store.Config.Pooler (tallyd --database-pooler): what
	// DatabaseURL reaches.
	Pooler string
	// Batch configures group commit.
	Batch ledger.BatchConfig

	// NoAuth serves without authentication (tallyd --insecure-no-auth).
	// By default authentication is on: Start creates an admin client and
	// key, and Env.Client uses it.
	NoAuth bool
	// AuthCacheTTL is the verifier's cache TTL (default auth.CacheTTLDefault).
	AuthCacheTTL time.Duration
	// AuthTouchInterval is how often last_used_at is flushed.
	AuthTouchInterval time.Duration
	// RateLimitPerKey and RateBurstPerKey set the per-key rate limit
	// (0: no limit).
	RateLimitPerKey float64
	RateBurstPerKey int
	// ServerTLS, when set, serves TLS with this config; ClientDialOptions
	// then must give Env.Client matching transport credentials.
	ServerTLS *tls.Config
	// CertRoles maps client certificate common names to roles (mTLS).
	CertRoles map[string]auth.Role
	// ClientDialOptions replace the default client transport (plaintext).
	ClientDialOptions []grpc.DialOption
	// LogWriter receives the server's logs (default: stderr, errors only).
	LogWriter io.Writer
	// Server adjusts the gRPC server's options (limits) before it starts.
	Server func(*api.ServerOptions)
	// TopUp configures auto top-up in the ledger (Provider "" refuses
	// rules). Running the jobs needs a top-up worker (package topup).
	TopUp ledger.TopUpConfig
	// TopUpWorker, when set, runs top-up workers (its Ledger and Store are
	// filled in; Provider is required).
	TopUpWorker *topup.Config
}

// Env is a running Tally.
type Env struct {
	Addr   string
	Client *client.Client
	Raw    tallyv1.LedgerServiceClient
	Store  *store.Store
	Cache  *cache.Cache
	Ledger *ledger.Ledger
	// KeyPrefix is the cache key prefix in use.
	KeyPrefix string
	// AdminKey is the admin API key Client uses ("" with NoAuth).
	AdminKey string
	// Verifier checks keys (nil with NoAuth).
	Verifier *auth.Verifier
	// Limiter is the per-key rate limiter (nil: none).
	Limiter *auth.Limiter
	// TopUps are the running top-up workers (nil unless Options.TopUpWorker).
	TopUps *topup.Service

	policy      client.Policy
	dialOptions []grpc.DialOption
}

// RandomSuffix returns a short random hex string.
func RandomSuffix() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Start runs a Tally server for the test and stops it at cleanup.
func Start(t testing.TB, o Options) *Env {
	t.Helper()
	ctx := context.Background()
	var log *slog.Logger
	if o.LogWriter != nil {
		log = slog.New(slog.NewJSONHandler(o.LogWriter, &slog.HandlerOptions{Level: slog.LevelDebug}))
	} else {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	}
	st, err := store.Open(ctx, store.Config{URL: o.DatabaseURL, Logger: log, PoolConnsMax: o.PoolConnsMax, Pooler: o.Pooler})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(st.Close)
	env := &Env{Store: st}
	lcfg := ledger.Config{Store: st, Logger: log, Limits: o.Limits, UsageDimensions: o.UsageDimensions}
	if o.RedisURL != "" {
		if o.KeyPrefix == "" {
			o.KeyPrefix = "tallytest:" + RandomSuffix() + ":"
		}
		c, err := cache.New(cache.Config{
			URL: o.RedisURL, KeyPrefix: o.KeyPrefix, TTL: o.CacheTTL, OpTimeout: o.CacheOpTimeout,
			FailuresMax: o.FailuresMax, BreakerCooldown: o.BreakerCooldown, ProbeInterval: o.CacheProbeInterval, Logger: log,
		})
		if err != nil {
			t.Fatalf("cache.New: %v", err)
		}
		t.Cleanup(func() { _ = c.Close() })
		env.Cache = c
		env.KeyPrefix = o.KeyPrefix
		lcfg.Cache = c
	}
	lcfg.Batch = o.Batch
	lcfg.TopUp = o.TopUp
	if lcfg.TopUp.Queue == "" {
		// Tests share a database: each server works only its own jobs.
		lcfg.TopUp.Queue = "tally_topup_" + RandomSuffix()
	}
	env.Ledger = ledger.New(lcfg)
	t.Cleanup(env.Ledger.Close) // runs after the server stops (cleanups are LIFO)
	if o.TopUpWorker != nil {
		wc := *o.TopUpWorker
		wc.Ledger, wc.Store, wc.Logger = env.Ledger, st, log
		svc, err := topup.Start(ctx, wc)
		if err != nil {
			t.Fatalf("topup.Start: %v", err)
		}
		env.TopUps = svc
		t.Cleanup(func() {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = svc.Stop(sctx)
		})
	}
	sopts := api.ServerOptions{Logger: log}
	if !o.NoAuth {
		env.Verifier = auth.NewVerifier(auth.VerifierConfig{Store: st, CacheTTL: o.AuthCacheTTL, TouchInterval: o.AuthTouchInterval, Logger: log})
		t.Cleanup(env.Verifier.Close)
		env.Limiter = auth.NewLimiter(o.RateLimitPerKey, o.RateBurstPerKey)
		sopts.Auth = &api.AuthOptions{Verifier: env.Verifier, CertRoles: o.CertRoles, Limiter: env.Limiter}
		created, err := auth.CreateKey(ctx, st, "tallytest-admin-"+RandomSuffix(), auth.RoleAdmin, "")
		if err != nil {
			t.Fatalf("create admin key: %v", err)
		}
		env.AdminKey = created.Key.String()
	}
	if o.ServerTLS != nil {
		sopts.Creds = credentials.NewTLS(o.ServerTLS)
	}
	if o.Server != nil {
		o.Server(&sopts)
	}
	gs := api.NewGRPCServer(env.Ledger, health.NewServer(), sopts)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	glis := api.LimitConnections(lis, sopts.ConnectionsMax)
	go func() { _ = gs.Serve(glis) }()
	t.Cleanup(gs.Stop)
	env.Addr = lis.Addr().String()
	env.policy, env.dialOptions = o.ClientPolicy, o.ClientDialOptions
	env.Client = env.Dial(t, env.AdminKey)
	env.Raw = env.Client.Raw()
	return env
}

// Dial returns a client of this env that sends key ("" sends none), with
// extra dial options (for example TLS credentials) replacing the env's.
func (e *Env) Dial(t testing.TB, key string, opts ...grpc.DialOption) *client.Client {
	t.Helper()
	if len(opts) == 0 {
		opts = e.dialOptions
	}
	cl, err := client.New(client.Config{Addr: e.Addr, APIKey: key, Policy: e.policy, DialOptions: opts})
	if err != nil {
		t.Fatalf("client.New: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// NewKey creates a key for a new client of the given role (clientName ""),
// or another key of an existing client.
func (e *Env) NewKey(t testing.TB, role auth.Role, clientName string) auth.Created {
	t.Helper()
	name := "tallytest-" + string(role) + "-" + RandomSuffix()
	if clientName != "" {
		role = ""
	}
	c, err := auth.CreateKey(context.Background(), e.Store, name, role, clientName)
	if err != nil {
		t.Fatalf("create key: %v", err)
	}
	return c
}

// Counts are row counts of the money tables, to prove a call changed nothing.
type Counts struct{ Accounts, Transfers, Entries, Keys int64 }

// Count returns the current row counts.
func (e *Env) Count(t testing.TB) Counts {
	t.Helper()
	var c Counts
	err := e.Store.Pool().QueryRow(context.Background(), `SELECT
		(SELECT count(*) FROM accounts), (SELECT count(*) FROM transfers),
		(SELECT count(*) FROM entries), (SELECT count(*) FROM idempotency_keys)`).
		Scan(&c.Accounts, &c.Transfers, &c.Entries, &c.Keys)
	if err != nil {
		t.Fatalf("count: %v", err)
	}
	return c
}

// CheckBooks asserts the ledger's global invariants: every account's balance
// equals the sum of its entries, sequences are gapless with correct running
// balances, and per currency all balances sum to zero.
func (e *Env) CheckBooks(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	var bad int64
	err := e.Store.Pool().QueryRow(ctx, `
		WITH s AS (
		  SELECT account_id, sequence, balance_after, version_after,
		         sum(amount) OVER (PARTITION BY account_id ORDER BY sequence) AS running,
		         row_number() OVER (PARTITION BY account_id ORDER BY sequence) AS rn
		  FROM entries)
		SELECT count(*) FROM s WHERE running <> balance_after OR rn <> sequence`).Scan(&bad)
	if err != nil || bad != 0 {
		t.Fatalf("entries: %d rows with a wrong running balance or a sequence gap (err %v)", bad, err)
	}
	err = e.Store.Pool().QueryRow(ctx, `
		SELECT count(*) FROM accounts a
		LEFT JOIN LATERAL (SELECT coalesce(sum(amount), 0) AS s, count(*) AS n FROM entries e WHERE e.account_id = a.account_id) x ON true
		WHERE a.balance <> x.s OR a.last_sequence <> x.n`).Scan(&bad)
	if err != nil || bad != 0 {
		t.Fatalf("accounts: %d balances differ from their entries (err %v)", bad, err)
	}
	err = e.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM (SELECT currency FROM accounts GROUP BY currency HAVING sum(balance) <> 0) x`).Scan(&bad)
	if err != nil || bad != 0 {
		t.Fatalf("%d currencies whose balances do not sum to zero (err %v)", bad, err)
	}
	err = e.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM transfers t
		WHERE (SELECT count(*) FROM entries e WHERE e.transfer_id = t.transfer_id) <> 2
		   OR (SELECT sum(amount) FROM entries e WHERE e.transfer_id = t.transfer_id) <> 0`).Scan(&bad)
	if err != nil || bad != 0 {
		t.Fatalf("%d transfers without exactly two entries summing to zero (err %v)", bad, err)
	}
}

// PgBouncerStartMax bounds StartPgBouncer.
const PgBouncerStartMax = 30 * time.Second

// StartPgBouncer runs a PgBouncer in transaction pooling mode with
// poolSize server connections (extra: more [pgbouncer] settings) in front
// of the server of dbURL, closed when the test ends, and returns it with
// dbURL's database through it.
func StartPgBouncer(t testing.TB, dbURL string, poolSize int, extra map[string]string) (*localsvc.PgBouncer, string) {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), PgBouncerStartMax)
	defer cancel()
	b, err := localsvc.StartPgBouncer(ctx, localsvc.PgBouncerOptions{
		Target: u.Host, PoolMode: "transaction", DefaultPoolSize: poolSize, ExtraConf: extra,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b, b.URL(strings.TrimPrefix(u.Path, "/"))
}
