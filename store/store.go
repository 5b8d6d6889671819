// Package store is Tally's PostgreSQL layer: the schema (embedded, numbered
// migrations), the queries, and the translation of driver errors into store
// errors. PostgreSQL is the only source of truth; nothing in this package
// reads or trusts the Redis cache.
package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	pgxuuid "github.com/vgarvardt/pgx-google-uuid/v5"
)

//go:embed migrations/*.sql
var migrationsFS embed.FS

// Defaults for the connection pool. Each has a flag in tallyd.
const (
	// PoolConnsMaxDefault bounds connections per tallyd process. pgxpool's own
	// default (max(4, NumCPU)) is too small for a service whose calls mostly
	// wait on row locks and commit flushes.
	PoolConnsMaxDefault = 32
	// StatementTimeoutDefault bounds any single statement, so a stuck lock
	// cannot hold a connection forever.
	StatementTimeoutDefault = 10 * time.Second
	// ConnectTimeoutDefault bounds dialing PostgreSQL, so a cut network fails
	// fast with UNAVAILABLE instead of hanging the call.
	ConnectTimeoutDefault = 3 * time.Second
)

// Config configures Open.
type Config struct {
	URL              string
	PoolConnsMax     int32
	StatementTimeout time.Duration
	ConnectTimeout   time.Duration
	Logger           *slog.Logger
	// Tracer, when set, traces every query (for OpenTelemetry).
	Tracer pgx.QueryTracer
	// Pooler is what sits between the store and PostgreSQL: PoolerNone
	// ("" too) or PoolerTransaction (see poolerExecMode and txSettings).
	Pooler string
}

// Store is a handle on the Tally database.
type Store struct {
	pool  *pgxpool.Pool
	log   *slog.Logger
	topup topUpJobs
	// pooler is Config.Pooler; txSettings what every transaction sets for
	// itself behind a transaction pooler ("" otherwise).
	pooler     string
	txSettings string
}

