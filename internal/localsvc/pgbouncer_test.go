package localsvc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// connectSimple connects with the simple query protocol: pgx's default
// caches named prepared statements per connection, which transaction
// pooling (PgBouncer 1.18 does not track them) breaks.
func connectSimple(t *testing.T, ctx context.Context, url string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// TestPgBouncerTransactionPooling runs two clients through a PgBouncer
// with one server connection in transaction mode, and checks that server
// session state belongs to the server connection, not to the client: what
// one client PREPAREs the other can EXECUTE, and can remove under it.
func TestPgBouncerTransactionPooling(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pg, err := StartPostgres(ctx, PostgresOptions{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	b, err := StartPgBouncer(ctx, PgBouncerOptions{
		Dir:             t.TempDir(),
		Target:          fmt.Sprintf("127.0.0.1:%d", pg.Port()),
		DefaultPoolSize: 1,
		Logger:          testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if want := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", b.Port()); b.URL("postgres") != want {
		t.Fatalf("URL = %q, want %q", b.URL("postgres"), want)
	}

	a := connectSimple(t, ctx, b.URL("postgres"))
	c := connectSimple(t, ctx, b.URL("postgres"))
	pid := func(conn *pgx.Conn) (p int) {
		t.Helper()
		if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if pa, pc := pid(a), pid(c); pa != pc {
		t.Fatalf("two clients on a pool of one got backends %d and %d", pa, pc)
	}

	// Two transactions, one per client, on the one server connection.
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	tx, err = c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (2)"); err != nil {
		t.Fatal(err)
	}
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Fatalf("count = %d, want 2", n)
	}

	// Session state is the server connection's: c can use a's prepared
	// statement, and once c drops it, a's next transaction has lost it.
	if _, err := a.Exec(ctx, "PREPARE s AS SELECT 42"); err != nil {
		t.Fatal(err)
	}
	if err := c.QueryRow(ctx, "EXECUTE s").Scan(&n); err != nil || n != 42 {
		t.Fatalf("other client's EXECUTE s = %d, %v; want 42 (shared server connection)", n, err)
	}
	if _, err := c.Exec(ctx, "DEALLOCATE s"); err != nil {
		t.Fatal(err)
	}
	err = a.QueryRow(ctx, "EXECUTE s").Scan(&n)
	if pgErr := (*pgconn.PgError)(nil); !errors.As(err, &pgErr) || pgErr.Code != pgerrcode.InvalidSQLStatementName {
		t.Fatalf("EXECUTE of own statement after the other client's DEALLOCATE: %v; want invalid_sql_statement_name", err)
	}
	t.Log("transaction pooling: the PREPAREd statement belonged to the server connection, not the client")

	// PgBouncer 1.18 refuses startup parameters it does not know.
	cfg, err := pgx.ParseConfig(b.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["statement_timeout"] = "1000"
	if conn, err := pgx.ConnectConfig(ctx, cfg); err == nil {
		conn.Close(ctx)
		t.Fatal("startup parameter statement_timeout accepted")
	} else if !strings.Contains(err.Error(), "unsupported startup parameter") {
		t.Fatalf("statement_timeout startup parameter: %v", err)
	}

	// Kill breaks clients; Start serves again on the same port.
	port := b.Port()
	if err := b.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := a.Ping(ctx); err == nil {
		t.Fatal("client connection survived Kill")
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if b.Port() != port {
		t.Fatalf("port moved from %d to %d", port, b.Port())
	}
	if err := connectSimple(t, ctx, b.URL("postgres")).QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 2 {
		t.Fatalf("after restart: count = %d, %v", n, err)
	}
	if err := b.Start(ctx); err == nil {
		t.Fatal("Start of a running pgbouncer succeeded")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(b.LogPath()); !os.IsNotExist(err) {
		t.Fatalf("log not removed by Close: %v", err)
	}
	if err := b.Start(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close = %v, want ErrClosed", err)
	}
	if _, err := StartPgBouncer(ctx, PgBouncerOptions{Target: "127.0.0.1:1", PoolMode: "bogus"}); err == nil {
		t.Fatal("unknown pool mode accepted")
	}
	// A start failure reports PgBouncer's own complaint.
	_, err = StartPgBouncer(ctx, PgBouncerOptions{Target: "127.0.0.1:1", ExtraConf: map[string]string{"max_client_conn": "lots"}})
	if err == nil || !strings.Contains(err.Error(), "max_client_conn") {
		t.Fatalf("bad setting: error %v does not show the log", err)
	}
}
