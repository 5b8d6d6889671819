package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/flagenv"
	"github.com/tallyledger/tally/internal/telemetry"
	"github.com/tallyledger/tally/ledger"
	"github.com/tallyledger/tally/store"
	"github.com/tallyledger/tally/topup"
)

// serveConfig holds every flag of `tallyd serve` (and `tallyd dev`).
type serveConfig struct {
	databaseURL           string
	databasePooler        poolerFlag
	redisURL              string
	grpcAddr              string
	httpAddr              string
	migrate               bool
	allowUnsafeDurability bool
	requireSyncCommit     bool
	logLevel              string
	logFormat             string

	poolConnsMax     int
	statementTimeout time.Duration
	connectTimeout   time.Duration
	startupTimeout   time.Duration
	drainTimeout     time.Duration

	cacheTTL             time.Duration
	cacheOpTimeout       time.Duration
	cacheFailuresMax     int
	cacheBreakerCooldown time.Duration
	cacheProbeInterval   time.Duration

	msgBytesMax        int
	callTimeoutDefault time.Duration
	streamsMax         uint
	// Limits against hostile clients.
	connectionsMax                                       int
	unauthenticatedMsgBytesMax                           int
	requestWaitMax, authWaitMax                          time.Duration
	exportFollowStreamsPerKeyMax, exportFollowStreamsMax int

	headerBytesMax   uint
	keepaliveTime    time.Duration
	keepaliveTimeout time.Duration
	keepaliveMinTime time.Duration

	limits ledger.Limits
	// submitBatchBytesMax bounds one SubmitBatch request.
	submitBatchBytesMax int
	// holdSweepInterval is how often the sweeper writes down expired holds.
	holdSweepInterval time.Duration
	// exportPollInterval and exportStreamDurationMax tune feed streams.
	exportPollInterval, exportStreamDurationMax time.Duration
	// usageDimensions is the comma-separated --usage-dimensions.
	usageDimensions string
	systemShards    int
	accountFactsMax int
	batch           ledger.BatchConfig
	pprof           bool

	// Authentication and transport security.
	insecureNoAuth    bool
	authCacheTTL      time.Duration
	authTouchInterval time.Duration
	reflection        bool
	tlsCert           string
	tlsKey            string
	tlsClientCA       string
	tlsClientRoleMap  string
	insecure          bool
	rateLimitPerKey   float64
	rateBurstPerKey   int

	// Tracing (off without an endpoint).
	otlpEndpoint     string
	traceSampleRatio float64

	// Auto top-up.
	topup        ledger.TopUpConfig
	topupWorkers topup.Config
	stripe       topup.StripeConfig
	// The support console (off without --console-addr).
	console consoleConfig
	// consoleStarted, when set, learns the console's URL once it serves.
	consoleStarted func(url string)
}