// Open creates a connection pool. It does not require the database to be
// reachable yet: the pool dials lazily and recovers by itself after a restart.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	pcfg, err := pgxpool.ParseConfig(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("store: bad database URL: %w", errors.New(redactParseError(err)))
	}
	if cfg.PoolConnsMax <= 0 {
		cfg.PoolConnsMax = PoolConnsMaxDefault
	}
	if cfg.StatementTimeout <= 0 {
		cfg.StatementTimeout = StatementTimeoutDefault
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = ConnectTimeoutDefault
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Pooler == "" {
		cfg.Pooler = PoolerNone
	}
	if _, err := ParsePooler(cfg.Pooler); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	pcfg.MaxConns = cfg.PoolConnsMax
	pcfg.MinConns = 0
	pcfg.HealthCheckPeriod = 5 * time.Second
	pcfg.ConnConfig.ConnectTimeout = cfg.ConnectTimeout
	if cfg.Tracer != nil {
		pcfg.ConnConfig.Tracer = cfg.Tracer
	}
	if pcfg.ConnConfig.RuntimeParams == nil {
		pcfg.ConnConfig.RuntimeParams = map[string]string{}
	}
	st := &Store{log: cfg.Logger, pooler: cfg.Pooler}
	if cfg.Pooler == PoolerTransaction {
		// No named prepared statements, and no startup parameter but
		// application_name (PgBouncer 1.18 refuses the others): the
		// timeouts go into each transaction instead.
		pcfg.ConnConfig.DefaultQueryExecMode = poolerExecMode
		st.txSettings = txSettings(cfg.StatementTimeout)
	} else {
		for k, v := range sessionTimeouts(cfg.StatementTimeout) {
			pcfg.ConnConfig.RuntimeParams[k] = v
		}
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = ApplicationName
	// google/uuid's UUID is a driver.Valuer that renders itself as text:
	// without this, pgx formats and parses every id of a batch's arrays
	// as a string (about a tenth of tallyd's CPU on the write path). The
	// codec encodes and scans the 16 bytes directly.
	pcfg.AfterConnect = func(_ context.Context, c *pgx.Conn) error {
		pgxuuid.Register(c.TypeMap())
		return nil
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, translate(err)
	}
	st.pool = pool
	return st, nil
}

// redactParseError keeps a URL parse error from echoing a password.
func redactParseError(err error) string {
	_ = err
	return "cannot parse connection string"
}

// Close closes the pool, waiting for acquired connections to be released.
func (s *Store) Close() { s.pool.Close() }

// Pool exposes the pool for tests and tools in this module.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Ping checks that PostgreSQL answers.
func (s *Store) Ping(ctx context.Context) error { return translate(s.pool.Ping(ctx)) }

// migrations returns the embedded migration files.
func migrations() fs.FS {
	sub, err := fs.Sub(migrationsFS, "migrations")
	if err != nil {
		panic(err) // embedded at build time; cannot fail
	}
	return sub
}

// MigrationsFingerprint is a hash of the embedded migrations, so test
// templates are rebuilt whenever the schema changes.
func MigrationsFingerprint() string {
	h := sha256.New()
	entries, _ := fs.ReadDir(migrations(), ".")
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	for _, n := range names {
		b, _ := fs.ReadFile(migrations(), n)
		h.Write([]byte(n))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func newProvider(db *sql.DB) (*goose.Provider, error) {
	return goose.NewProvider(goose.DialectPostgres, db, migrations())
}

// Migrate applies every pending embedded migration to the database at url,
// which must reach PostgreSQL itself (or a proxy that keeps one server
// session per connection, such as HAProxy), never a transaction pooler:
// a migration may run statements outside a transaction, and each of them
// could then land on another server connection. Migrate connects first
// with a startup parameter of its own (directProbe) and refuses with
// ErrPoolerNotDirect when it does not arrive: PgBouncer refuses unknown
// startup parameters, or drops those it is told to ignore. Its
// connections also send statement_timeout=0, so that a long index build
// is not cut by a timeout set on the role for tallyd's own traffic (the
// way to bound statements behind a pooler, docs/OPERATIONS.md).
func Migrate(ctx context.Context, url string) error {
	cfg, err := directConfig(url)
	if err != nil {
		return err
	}
	if err := checkDirect(ctx, cfg); err != nil {
		return err
	}
	db := stdlib.OpenDB(*cfg.Copy())
	defer db.Close()
	p, err := newProvider(db)
	if err != nil {
		return fmt.Errorf("store: load migrations: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("store: migrate: %w", translate(errors.Unwrap(err)))
	}
	pcfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("store: bad database URL: %w", errors.New(redactParseError(err)))
	}
	pcfg.ConnConfig, pcfg.MaxConns = cfg.Copy(), 2
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return translate(err)
	}
	defer pool.Close()
	return withRiver(pool, func(m *rivermigrate.Migrator[pgx.Tx]) error {
		if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
			return fmt.Errorf("store: migrate River's job queue: %w", err)
		}
		return nil
	})
}

// ErrPoolerNotDirect means a URL that must reach PostgreSQL directly
// (migrations) reaches a connection pooler.
var ErrPoolerNotDirect = errors.New("store: the database URL reaches a connection pooler (PgBouncer), not PostgreSQL: " +
	"run `tallyd migrate` with a --database-url that reaches PostgreSQL directly (or through HAProxy), not PgBouncer")

// directProbe is a startup parameter that PostgreSQL accepts (a custom,
// dotted setting) and no pooler passes on: it proves a migration's
// connection reaches PostgreSQL itself.
const directProbe = "tally.direct"

// directConfig is the connection config of migrations: url with
// directProbe and statement_timeout 0 (see Migrate).
func directConfig(url string) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("store: bad database URL: %w", errors.New(redactParseError(err)))
	}
	cfg.RuntimeParams[directProbe] = "on"
	cfg.RuntimeParams["statement_timeout"] = "0"
	return cfg, nil
}

