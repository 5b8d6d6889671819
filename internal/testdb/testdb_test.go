package testdb

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
)

// mainDB is created by TestMain through Main, as real packages do.
var mainDB *DB

func TestMain(m *testing.M) {
	os.Exit(Main(m, Options{
		Migrate:      createWidgets,
		TemplateName: "tally_template_testdb_selftest_v1",
	}, func(d *DB) { mainDB = d }))
}

// createWidgets is a trivial migration.
func createWidgets(ctx context.Context, url string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "CREATE TABLE widgets (id int PRIMARY KEY, name text NOT NULL)")
	return err
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// admin connects to the base database.
func admin(t *testing.T, ctx context.Context) *pgx.Conn {
	t.Helper()
	base, err := baseURL("")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func dbExists(t *testing.T, ctx context.Context, name string) bool {
	t.Helper()
	var ok bool
	if err := admin(t, ctx).QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&ok); err != nil {
		t.Fatal(err)
	}
	return ok
}

// uniqueTemplate returns a template name no other run uses, dropped after
// the test, so the build path runs every time.
func uniqueTemplate(t *testing.T) string {
	name := strings.TrimPrefix(newName(time.Now()), testDBPrefix)
	tpl := "tally_template_selftest_" + name[strings.IndexByte(name, '_')+1:]
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		base, _ := baseURL("")
		conn, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close(ctx)
		for _, n := range []string{tpl, tpl + "_build"} {
			if err := dropDatabase(ctx, conn, n); err != nil {
				t.Error(err)
			}
		}
	})
	return tpl
}

func TestMainDB(t *testing.T) {
	ctx := testCtx(t)
	conn, err := pgx.Connect(ctx, mainDB.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "INSERT INTO widgets VALUES (1, 'a')"); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(mainDB.Name(), testDBPrefix) || !strings.Contains(mainDB.URL(), "/"+mainDB.Name()+"?") {
		t.Fatalf("name %q, URL %q", mainDB.Name(), mainDB.URL())
	}
}

// TestConcurrentNew races several New calls on a template that does not
// exist yet: exactly one must migrate, all must get distinct, migrated,
// isolated databases, and Close must drop them.
func TestConcurrentNew(t *testing.T) {
	ctx := testCtx(t)
	tpl := uniqueTemplate(t)
	var migrations atomic.Int32
	migrate := func(ctx context.Context, url string) error {
		migrations.Add(1)
		if !strings.Contains(url, "/"+tpl+"_build?") {
			return fmt.Errorf("migrating %s, want the build database", url)
		}
		time.Sleep(200 * time.Millisecond) // widen the race window
		return createWidgets(ctx, url)
	}
	const n = 6
	dbs := make([]*DB, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			dbs[i], errs[i] = New(ctx, Options{Migrate: migrate, TemplateName: tpl})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("New #%d: %v", i, err)
		}
		t.Cleanup(func() { dbs[i].Close() })
	}
	if got := migrations.Load(); got != 1 {
		t.Fatalf("migrated %d times, want 1", got)
	}
	seen := map[string]bool{}
	for i, d := range dbs {
		if seen[d.Name()] {
			t.Fatalf("duplicate database %s", d.Name())
		}
		seen[d.Name()] = true
		conn, err := pgx.Connect(ctx, d.URL())
		if err != nil {
			t.Fatal(err)
		}
		var count int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM widgets").Scan(&count); err != nil {
			t.Fatal(err)
		}
		if count != 0 {
			t.Fatalf("db %d sees %d widgets from another db", i, count)
		}
		if _, err := conn.Exec(ctx, "INSERT INTO widgets VALUES (1, 'x')"); err != nil {
			t.Fatal(err)
		}
		conn.Close(ctx)
	}
	var allow bool
	if err := admin(t, ctx).QueryRow(ctx, "SELECT datallowconn FROM pg_database WHERE datname = $1", tpl).Scan(&allow); err != nil {
		t.Fatal(err)
	}
	if allow {
		t.Fatal("template accepts connections")
	}
	if dbExists(t, ctx, tpl+"_build") {
		t.Fatal("build database left behind")
	}

	// Close drops, even with a client still connected, and is idempotent.
	held, err := pgx.Connect(ctx, dbs[0].URL())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close(ctx)
	for range 2 {
		if err := dbs[0].Close(); err != nil {
			t.Fatal(err)
		}
	}
	if dbExists(t, ctx, dbs[0].Name()) {
		t.Fatal("Close did not drop the database")
	}
}