func (c *serveConfig) register(fs *flag.FlagSet, withURLs bool) {
	if withURLs {
		fs.StringVar(&c.databaseURL, "database-url", "", "PostgreSQL connection URL (required)")
		c.databasePooler.register(fs)
		fs.StringVar(&c.redisURL, "redis-url", "", "Redis for the balance cache: redis://host:port/db (one node), redis-sentinel://s1:26379,s2:26379/MASTER (Sentinel group) or redis-cluster://n1:6379,n2:6379 (Cluster); empty runs without a cache")
		fs.BoolVar(&c.migrate, "migrate", false, "apply pending migrations before serving")
	}
	fs.StringVar(&c.grpcAddr, "grpc-addr", "127.0.0.1:7070", "gRPC listen address")
	fs.StringVar(&c.httpAddr, "http-addr", "127.0.0.1:7071", "HTTP listen address for /healthz, /readyz and /metrics")
	fs.BoolVar(&c.allowUnsafeDurability, "allow-unsafe-durability", false, "serve even if PostgreSQL has synchronous_commit or fsync off")
	fs.BoolVar(&c.requireSyncCommit, "require-synchronous-commit", false, "refuse to start unless PostgreSQL waits for a synchronous standby on commit (synchronous_standby_names set, synchronous_commit on or remote_apply), so a failover cannot lose an acknowledged charge")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.logFormat, "log-format", "json", "log format: json or text")
	fs.IntVar(&c.poolConnsMax, "pool-conns-max", store.PoolConnsMaxDefault, "PostgreSQL connections per process")
	fs.DurationVar(&c.statementTimeout, "statement-timeout", store.StatementTimeoutDefault, "PostgreSQL statement_timeout (idle_in_transaction_session_timeout is twice it) of tallyd's sessions; behind --database-pooler transaction, of each of its transactions (SET LOCAL), statements outside one getting the role's default")
	fs.DurationVar(&c.connectTimeout, "connect-timeout", store.ConnectTimeoutDefault, "PostgreSQL connect timeout")
	fs.DurationVar(&c.startupTimeout, "startup-timeout", 60*time.Second, "how long to wait for PostgreSQL at startup")
	fs.DurationVar(&c.drainTimeout, "drain-timeout", 15*time.Second, "on SIGTERM, how long in-flight calls may finish")
	fs.DurationVar(&c.cacheTTL, "cache-ttl", 60*time.Second, "TTL of cached balances (the most a cached read can lag)")
	fs.DurationVar(&c.cacheOpTimeout, "cache-op-timeout", 50*time.Millisecond, "timeout of each Redis call")
	fs.IntVar(&c.cacheFailuresMax, "cache-failures-max", 5, "consecutive Redis failures before the cache is bypassed")
	fs.DurationVar(&c.cacheBreakerCooldown, "cache-breaker-cooldown", 5*time.Second, "how long the cache is bypassed after failures")
	fs.DurationVar(&c.cacheProbeInterval, "cache-probe-interval", cache.ProbeIntervalDefault, "how often this process writes its own probe key to Redis: a Redis that stops taking writes (read-only, full) stops cached reads within about this plus --cache-op-timeout, even in a process that writes nothing else")
	fs.IntVar(&c.msgBytesMax, "msg-bytes-max", api.MsgBytesMaxDefault, "largest gRPC message accepted or sent")
	fs.DurationVar(&c.callTimeoutDefault, "call-timeout-default", api.CallTimeoutDefault, "deadline for calls that arrive without one")
	fs.UintVar(&c.streamsMax, "streams-max", api.StreamsMaxDefault, "concurrent gRPC streams per connection (a client queues calls over it)")
	fs.IntVar(&c.connectionsMax, "connections-max", api.ConnectionsMaxDefault, "concurrent gRPC client connections; one over it is closed at once (the client retries)")
	fs.IntVar(&c.unauthenticatedMsgBytesMax, "unauthenticated-msg-bytes-max", api.UnauthenticatedMsgBytesMaxDefault, "largest request message of the calls open without credentials (health, reflection); every other call is authenticated from its headers, before its body is read")
	fs.DurationVar(&c.requestWaitMax, "request-wait-max", api.RequestWaitMaxDefault, "longest wait from a call's headers to its whole request message, and for a new connection's handshake; a stream that sends headers and no message is closed after it")
	fs.DurationVar(&c.authWaitMax, "auth-wait-max", api.AuthWaitMaxDefault, "longest a key not in the auth cache may be checked before the call is answered UNAVAILABLE (the check runs before the request body is read)")
	fs.IntVar(&c.exportFollowStreamsPerKeyMax, "export-follow-streams-per-key-max", api.ExportFollowStreamsPerKeyMaxDefault, "following ExportTransfers streams per API key; more are RESOURCE_EXHAUSTED")
	fs.IntVar(&c.exportFollowStreamsMax, "export-follow-streams-max", api.ExportFollowStreamsMaxDefault, "following ExportTransfers streams per server; more are RESOURCE_EXHAUSTED")
	fs.UintVar(&c.headerBytesMax, "header-bytes-max", api.HeaderBytesMaxDefault, "largest gRPC metadata (headers) accepted per call")
	fs.DurationVar(&c.keepaliveTime, "keepalive-time", api.KeepaliveTimeDefault, "ping a connection idle this long")
	fs.DurationVar(&c.keepaliveTimeout, "keepalive-timeout", api.KeepaliveTimeoutDefault, "close a connection whose keepalive ping is not answered within this time")
	fs.DurationVar(&c.keepaliveMinTime, "keepalive-min-time", api.KeepaliveMinTimeDefault, "disconnect clients that ping more often than this")
	fs.BoolVar(&c.insecureNoAuth, "insecure-no-auth", false, "serve WITHOUT authentication: any caller that reaches the port may move money (tests and trusted networks only)")
	fs.DurationVar(&c.authCacheTTL, "auth-cache-ttl", auth.CacheTTLDefault, "how long a validated API key is trusted without asking PostgreSQL: a revoked key stops working within this time")
	fs.DurationVar(&c.authTouchInterval, "auth-touch-interval", auth.TouchIntervalDefault, "how often keys' last_used_at is written (batched)")
	fs.BoolVar(&c.reflection, "reflection", true, "serve gRPC server reflection (open to every caller; it reveals only the API's schema)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM certificate (chain) to serve TLS with")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&c.tlsClientCA, "tls-client-ca", "", "PEM CA bundle: require client certificates signed by it (mTLS)")
	fs.StringVar(&c.tlsClientRoleMap, "tls-client-role-map", "", "map client certificate subjects to roles, e.g. CN=recon-job:reconciler,CN=ops:admin; a mapped certificate needs no API key")
	fs.BoolVar(&c.insecure, "insecure", false, "allow plaintext gRPC on a non-loopback --grpc-addr (behind a trusted network or a TLS-terminating proxy)")
	fs.Float64Var(&c.rateLimitPerKey, "rate-limit-per-key", auth.RateLimitPerKeyDefault, "requests per second per API key (token bucket; 0 = no limit)")
	fs.IntVar(&c.rateBurstPerKey, "rate-burst-per-key", auth.RateBurstPerKeyDefault, "burst size of the per-key token bucket")
	fs.IntVar(&c.batch.ItemsMax, "batch-items-max", ledger.BatchItemsMaxDefault, "most calls group-committed in one transaction (1 disables batching)")
	fs.DurationVar(&c.batch.WaitMax, "batch-wait-max", ledger.BatchWaitMaxDefault, "how long a batch waits for more calls after its first")
	fs.IntVar(&c.batch.WorkersMax, "batch-workers-max", ledger.BatchWorkersMaxDefault, "group committers (each commits one batch at a time, to its own system-account shard)")
	fs.IntVar(&c.systemShards, "system-shards", ledger.SystemShardsDefault, "shards per REVENUE and FUNDING account (its own row included); raising it adds shards online")
	fs.IntVar(&c.accountFactsMax, "account-facts-max", ledger.AccountFactsMaxDefault, "accounts whose unchanging facts are kept in memory for planning locks")
	fs.IntVar(&c.batch.QueueItemsMax, "batch-queue-items-max", ledger.BatchQueueItemsMaxDefault, "calls waiting for a batch before RESOURCE_EXHAUSTED")
	fs.DurationVar(&c.batch.Timeout, "batch-timeout", ledger.BatchTimeoutDefault, "bound on one batch's transaction")
	fs.StringVar(&c.otlpEndpoint, "otlp-endpoint", "", "OpenTelemetry collector (OTLP/gRPC) to send traces to: http://host:4317 (plaintext), https://host:4317 (TLS), or host:port (plaintext on loopback, else TLS); empty: no tracing")
	fs.Float64Var(&c.traceSampleRatio, "trace-sample-ratio", 1, "fraction of calls traced when --otlp-endpoint is set (0..1; calls with a sampled parent are always traced)")
	fs.BoolVar(&c.pprof, "pprof", false, "serve net/http/pprof under /debug/pprof/ on --http-addr (for profiling)")
	d := ledger.DefaultLimits()
	c.limits = d
	fs.IntVar(&c.limits.PageSizeMax, "page-size-max", d.PageSizeMax, "largest page_size accepted")
	fs.IntVar(&c.limits.PageSizeDefault, "page-size-default", d.PageSizeDefault, "page_size when none is given")
	fs.IntVar(&c.limits.MetadataKeysMax, "metadata-keys-max", d.MetadataKeysMax, "most metadata keys per request")
	fs.IntVar(&c.limits.MetadataKeyBytesMax, "metadata-key-bytes-max", d.MetadataKeyBytesMax, "longest metadata key")
	fs.IntVar(&c.limits.MetadataValueBytesMax, "metadata-value-bytes-max", d.MetadataValueBytesMax, "longest metadata value")
	fs.IntVar(&c.limits.DescriptionBytesMax, "description-bytes-max", d.DescriptionBytesMax, "longest description")
	fs.DurationVar(&c.limits.HoldExpiryDefault, "hold-expiry-default", d.HoldExpiryDefault, "lifetime of a hold that sets no expiry")
	fs.DurationVar(&c.limits.HoldExpiryMax, "hold-expiry-max", d.HoldExpiryMax, "longest hold lifetime accepted")
	fs.IntVar(&c.limits.SubmitBatchItemsMax, "submit-batch-items-max", d.SubmitBatchItemsMax, "most operations in one SubmitBatch")
	fs.IntVar(&c.submitBatchBytesMax, "submit-batch-bytes-max", api.SubmitBatchBytesMaxDefault, "largest SubmitBatch request in bytes (keep below --msg-bytes-max)")
	fs.IntVar(&c.limits.BalancesAccountsMax, "balances-accounts-max", d.BalancesAccountsMax, "most accounts in one GetBalances")
	fs.IntVar(&c.limits.BatchReplyBytesMax, "batch-reply-bytes-max", d.BatchReplyBytesMax, "largest SubmitBatch reply in bytes (estimated before commit; a batch whose reply could be larger is refused with BATCH_REPLY_TOO_LARGE; at most --msg-bytes-max)")
	fs.IntVar(&c.limits.PageBytesMax, "page-bytes-max", d.PageBytesMax, "largest page of FindAccounts or ListEntries, and GetBalances reply, in bytes (a page ends early with a next token; at most --msg-bytes-max)")
	fs.DurationVar(&c.limits.ReconcileStatementTimeout, "reconcile-statement-timeout", d.ReconcileStatementTimeout, "statement timeout of each ledger-wide reconcile check (they read whole tables)")
	fs.DurationVar(&c.limits.HistorySettleWindow, "history-settle-window", d.HistorySettleWindow, "a balance at an instant closer to now than this is not final (must exceed --batch-timeout)")
	fs.DurationVar(&c.exportPollInterval, "export-poll-interval", api.ExportPollIntervalDefault, "how often the server's one feed watcher looks for new events while a following ExportTransfers stream is caught up")
	fs.DurationVar(&c.exportStreamDurationMax, "export-stream-duration-max", api.ExportStreamDurationMaxDefault, "longest following ExportTransfers stream (clients resume from their cursor)")
	fs.StringVar(&c.usageDimensions, "usage-dimensions", "", "up to three charge metadata keys that spend breakdowns (SummarizeUsage) group by, e.g. product,team,sku")
	fs.IntVar(&c.limits.UsageRowsMax, "usage-rows-max", d.UsageRowsMax, "most rows of one SummarizeUsage answer")
	fs.IntVar(&c.limits.UsageRangeDaysMax, "usage-range-days-max", d.UsageRangeDaysMax, "longest SummarizeUsage range in days")
	fs.DurationVar(&c.holdSweepInterval, "hold-sweep-interval", 30*time.Second, "how often expired holds are written down (0: never; reads never need it)")
	c.console.register(fs)
	c.registerTopUp(fs)
}

