// Package tallytest runs a real Tally for tests: the real gRPC server on a
// 127.0.0.1 port, over a real PostgreSQL database and (optionally) a real
// Redis. Nothing is mocked.
package tallytest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc/health"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
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
	Limits          ledger.Limits
	// ClientPolicy overrides the client's retry policy.
	ClientPolicy client.Policy
	// PoolConnsMax overrides the store's pool size.
	PoolConnsMax int32
	// Batch configures group commit.
	Batch ledger.BatchConfig
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
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	st, err := store.Open(ctx, store.Config{URL: o.DatabaseURL, Logger: log, PoolConnsMax: o.PoolConnsMax})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(st.Close)
	env := &Env{Store: st}
	lcfg := ledger.Config{Store: st, Logger: log, Limits: o.Limits}
	if o.RedisURL != "" {
		if o.KeyPrefix == "" {
			o.KeyPrefix = "tallytest:" + RandomSuffix() + ":"
		}
		c, err := cache.New(cache.Config{
			URL: o.RedisURL, KeyPrefix: o.KeyPrefix, TTL: o.CacheTTL, OpTimeout: o.CacheOpTimeout,
			FailuresMax: o.FailuresMax, BreakerCooldown: o.BreakerCooldown, Logger: log,
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
	env.Ledger = ledger.New(lcfg)
	t.Cleanup(env.Ledger.Close) // runs after the server stops (cleanups are LIFO)
	gs := api.NewGRPCServer(env.Ledger, health.NewServer(), api.ServerOptions{Logger: log})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	env.Addr = lis.Addr().String()
	cl, err := client.New(client.Config{Addr: env.Addr, Policy: o.ClientPolicy})
	if err != nil {
		t.Fatalf("client.New: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	env.Client = cl
	env.Raw = cl.Raw()
	return env
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