// checkDirect connects once with cfg and refuses a connection pooler: one
// that refuses the startup parameters (PgBouncer's default), or one that
// accepted them without passing them on (PgBouncer with
// ignore_startup_parameters).
func checkDirect(ctx context.Context, cfg *pgx.ConnConfig) error {
	conn, err := pgx.ConnectConfig(ctx, cfg.Copy())
	if err != nil {
		if PoolerRefusal(err) != "" {
			return fmt.Errorf("%w (%s)", ErrPoolerNotDirect, PoolerRefusal(err))
		}
		return translate(err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var probe pgtype.Text
	if err := conn.QueryRow(ctx, `SELECT current_setting($1, true)`, directProbe).Scan(&probe); err != nil {
		return translate(err)
	}
	if probe.String != "on" {
		return fmt.Errorf("%w (the startup parameter %s did not arrive)", ErrPoolerNotDirect, directProbe)
	}
	return nil
}

// withRiver runs fn with River's migrator on pool. River's job tables (the
// top-up queue) are migrated with Tally's own, by `tallyd migrate` and
// --migrate.
func withRiver(pool *pgxpool.Pool, fn func(*rivermigrate.Migrator[pgx.Tx]) error) error {
	m, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("store: River migrator: %w", err)
	}
	return fn(m)
}

// riverOutdated reports whether River's tables are behind this binary.
func riverOutdated(ctx context.Context, pool *pgxpool.Pool) (bool, error) {
	var behind bool
	err := withRiver(pool, func(m *rivermigrate.Migrator[pgx.Tx]) error {
		have, err := m.ExistingVersions(ctx)
		if err != nil {
			return translate(err)
		}
		all := m.AllVersions()
		behind = len(have) == 0 || have[len(have)-1].Version < all[len(all)-1].Version
		return nil
	})
	return behind, err
}

// SchemaStatus reports the database's schema version and the newest one this
// binary embeds.
func SchemaStatus(ctx context.Context, url string) (current, latest int64, err error) {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return 0, 0, translate(err)
	}
	defer db.Close()
	return schemaStatus(ctx, db)
}

func schemaStatus(ctx context.Context, db *sql.DB) (current, latest int64, err error) {
	p, err := newProvider(db)
	if err != nil {
		return 0, 0, fmt.Errorf("store: load migrations: %w", err)
	}
	current, err = p.GetDBVersion(ctx)
	if err != nil {
		return 0, 0, translate(err)
	}
	srcs := p.ListSources()
	if len(srcs) > 0 {
		latest = srcs[len(srcs)-1].Version
	}
	return current, latest, nil
}

// CheckSchema returns ErrSchemaOutdated when the database at url is behind
// this binary.
func CheckSchema(ctx context.Context, url string) error {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return translate(err)
	}
	defer pool.Close()
	return checkSchema(ctx, pool)
}

// CheckSchema returns ErrSchemaOutdated when the store's database is behind
// this binary. It asks through the store's own pool, so it works behind a
// transaction pooler too.
func (s *Store) CheckSchema(ctx context.Context) error { return checkSchema(ctx, s.pool) }

func checkSchema(ctx context.Context, pool *pgxpool.Pool) error {
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	cur, latest, err := schemaStatus(ctx, db)
	if err != nil {
		return err
	}
	if cur < latest {
		return fmt.Errorf("%w (database at version %d, binary needs %d)", ErrSchemaOutdated, cur, latest)
	}
	behind, err := riverOutdated(ctx, pool)
	if err != nil {
		return err
	}
	if behind {
		return fmt.Errorf("%w (River's job tables are not migrated)", ErrSchemaOutdated)
	}
	return nil
}

// Durability reports the server's synchronous_commit and fsync settings.
func (s *Store) Durability(ctx context.Context) (synchronousCommit, fsync string, err error) {
	err = s.pool.QueryRow(ctx, `SELECT current_setting('synchronous_commit'), current_setting('fsync')`).Scan(&synchronousCommit, &fsync)
	return synchronousCommit, fsync, translate(err)
}

var _ = stdlib.GetDefaultDriver // registers the "pgx" database/sql driver
var _ pgx.Tx