func (c *serveConfig) registerTopUp(fs *flag.FlagSet) {
	fs.StringVar(&c.topup.Provider, "topup-provider", "", "payment provider of auto top-up: stripe; empty: none (SetAutoTopUp is refused)")
	fs.StringVar(&c.stripe.APIKey, "stripe-api-key", "", "Stripe secret key (sk_...) for --topup-provider stripe")
	fs.StringVar(&c.stripe.URL, "stripe-api-url", topup.StripeAPIURLDefault, "Stripe API base URL (tests point it at a local Stripe-compatible server)")
	fs.DurationVar(&c.stripe.Timeout, "stripe-timeout", topup.StripeTimeoutDefault, "bound on one call to Stripe; a call cut by it has an unknown outcome and is looked up before any retry")
	fs.IntVar(&c.topupWorkers.WorkersMax, "topup-workers-max", topup.WorkersMaxDefault, "top-up jobs this process works at once (River workers)")
	fs.IntVar(&c.topup.AttemptsMax, "topup-attempts-max", ledger.TopUpAttemptsMaxDefault, "attempts of one top-up job; after the last, a top-up whose outcome is unknown stays PENDING for a person (tally_topup_unresolved_total)")
	fs.IntVar(&c.topup.FailuresMax, "topup-failures-max", ledger.TopUpFailuresMaxDefault, "consecutive declined top-ups after which a rule is disabled")
	fs.Int64Var(&c.topup.ValueMax, "topup-value-max", ledger.TopUpValueMaxDefault, "largest threshold, target_balance, amount_max and per_day_max of a rule")
	fs.DurationVar(&c.topupWorkers.RetryBackoff, "topup-retry-backoff", topup.RetryBackoffDefault, "delay before a top-up job's first retry; it doubles per attempt")
	fs.DurationVar(&c.topupWorkers.RetryBackoffMax, "topup-retry-backoff-max", topup.RetryBackoffMaxDefault, "longest delay between a top-up job's attempts")
	fs.DurationVar(&c.topupWorkers.JobTimeout, "topup-job-timeout", topup.JobTimeoutDefault, "bound on one attempt of a top-up job")
	fs.DurationVar(&c.topupWorkers.PollInterval, "topup-poll-interval", topup.PollIntervalDefault, "how often top-up workers look for new jobs behind --database-pooler transaction, where River cannot LISTEN")
	fs.DurationVar(&c.topupWorkers.RescueAfter, "topup-rescue-after", topup.RescueAfterDefault, "a top-up job running this long (its tallyd died) is retried by another worker; more than --topup-job-timeout")
}

