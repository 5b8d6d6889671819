// Package testdb gives each test package its own freshly migrated database
// on the shared PostgreSQL server.
//
// Migrating a database per package would cost seconds each, so the
// migrations run once into a template database, and every test package
// clones it with CREATE DATABASE ... TEMPLATE, which takes milliseconds.
// `go test ./...` runs packages as concurrent processes, so template
// creation and cloning are serialized across processes with a PostgreSQL
// advisory lock: CREATE DATABASE fails if any other session is connected to
// the template, and two processes must not both build it.
//
// The template's name is supplied by the caller and should change whenever
// the migrations do (see TemplateName), so a stale template is never
// cloned; old templates are simply left behind.
package testdb

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvURL names the environment variable that overrides DefaultBaseURL.
const EnvURL = "TALLY_TEST_DATABASE_URL"

// DefaultBaseURL is the shared test server's database used when neither
// Options.BaseURL nor $TALLY_TEST_DATABASE_URL is set.
const DefaultBaseURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// testDBPrefix starts every database New creates; with the creation time
// encoded after it, leftovers of killed test runs can be recognized.
const testDBPrefix = "tally_test_"

// staleAfter is the age after which a tally_test_ database is considered
// abandoned by a crashed or killed test process and dropped. No test
// package runs this long.
const staleAfter = 2 * time.Hour

// lockKey is the pg_advisory_lock key serializing template builds and
// clones ("tallytdb" in ASCII). Advisory locks are per database, so all
// users must share the same BaseURL database, as they do by default.
const lockKey int64 = 0x74616c6c79746462

// Options configures New.
type Options struct {
	// BaseURL is a postgres:// URL of an existing database on the server to
	// use; it is used for administration (and the advisory lock) only.
	// Empty means $TALLY_TEST_DATABASE_URL, or else DefaultBaseURL.
	BaseURL string
	// Migrate brings the empty database at url to the current schema. It is
	// supplied by the caller (the store package) so testdb does not import
	// store. It must close all its connections before returning; any it
	// leaks are terminated. Nil means the template stays empty.
	Migrate func(ctx context.Context, url string) error
	// TemplateName names the migrated template database, e.g.
	// "tally_template_<hash>". It must change whenever the migrations
	// change; TemplateName(fsys) derives one from migration files. Lowercase
	// letters, digits and underscores, at most 48 characters.
	TemplateName string
}

// DB is a test database cloned from the template. Drop it with Close.
type DB struct {
	name    string
	url     string
	baseURL string
}