// TestMigrateFailure checks a failed migration leaves neither a template
// nor a build database, so the next New retries from scratch, and that a
// migration leaking a connection still yields a usable template.
func TestMigrateFailure(t *testing.T) {
	ctx := testCtx(t)
	tpl := uniqueTemplate(t)
	boom := errors.New("boom")
	_, err := New(ctx, Options{TemplateName: tpl, Migrate: func(ctx context.Context, url string) error {
		createWidgets(ctx, url)
		return boom
	}})
	if !errors.Is(err, boom) {
		t.Fatalf("New = %v, want boom", err)
	}
	if dbExists(t, ctx, tpl) || dbExists(t, ctx, tpl+"_build") {
		t.Fatal("failed migration left a database behind")
	}

	var leaked *pgx.Conn
	d, err := New(ctx, Options{TemplateName: tpl, Migrate: func(ctx context.Context, url string) error {
		if err := createWidgets(ctx, url); err != nil {
			return err
		}
		leaked, err = pgx.Connect(ctx, url) // never closed by the migration
		return err
	}})
	if leaked != nil {
		defer leaked.Close(context.Background())
	}
	if err != nil {
		t.Fatalf("New after a leaky migration: %v", err)
	}
	defer d.Close()
}

// TestDropStale checks abandoned test databases are dropped by New while
// fresh ones are kept.
func TestDropStale(t *testing.T) {
	ctx := testCtx(t)
	conn := admin(t, ctx)
	old := newName(time.Now().Add(-3 * time.Hour))
	fresh := newName(time.Now().Add(-time.Minute))
	for _, n := range []string{old, fresh} {
		if _, err := conn.Exec(ctx, "CREATE DATABASE "+ident(n)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dropDatabase(context.Background(), conn, n) })
	}
	d, err := New(ctx, Options{Migrate: createWidgets, TemplateName: "tally_template_testdb_selftest_v1"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if dbExists(t, ctx, old) {
		t.Fatalf("stale %s not dropped", old)
	}
	if !dbExists(t, ctx, fresh) {
		t.Fatalf("fresh %s dropped", fresh)
	}
}

func TestOptionsValidation(t *testing.T) {
	ctx := testCtx(t)
	for _, o := range []Options{
		{TemplateName: ""},
		{TemplateName: "Bad-Name"},
		{TemplateName: strings.Repeat("x", 49)},
		{TemplateName: "ok", BaseURL: "host=127.0.0.1 dbname=test"},
	} {
		if _, err := New(ctx, o); err == nil {
			t.Errorf("New(%+v) succeeded", o)
		}
	}
	if got := withDB("postgres://u:p@h:1/test?sslmode=disable", "x"); got != "postgres://u:p@h:1/x?sslmode=disable" {
		t.Errorf("withDB = %q", got)
	}
	if tm, ok := nameTime(newName(time.Unix(1700000000, 0))); !ok || tm.Unix() != 1700000000 {
		t.Errorf("nameTime round trip = %v, %v", tm, ok)
	}
	if _, ok := nameTime("tally_test_x"); ok {
		t.Error("nameTime accepted a foreign name")
	}
}

func TestTemplateName(t *testing.T) {
	a := fstest.MapFS{"001_init.sql": {Data: []byte("CREATE TABLE a ()")}}
	b := fstest.MapFS{"001_init.sql": {Data: []byte("CREATE TABLE a ()")}, "002_more.sql": {Data: []byte("x")}}
	na, err := TemplateName(a)
	if err != nil {
		t.Fatal(err)
	}
	na2, _ := TemplateName(a)
	nb, _ := TemplateName(b)
	nx, _ := TemplateName(a, "v2")
	if na != na2 || na == nb || na == nx {
		t.Fatalf("names: %s %s %s %s", na, na2, nb, nx)
	}
	if !templateNameRE.MatchString(na) {
		t.Fatalf("TemplateName %q is not a valid template name", na)
	}
}