// startTopUps starts the top-up workers when a provider is configured.
func (c *serveConfig) startTopUps(ctx context.Context, l *ledger.Ledger, st *store.Store, log *slog.Logger) (*topup.Service, error) {
	switch c.topup.Provider {
	case "":
		return nil, nil
	case "stripe":
	default:
		return nil, fmt.Errorf("--topup-provider %q: the only provider is stripe", c.topup.Provider)
	}
	if c.stripe.APIKey == "" {
		return nil, errors.New("--topup-provider stripe needs --stripe-api-key (TALLY_STRIPE_API_KEY)")
	}
	wc := c.topupWorkers
	wc.Ledger, wc.Store, wc.Logger, wc.Provider = l, st, log, topup.NewStripe(c.stripe)
	svc, err := topup.Start(ctx, wc)
	if err != nil {
		return nil, fmt.Errorf("start top-up workers: %w", err)
	}
	log.Info("auto top-up", "provider", c.topup.Provider, "stripe_api_url", c.stripe.URL, "workers", wc.WorkersMax)
	return svc, nil
}

func newLogger(level, format string) *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		lvl = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: lvl}
	if format == "text" {
		return slog.New(slog.NewTextHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts))
}

func newFlagSet(c *serveConfig) *flag.FlagSet {
	fs := flag.NewFlagSet("tallyd serve", flag.ContinueOnError)
	c.register(fs, true)
	return fs
}

