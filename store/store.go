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
}

// Store is a handle on the Tally database.
type Store struct {
	pool  *pgxpool.Pool
	log   *slog.Logger
	topup topUpJobs
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
	pcfg.ConnConfig.RuntimeParams["statement_timeout"] = fmt.Sprint(cfg.StatementTimeout.Milliseconds())
	pcfg.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = fmt.Sprint((2 * cfg.StatementTimeout).Milliseconds())
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
	return &Store{pool: pool, log: cfg.Logger}, nil
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

// Migrate applies every pending embedded migration to the database at url.
func Migrate(ctx context.Context, url string) error {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return translate(err)
	}
	defer db.Close()
	p, err := newProvider(db)
	if err != nil {
		return fmt.Errorf("store: load migrations: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("store: migrate: %w", translate(errors.Unwrap(err)))
	}
	return withRiver(ctx, url, func(m *rivermigrate.Migrator[pgx.Tx]) error {
		if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
			return fmt.Errorf("store: migrate River's job queue: %w", err)
		}
		return nil
	})
}

// withRiver runs fn with River's migrator on the database at url. River's
// job tables (the top-up queue) are migrated with Tally's own, by
// `tallyd migrate` and --migrate.
func withRiver(ctx context.Context, url string, fn func(*rivermigrate.Migrator[pgx.Tx]) error) error {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return translate(err)
	}
	defer pool.Close()
	m, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("store: River migrator: %w", err)
	}
	return fn(m)
}

// riverOutdated reports whether River's tables are behind this binary.
func riverOutdated(ctx context.Context, url string) (bool, error) {
	var behind bool
	err := withRiver(ctx, url, func(m *rivermigrate.Migrator[pgx.Tx]) error {
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

// CheckSchema returns ErrSchemaOutdated when the database is behind this binary.
func CheckSchema(ctx context.Context, url string) error {
	cur, latest, err := SchemaStatus(ctx, url)
	if err != nil {
		return err
	}
	if cur < latest {
		return fmt.Errorf("%w (database at version %d, binary needs %d)", ErrSchemaOutdated, cur, latest)
	}
	behind, err := riverOutdated(ctx, url)
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