// templateNameRE keeps names safe to build SQL with and short enough that
// the "_build" suffix stays within PostgreSQL's 63-byte identifier limit.
var templateNameRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,47}$`)

// New returns a new, empty-of-data but migrated database. It ensures the
// template exists, building it under the advisory lock if needed (into
// "<template>_build", renamed into place only once fully migrated, so a
// crash mid-migration never leaves a half-migrated template), then clones
// it. It also drops tally_test_ databases abandoned more than two hours ago.
func New(ctx context.Context, opts Options) (*DB, error) {
	base, err := baseURL(opts.BaseURL)
	if err != nil {
		return nil, err
	}
	if !templateNameRE.MatchString(opts.TemplateName) {
		return nil, fmt.Errorf("testdb: invalid TemplateName %q (want %s)", opts.TemplateName, templateNameRE)
	}
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		return nil, fmt.Errorf("testdb: connect to %s: %w", redact(base), err)
	}
	defer conn.Close(context.Background())

	// Session-level lock: released by unlock below or, if we die, when the
	// connection goes away. Waiting for it honors ctx because pgx cancels
	// the query.
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", lockKey); err != nil {
		return nil, fmt.Errorf("testdb: advisory lock: %w", err)
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = conn.Exec(uctx, "SELECT pg_advisory_unlock($1)", lockKey)
	}()

	dropStale(ctx, conn, time.Now())

	if err := ensureTemplate(ctx, conn, base, opts); err != nil {
		return nil, err
	}

	name := newName(time.Now())
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s TEMPLATE %s", ident(name), ident(opts.TemplateName))); err != nil {
		return nil, fmt.Errorf("testdb: clone %s: %w", opts.TemplateName, err)
	}
	return &DB{name: name, url: withDB(base, name), baseURL: base}, nil
}

// ensureTemplate builds the template unless it exists; the caller holds
// the advisory lock, so checking and building cannot race.
func ensureTemplate(ctx context.Context, conn *pgx.Conn, base string, opts Options) error {
	var allowConn bool
	err := conn.QueryRow(ctx, "SELECT datallowconn FROM pg_database WHERE datname = $1", opts.TemplateName).Scan(&allowConn)
	switch {
	case err == nil && !allowConn:
		return nil
	case err == nil:
		// Made by an older version of this package: close it to
		// connections now, or a stray client would break every clone.
		if _, err := conn.Exec(ctx, fmt.Sprintf("ALTER DATABASE %s WITH ALLOW_CONNECTIONS false", ident(opts.TemplateName))); err != nil {
			return fmt.Errorf("testdb: lock down template: %w", err)
		}
		return nil
	case !errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("testdb: look up template: %w", err)
	}
	build := opts.TemplateName + "_build"
	// A leftover build is from a process that died mid-migration while
	// holding the lock we now hold: it is garbage.
	if err := dropDatabase(ctx, conn, build); err != nil {
		return err
	}
	// template0 rather than the default template1: nobody can connect to
	// template0 (so cloning cannot fail) and it holds nothing site-specific.
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s TEMPLATE template0 ENCODING 'UTF8'", ident(build))); err != nil {
		return fmt.Errorf("testdb: create %s: %w", build, err)
	}
	if opts.Migrate != nil {
		if err := opts.Migrate(ctx, withDB(base, build)); err != nil {
			_ = dropDatabase(context.Background(), conn, build)
			return fmt.Errorf("testdb: migrate template: %w", err)
		}
	}
	// Nobody may connect to the finished template: a connection would make
	// every clone fail. Leaked migration connections are terminated, as
	// RENAME also needs the database to be unused.
	stmts := []struct {
		sql  string
		args []any
	}{
		{fmt.Sprintf("ALTER DATABASE %s WITH ALLOW_CONNECTIONS false", ident(build)), nil},
		{"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", []any{build}},
		{fmt.Sprintf("ALTER DATABASE %s RENAME TO %s", ident(build), ident(opts.TemplateName)), nil},
	}
	for _, s := range stmts {
		if _, err := conn.Exec(ctx, s.sql, s.args...); err != nil {
			_ = dropDatabase(context.Background(), conn, build)
			return fmt.Errorf("testdb: finish template: %s: %w", s.sql, err)
		}
	}
	return nil
}

// URL returns the postgres:// URL of the test database.
func (d *DB) URL() string { return d.url }

// Name returns the database's name.
func (d *DB) Name() string { return d.name }

// Close drops the database, disconnecting any clients still using it
// (WITH (FORCE)), so a test that forgot to close a pool cannot make
// cleanup fail. Close is idempotent.
func (d *DB) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, d.baseURL)
	if err != nil {
		return fmt.Errorf("testdb: connect to %s: %w", redact(d.baseURL), err)
	}
	defer conn.Close(context.Background())
	return dropDatabase(ctx, conn, d.name)
}

// Main is for TestMain: it creates a database, hands it to set (which
// typically stores it in a package variable), runs the tests and drops the
// database. It returns the exit code for os.Exit:
//
//	func TestMain(m *testing.M) {
//		os.Exit(testdb.Main(m, opts, func(d *testdb.DB) { db = d }))
//	}
//
// If the database cannot be created every test would fail anyway, so the
// error is printed and 1 returned without running them.
func Main(m *testing.M, opts Options, set func(*DB)) int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	db, err := New(ctx, opts)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testdb: %v\n", err)
		return 1
	}
	if set != nil {
		set(db)
	}
	code := m.Run()
	if err := db.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "testdb: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// TemplateName derives a template name from the contents of every file in
// fsys (typically the store's embedded migrations), so that changing,
// adding or removing a migration yields a new template. extra strings (for
// example a schema version of something outside fsys) are mixed in too.
func TemplateName(fsys fs.FS, extra ...string) (string, error) {
	h := sha256.New()
	err := fs.WalkDir(fsys, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		f, err := fsys.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		// Length-prefix names so "a"+"bc" and "ab"+"c" hash differently.
		fmt.Fprintf(h, "%d:%s\n", len(path), path)
		_, err = io.Copy(h, f)
		fmt.Fprint(h, "\n")
		return err
	})
	if err != nil {
		return "", fmt.Errorf("testdb: hash migrations: %w", err)
	}
	for _, e := range extra {
		fmt.Fprintf(h, "extra %d:%s\n", len(e), e)
	}
	return "tally_template_" + hex.EncodeToString(h.Sum(nil))[:16], nil
}

// dropStale drops test databases whose encoded creation time is older than
// staleAfter: leftovers of test processes that were killed before Close.
// It is best effort; failures only mean garbage stays a while longer.
func dropStale(ctx context.Context, conn *pgx.Conn, now time.Time) {
	rows, err := conn.Query(ctx, `SELECT datname FROM pg_database WHERE datname LIKE 'tally\_test\_%'`)
	if err != nil {
		return
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return
	}
	for _, n := range names {
		if created, ok := nameTime(n); ok && now.Sub(created) > staleAfter {
			_ = dropDatabase(ctx, conn, n)
		}
	}
}

// newName returns tally_test_<unix seconds>_<random>; the timestamp lets
// dropStale judge age without superuser-only file access.
func newName(now time.Time) string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s%d_%s", testDBPrefix, now.Unix(), hex.EncodeToString(b[:]))
}

// nameTime parses the creation time out of a name made by newName.
func nameTime(name string) (time.Time, bool) {
	rest, ok := strings.CutPrefix(name, testDBPrefix)
	if !ok {
		return time.Time{}, false
	}
	ts, _, ok := strings.Cut(rest, "_")
	if !ok {
		return time.Time{}, false
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(sec, 0), true
}

// dropDatabase drops name if it exists, disconnecting its clients.
func dropDatabase(ctx context.Context, conn *pgx.Conn, name string) error {
	if _, err := conn.Exec(ctx, fmt.Sprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", ident(name))); err != nil {
		return fmt.Errorf("testdb: drop %s: %w", name, err)
	}
	return nil
}

// ident quotes a database name for SQL.
func ident(name string) string { return pgx.Identifier{name}.Sanitize() }

// baseURL resolves the administrative URL from the option, the
// environment or the default. Only URL syntax is accepted because New must
// derive other databases' URLs from it.
func baseURL(opt string) (string, error) {
	u := opt
	if u == "" {
		u = os.Getenv(EnvURL)
	}
	if u == "" {
		u = DefaultBaseURL
	}
	pu, err := url.Parse(u)
	if err != nil || (pu.Scheme != "postgres" && pu.Scheme != "postgresql") {
		return "", errors.New("testdb: base URL must be a postgres:// URL (keyword=value DSNs are not supported)")
	}
	return u, nil
}

// withDB returns base with its database replaced by name, keeping user,
// host and query parameters.
func withDB(base, name string) string {
	u, _ := url.Parse(base) // validated by baseURL
	u.Path = "/" + name
	u.RawPath = ""
	return u.String()
}

// redact hides any password in u for error messages.
func redact(u string) string {
	pu, err := url.Parse(u)
	if err != nil {
		return "<invalid URL>"
	}
	return pu.Redacted()
}