func runServe(ctx context.Context, args []string) error {
	var c serveConfig
	fs := newFlagSet(&c)
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	if c.databaseURL == "" {
		return errors.New("--database-url (TALLY_DATABASE_URL) is required")
	}
	return serve(ctx, c, newLogger(c.logLevel, c.logFormat), nil)
}

// newMigrateFlagSet returns the flags of `tallyd migrate`.
func newMigrateFlagSet(url *string) *flag.FlagSet {
	fs := flag.NewFlagSet("tallyd migrate", flag.ContinueOnError)
	fs.StringVar(url, "database-url", "", "PostgreSQL connection URL (required): PostgreSQL itself or a TCP proxy such as HAProxy, never PgBouncer (refused)")
	return fs
}

func runMigrate(ctx context.Context, args []string) error {
	url := new(string)
	fs := newMigrateFlagSet(url)
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	if *url == "" {
		return errors.New("--database-url (TALLY_DATABASE_URL) is required")
	}
	if err := store.Migrate(ctx, *url); err != nil {
		return err
	}
	cur, _, err := store.SchemaStatus(ctx, *url)
	if err != nil {
		return err
	}
	slog.Info("migrated", "schema_version", cur)
	return nil
}

// waitForDatabase retries until PostgreSQL answers or the timeout passes, so
// tallyd started during a database restart comes up by itself.
func waitForDatabase(ctx context.Context, st *store.Store, timeout time.Duration, log *slog.Logger) error {
	deadline := time.Now().Add(timeout)
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := st.Ping(pctx)
		cancel()
		if err == nil {
			return nil
		}
		if msg := store.PoolerRefusal(err); msg != "" {
			return fmt.Errorf("the server at --database-url refused a startup parameter (%s): it is a connection pooler "+
				"such as PgBouncer, which accepts none but application_name. Behind PgBouncer in transaction mode "+
				"start tallyd with --database-pooler transaction (TALLY_DATABASE_POOLER=transaction)", msg)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("PostgreSQL not reachable after %s: %w", timeout, err)
		}
		log.Warn("waiting for PostgreSQL", "err", err.Error())
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// serve runs the service until ctx ends. ready, when not nil, is called with
// the bound addresses once the service accepts calls.
func serve(ctx context.Context, c serveConfig, log *slog.Logger, ready func(grpcAddr, httpAddr string)) error {
	slog.SetDefault(log)
	// Metrics live on a registry of this server's own, never the global one.
	met := telemetry.NewMetrics(prometheus.NewRegistry())
	var tr *telemetry.Tracing
	scfg := store.Config{
		URL: c.databaseURL, PoolConnsMax: int32(c.poolConnsMax), StatementTimeout: c.statementTimeout,
		ConnectTimeout: c.connectTimeout, Logger: log, Pooler: c.databasePooler.get(),
	}
	if c.migrate && scfg.Pooler == store.PoolerTransaction {
		return errors.New("--migrate cannot run behind --database-pooler transaction: migrations need a direct connection. " +
			"Run `tallyd migrate --database-url <PostgreSQL itself, or HAProxy; not PgBouncer>` before starting tallyd")
	}
	if c.otlpEndpoint != "" {
		var err error
		tr, err = telemetry.NewTracing(ctx, telemetry.TracingConfig{Endpoint: c.otlpEndpoint, SampleRatio: c.traceSampleRatio})
		if err != nil {
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := tr.Shutdown(sctx); err != nil {
				log.Warn("flushing traces", "err", err.Error())
			}
		}()
		scfg.Tracer = tr.PgxTracer()
	}
	st, err := store.Open(ctx, scfg)
	if err != nil {
		return err
	}
	defer st.Close()
	met.RegisterPool(st.Pool().Stat)
	if err := waitForDatabase(ctx, st, c.startupTimeout, log); err != nil {
		return err
	}
	if c.migrate {
		if err := store.Migrate(ctx, c.databaseURL); err != nil {
			return err
		}
	}
	if err := st.CheckSchema(ctx); err != nil {
		return err
	}
	if st.TransactionPooler() {
		warnUnboundedStatements(ctx, st, log)
	}
	syncCommit, fsync, err := st.Durability(ctx)
	if err != nil {
		return err
	}
	if syncCommit == "off" || fsync == "off" {
		if !c.allowUnsafeDurability {
			return fmt.Errorf("PostgreSQL has synchronous_commit=%s fsync=%s: an acknowledged charge could be lost in a crash; "+
				"fix the server settings or pass --allow-unsafe-durability to accept the risk", syncCommit, fsync)
		}
		log.Warn("serving with unsafe durability settings: acknowledged charges can be lost in a crash",
			"synchronous_commit", syncCommit, "fsync", fsync)
	}
	if err := checkReplication(ctx, st, c.requireSyncCommit, log); err != nil {
		return err
	}

	sopts := api.ServerOptions{
		Logger: log, MsgBytesMax: c.msgBytesMax, CallTimeoutDefault: c.callTimeoutDefault, StreamsMax: uint32(c.streamsMax),
		HeaderBytesMax: uint32(c.headerBytesMax), KeepaliveTime: c.keepaliveTime, KeepaliveTimeout: c.keepaliveTimeout,
		KeepaliveMinTime: c.keepaliveMinTime, NoReflection: !c.reflection, SubmitBatchBytesMax: c.submitBatchBytesMax,
		ExportPollInterval: c.exportPollInterval, ExportStreamDurationMax: c.exportStreamDurationMax,
		ExportFollowStreamsPerKeyMax: c.exportFollowStreamsPerKeyMax, ExportFollowStreamsMax: c.exportFollowStreamsMax,
		RequestWaitMax: c.requestWaitMax, AuthWaitMax: c.authWaitMax, ConnectionsMax: c.connectionsMax,
		UnauthenticatedMsgBytesMax: c.unauthenticatedMsgBytesMax,
	}
	tlsCfg, certRoles, err := c.transport(log)
	if err != nil {
		return err
	}
	if tlsCfg != nil {
		sopts.Creds = credentials.NewTLS(tlsCfg)
	}
	if c.insecureNoAuth {
		log.Warn("serving WITHOUT authentication (--insecure-no-auth): every caller that reaches the port may move money")
	} else {
		n, err := st.ActiveAPIKeys(ctx)
		if err != nil {
			return err
		}
		if n == 0 && len(certRoles) == 0 {
			return errors.New("no active API key in the database, so no caller could authenticate. Create the first admin key with\n" +
				"  tallyd keys create --name admin --role admin --database-url <same URL>\n" +
				"(it prints the key once), or pass --insecure-no-auth to serve without authentication")
		}
		v := auth.NewVerifier(auth.VerifierConfig{Store: st, CacheTTL: c.authCacheTTL, TouchInterval: c.authTouchInterval, Logger: log})
		defer v.Close()
		sopts.Auth = &api.AuthOptions{Verifier: v, CertRoles: certRoles, Limiter: auth.NewLimiter(c.rateLimitPerKey, c.rateBurstPerKey)}
	}

	var bc *cache.Cache
	dims, err := parseUsageDimensions(c.usageDimensions)
	if err != nil {
		return err
	}
	batch := c.batch
	batch.OnBatch = met.ObserveBatch
	lcfg := ledger.Config{Store: st, Logger: log, Limits: c.limits, Batch: batch, UsageDimensions: dims,
		SystemShards: c.systemShards, AccountFactsMax: c.accountFactsMax, TopUp: c.topup}
	if c.redisURL != "" {
		bc, err = cache.New(cache.Config{
			URL: c.redisURL, OpTimeout: c.cacheOpTimeout, TTL: c.cacheTTL, FailuresMax: c.cacheFailuresMax,
			BreakerCooldown: c.cacheBreakerCooldown, ProbeInterval: c.cacheProbeInterval, Logger: log,
		})
		if err != nil {
			return err
		}
		defer bc.Close()
		lcfg.Cache = bc
		log.Info("balance cache", "topology", bc.Topology())
		met.RegisterCache(bc.Stats)
		if tr != nil {
			if err := tr.InstrumentRedis(bc.Client()); err != nil {
				return err
			}
		}
	} else {
		log.Info("no --redis-url: running without a balance cache")
	}
	if c.limits.HistorySettleWindow <= c.batch.Timeout {
		return fmt.Errorf("--history-settle-window (%s) must exceed --batch-timeout (%s): a transaction dated before "+
			"a final balance could still commit", c.limits.HistorySettleWindow, c.batch.Timeout)
	}
	if c.limits.BatchReplyBytesMax > c.msgBytesMax || c.limits.PageBytesMax > c.msgBytesMax {
		return fmt.Errorf("--batch-reply-bytes-max (%d) and --page-bytes-max (%d) must be at most --msg-bytes-max (%d): "+
			"a reply larger than the message limit cannot be sent", c.limits.BatchReplyBytesMax, c.limits.PageBytesMax, c.msgBytesMax)
	}
	if c.systemShards < 1 || c.systemShards > store.ShardsMax {
		return fmt.Errorf("--system-shards (%d) must be between 1 and %d", c.systemShards, store.ShardsMax)
	}
	l := ledger.New(lcfg)
	topups, err := c.startTopUps(ctx, l, st, log)
	if err != nil {
		l.Close()
		return err
	}
	// Served at 0 without a provider too, so alerts on them always resolve.
	met.RegisterTopUps(func() topup.Stats {
		if topups == nil {
			return topup.Stats{}
		}
		return topups.Stats()
	})
	queueMax := c.batch.QueueItemsMax
	if queueMax <= 0 {
		queueMax = ledger.BatchQueueItemsMaxDefault
	}
	met.RegisterBatcher(l.BatchStats, queueMax)
	sopts.UnaryInterceptors = met.UnaryInterceptors()
	sopts.StreamInterceptors = met.StreamInterceptors()
	if tr != nil {
		sopts.ExtraOptions = []grpc.ServerOption{tr.ServerOption()}
	}
	sweepCtx, stopSweep := context.WithCancel(context.Background())
	defer stopSweep()
	if c.holdSweepInterval > 0 {
		go l.SweepHolds(sweepCtx, c.holdSweepInterval)
	}

	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("tally.v1.LedgerService", healthpb.HealthCheckResponse_SERVING)
	gs := api.NewGRPCServer(l, hs, sopts)
	met.InitializeGRPC(gs)
	rawGlis, err := net.Listen("tcp", c.grpcAddr)
	if err != nil {
		return err
	}
	glis := api.LimitConnections(rawGlis, c.connectionsMax)
	hlis, err := net.Listen("tcp", c.httpAddr)
	if err != nil {
		glis.Close()
		return err
	}
	hmux := http.NewServeMux()
	hmux.Handle("/", debugHandler(healthHandler(st, bc), l, c.pprof))
	hmux.Handle("/metrics", met.Handler())
	hsrv := &http.Server{Handler: hmux, ReadHeaderTimeout: 5 * time.Second}

	if c.console.addr != "" {
		addr, stopConsole, err := startConsole(c, gs, sopts.Auth, tlsCfg, log)
		if err != nil {
			glis.Close()
			hlis.Close()
			return err
		}
		defer stopConsole()
		scheme := "http"
		if tlsCfg != nil {
			scheme = "https"
		}
		url := scheme + "://" + addr + "/"
		log.Info("support console serving", "url", url)
		if c.consoleStarted != nil {
			c.consoleStarted(url)
		}
	}

	var wg sync.WaitGroup
	errc := make(chan error, 2)
	wg.Add(2)
	go func() { defer wg.Done(); errc <- gs.Serve(glis) }()
	go func() {
		defer wg.Done()
		if err := hsrv.Serve(hlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	log.Info("tallyd serving", "grpc_addr", glis.Addr().String(), "http_addr", hlis.Addr().String(),
		"cache", c.redisURL != "", "schema_fingerprint", store.MigrationsFingerprint(),
		"batch_items_max", c.batch.ItemsMax, "batch_wait_max", c.batch.WaitMax.String(),
		"batch_workers_max", c.batch.WorkersMax, "pool_conns_max", c.poolConnsMax, "database_pooler", scfg.Pooler,
		"auth", !c.insecureNoAuth, "auth_cache_ttl", c.authCacheTTL.String(), "tls", tlsCfg != nil,
		"mtls", c.tlsClientCA != "", "rate_limit_per_key", c.rateLimitPerKey, "reflection", c.reflection,
		"tracing", c.otlpEndpoint != "")
	if ready != nil {
		ready(glis.Addr().String(), hlis.Addr().String())
	}

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	// Drain: report NOT_SERVING so balancers stop sending, finish in-flight
	// calls within the drain time, then force the rest closed.
	log.Info("tallyd draining", "drain_timeout", c.drainTimeout.String())
	hs.Shutdown()
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(c.drainTimeout):
		log.Warn("drain timeout: closing remaining calls")
		gs.Stop()
		// Their batches may still wait for locks, up to the batch timeout;
		// nobody waits for their answers any more.
		l.Abort()
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_ = hsrv.Shutdown(sctx)
	cancel()
	wg.Wait()
	stopSweep()
	if topups != nil {
		// Running jobs finish (each attempt is bounded); a job cut short is
		// rescued by another tallyd, and looks the payment up first.
		sctx, cancel := context.WithTimeout(context.Background(), c.drainTimeout)
		if err := topups.Stop(sctx); err != nil {
			log.Warn("stopping top-up workers", "err", err.Error())
		}
		cancel()
	}
	l.Close()
	log.Info("tallyd stopped")
	return serveErr
}

// transport checks the transport flags and returns the TLS config (nil for
// plaintext) and the client certificate role map.
func (c *serveConfig) transport(log *slog.Logger) (*tls.Config, map[string]auth.Role, error) {
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return nil, nil, errors.New("--tls-cert and --tls-key go together")
	}
	if c.tlsCert == "" {
		if c.tlsClientCA != "" || c.tlsClientRoleMap != "" {
			return nil, nil, errors.New("--tls-client-ca and --tls-client-role-map need --tls-cert and --tls-key")
		}
		if !isLoopback(c.grpcAddr) {
			if !c.insecure {
				return nil, nil, fmt.Errorf("refusing to serve plaintext gRPC on the non-loopback address %s: API keys would cross the network in clear. "+
					"Serve TLS with --tls-cert and --tls-key, or pass --insecure when a trusted network or a TLS-terminating proxy protects the port", c.grpcAddr)
			}
			log.Warn("serving plaintext gRPC on a non-loopback address (--insecure): API keys and data cross the network unencrypted",
				"grpc_addr", c.grpcAddr)
		}
		return nil, nil, nil
	}
	cfg, err := serverTLS(c.tlsCert, c.tlsKey, c.tlsClientCA)
	if err != nil {
		return nil, nil, err
	}
	roles, err := parseRoleMap(c.tlsClientRoleMap)
	if err != nil {
		return nil, nil, err
	}
	if len(roles) > 0 && c.tlsClientCA == "" {
		return nil, nil, errors.New("--tls-client-role-map needs --tls-client-ca (only verified client certificates can be mapped)")
	}
	return cfg, roles, nil
}

func serverTLS(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clientCAFile != "" {
		pem, err := os.ReadFile(clientCAFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-client-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("--tls-client-ca: no PEM certificate found")
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// parseRoleMap parses "CN=recon-job:reconciler,CN=ops:admin".
func parseRoleMap(s string) (map[string]auth.Role, error) {
	out := map[string]auth.Role{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		i := strings.LastIndex(item, ":")
		if i < 0 || !strings.HasPrefix(item, "CN=") || i <= len("CN=") {
			return nil, fmt.Errorf("--tls-client-role-map: %q is not CN=<common name>:<role>", item)
		}
		role, err := auth.ParseRole(item[i+1:])
		if err != nil {
			return nil, fmt.Errorf("--tls-client-role-map: %w", err)
		}
		out[item[len("CN="):i]] = role
	}
	return out, nil
}

// isLoopback reports whether a listen address only accepts local
// connections. An empty host, 0.0.0.0 and :: listen on every interface.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

type depState struct {
	State  string `json:"state"`
	Detail string `json:"detail,omitempty"`
}

// healthHandler serves /healthz (each dependency's state as JSON; 200 unless
// PostgreSQL is down, since the service is healthy without its cache) and
// /readyz (the same JSON: 200 while PostgreSQL answers, with status
// "degraded" when the cache is in trouble, since reads then go to
// PostgreSQL; 503 when PostgreSQL does not answer), and /livez (200 while
// the process serves HTTP at all: a liveness probe must not restart every
// replica because PostgreSQL is failing over).
func healthHandler(st *store.Store, bc *cache.Cache) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write([]byte("alive\n"))
	})
	check := func(r *http.Request) (int, map[string]any) {
		deps := map[string]depState{}
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := st.Ping(ctx); err != nil {
			deps["postgres"] = depState{State: "down", Detail: strings.TrimPrefix(err.Error(), "store: ")}
		} else {
			deps["postgres"] = depState{State: "ok"}
		}
		if bc == nil {
			deps["cache"] = depState{State: "disabled"}
		} else {
			s := bc.Status()
			deps["cache"] = depState{State: s.State, Detail: s.Detail}
		}
		overall, code := "ok", http.StatusOK
		if deps["cache"].State == cache.StateDegraded {
			overall = "degraded"
		}
		if deps["postgres"].State != "ok" {
			overall, code = "down", http.StatusServiceUnavailable
		}
		return code, map[string]any{"status": overall, "ready": code == http.StatusOK, "dependencies": deps}
	}
	answer := func(w http.ResponseWriter, r *http.Request) {
		code, body := check(r)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(body)
	}
	mux.HandleFunc("/healthz", answer)
	mux.HandleFunc("/readyz", answer)
	return mux
}

// parseUsageDimensions parses --usage-dimensions: a comma-separated list of
// up to three metadata keys.
func parseUsageDimensions(s string) ([]string, error) {
	var dims []string
	for _, d := range strings.Split(s, ",") {
		if d = strings.TrimSpace(d); d != "" {
			dims = append(dims, d)
		}
	}
	if err := ledger.ValidateUsageDimensions(dims); err != nil {
		return nil, fmt.Errorf("--usage-dimensions: %w", err)
	}
	return dims, nil
}
