package localsvc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func connect(t *testing.T, ctx context.Context, url string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func rows(t *testing.T, ctx context.Context, p *Postgres) []int {
	t.Helper()
	conn := connect(t, ctx, p.URL("postgres"))
	defer conn.Close(ctx) // a smart shutdown waits for every client
	r, err := conn.Query(ctx, "SELECT id FROM t ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(r, pgx.RowTo[int])
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func insert(t *testing.T, ctx context.Context, p *Postgres, id int) {
	t.Helper()
	conn := connect(t, ctx, p.URL("postgres"))
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "INSERT INTO t VALUES ($1)", id); err != nil {
		t.Fatal(err)
	}
}

func wantRows(t *testing.T, ctx context.Context, p *Postgres, want ...int) {
	t.Helper()
	if got := rows(t, ctx, p); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("rows = %v, want %v", got, want)
	}
}

// TestPostgresLifecycle runs one cluster through every way of stopping it,
// checking after each that committed data survived.
func TestPostgresLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// t.TempDir's parent is 0700 root-owned: as root this exercises the
	// "make it traversable for the postgres user" path.
	dir := t.TempDir()
	p, err := StartPostgres(ctx, PostgresOptions{Dir: dir, Logger: testLogger(t), ExtraConf: map[string]string{"work_mem": "7MB"}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	port := p.Port()
	if want := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port); p.URL("postgres") != want {
		t.Fatalf("URL = %q, want %q", p.URL("postgres"), want)
	}

	conn := connect(t, ctx, p.URL("postgres"))
	for setting, want := range map[string]string{"fsync": "on", "synchronous_commit": "on", "max_connections": "200", "shared_buffers": "128MB", "work_mem": "7MB", "listen_addresses": "127.0.0.1"} {
		var got string
		if err := conn.QueryRow(ctx, "SHOW "+setting).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s = %q, want %q", setting, got, want)
		}
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}

	t.Log("restart fast")
	if err := p.Restart(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	if err := conn.Ping(ctx); err == nil {
		t.Fatal("connection survived a fast restart")
	}
	wantRows(t, ctx, p, 1)
	insert(t, ctx, p, 2)

	t.Log("restart immediate")
	if err := p.Restart(ctx, "immediate"); err != nil {
		t.Fatal(err)
	}
	wantRows(t, ctx, p, 1, 2)
	insert(t, ctx, p, 3)

	t.Log("kill -9 with a busy backend")
	// A CPU-bound query does not notice the postmaster's death, so its
	// backend lingers holding the old shared memory; Start must cope.
	// Not via connect: its cleanup could close the conn while the
	// goroutine still uses it.
	busy, err := pgx.Connect(ctx, p.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	busyErr := make(chan error, 1)
	go func() {
		_, err := busy.Exec(ctx, "SELECT count(*) FROM generate_series(1, 10000000000)")
		busy.Close(context.Background())
		busyErr <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(); err != nil { // idempotent
		t.Fatal(err)
	}
	start := time.Now()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("start after kill took %v", time.Since(start))
	if p.Port() != port {
		t.Fatalf("port moved from %d to %d", port, p.Port())
	}
	if err := <-busyErr; err == nil {
		t.Fatal("busy query survived the kill")
	}
	wantRows(t, ctx, p, 1, 2, 3)

	t.Log("kill -9 while idle, then start")
	idle := connect(t, ctx, p.URL("postgres"))
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	idle.Close(ctx)
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	wantRows(t, ctx, p, 1, 2, 3)

	if err := p.Start(ctx); err == nil {
		t.Fatal("Start of a running server succeeded")
	}
	if err := p.Stop("bogus"); err == nil {
		t.Fatal("Stop with an unknown mode succeeded")
	}

	t.Log("smart stop, then reuse the cluster from a new StartPostgres")
	if err := p.Stop("smart"); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop("fast"); err != nil { // stopping a stopped server is fine
		t.Fatal(err)
	}
	p2, err := StartPostgres(ctx, PostgresOptions{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	wantRows(t, ctx, p2, 1, 2, 3)
	if err := p2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "data")); !os.IsNotExist(err) {
		t.Fatalf("data dir not removed by Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close = %v, want ErrClosed", err)
	}
}

// TestPostgresStartFailureShowsLog checks that a server that cannot start
// reports why, and that a self-made Dir is cleaned up.
func TestPostgresStartFailureShowsLog(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := filepath.Join(t.TempDir(), "pg")
	_, err := StartPostgres(ctx, PostgresOptions{Dir: dir, ExtraConf: map[string]string{"shared_buffers": "lots"}})
	if err == nil {
		t.Fatal("StartPostgres with a bad setting succeeded")
	}
	if !strings.Contains(err.Error(), "shared_buffers") {
		t.Fatalf("error does not include the log tail: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "data")); !os.IsNotExist(err) {
		t.Fatalf("data dir of failed start not removed: %v", err)
	}
	if _, err := StartPostgres(ctx, PostgresOptions{ExtraConf: map[string]string{"a\nb": "x"}}); err == nil {
		t.Fatal("malformed ExtraConf key accepted")
	}
}

// redisDo sends one command in RESP and returns the first reply line.
func redisDo(t *testing.T, addr string, args ...string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := conn.Write([]byte(b.String())); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(line)
}

func TestRedisKillAndStartEmpty(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := StartRedis(ctx, RedisOptions{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.URL() != "redis://"+r.Addr()+"/0" || r.Addr() != fmt.Sprintf("127.0.0.1:%d", r.Port()) {
		t.Fatalf("Addr %q / URL %q", r.Addr(), r.URL())
	}
	if got := redisDo(t, r.Addr(), "SET", "k", "v"); got != "+OK" {
		t.Fatalf("SET = %q", got)
	}
	if got := redisDo(t, r.Addr(), "GET", "k"); got != "$1" {
		t.Fatalf("GET = %q", got)
	}
	if err := r.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := net.DialTimeout("tcp", r.Addr(), time.Second); err == nil {
		t.Fatal("redis still accepts connections after Kill")
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := redisDo(t, r.Addr(), "GET", "k"); got != "$-1" {
		t.Fatalf("GET after restart = %q, want nil", got)
	}
	if err := r.Start(ctx); err == nil {
		t.Fatal("Start of a running redis succeeded")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestFindPostgresBin(t *testing.T) {
	for _, name := range []string{"postgres", "initdb"} {
		p, err := FindPostgresBin(name)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(p) != name {
			t.Fatalf("FindPostgresBin(%q) = %q", name, p)
		}
	}
	if _, err := FindPostgresBin("no-such-postgres-program"); err == nil {
		t.Fatal("found a program that does not exist")
	}
	if a, b := pathVersion("/usr/lib/postgresql/16/bin"), pathVersion("/usr/lib/postgresql/9.6/bin"); a <= b {
		t.Fatalf("pathVersion ordering: 16 -> %v, 9.6 -> %v", a, b)
	}
}

func TestFreePort(t *testing.T) {
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatalf("free port %d not bindable: %v", port, err)
	}
	l.Close()
}

// TestChildrenDieWithParent SIGKILLs a process that started a Postgres and
// a Redis and checks both servers go away, i.e. that the parent-death
// signal survives the switch to the postgres user.
func TestChildrenDieWithParent(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("parent-death signals are Linux-only")
	}
	if os.Getenv("LOCALSVC_HELPER") == "1" {
		helperServe()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestChildrenDieWithParent$")
	cmd.Env = append(os.Environ(), "LOCALSVC_HELPER=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pgAddr, redisAddr, dir string
	if _, err := fmt.Fscanln(out, &pgAddr, &redisAddr, &dir); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper did not report its servers: %v", err)
	}
	defer os.RemoveAll(dir)
	for _, a := range []string{pgAddr, redisAddr} {
		if c, err := net.DialTimeout("tcp", a, time.Second); err != nil {
			t.Fatalf("helper server %s not up: %v", a, err)
		} else {
			c.Close()
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	for _, a := range []string{pgAddr, redisAddr} {
		deadline := time.Now().Add(15 * time.Second)
		for {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err != nil {
				break
			}
			c.Close()
			if time.Now().After(deadline) {
				t.Fatalf("server %s outlived its parent", a)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// The postmaster's immediate shutdown must take its backends along.
	deadline := time.Now().Add(15 * time.Second)
	for len(dirProcs(filepath.Join(dir, "data"))) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("postgres processes outlived their parent: %v", dirProcs(filepath.Join(dir, "data")))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// helperServe runs in the child of TestChildrenDieWithParent: it starts
// both servers, prints where they are and waits to be killed.
func helperServe() {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "tally-helper-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	p, err := StartPostgres(ctx, PostgresOptions{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	r, err := StartRedis(ctx, RedisOptions{Dir: filepath.Join(dir, "redis")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("127.0.0.1:%d %s %s\n", p.Port(), r.Addr(), p.Dir())
	<-ctx.Done() // killed long before this
	os.Exit(1)
}

func TestRetryPortRace(t *testing.T) {
	taken := errors.New("could not bind IPv4 address: Address already in use")
	other := errors.New("FATAL: bad config")
	for _, c := range []struct {
		name          string
		fixed         bool
		errs          []error
		starts, picks int
		wantErr       error
	}{
		{"first try", false, []error{nil}, 1, 0, nil},
		{"port taken once", false, []error{taken, nil}, 2, 1, nil},
		{"port always taken", false, []error{taken, taken, taken, taken}, portRaceAttemptsMax, portRaceAttemptsMax - 1, taken},
		{"another failure", false, []error{other, nil}, 1, 0, other},
		{"fixed port", true, []error{taken, nil}, 1, 0, taken},
	} {
		starts, picks := 0, 0
		err := retryPortRace(c.fixed, func() error { starts++; return c.errs[starts-1] }, func() error { picks++; return nil })
		if err != c.wantErr || starts != c.starts || picks != c.picks {
			t.Errorf("%s: err %v, %d starts, %d picks; want %v, %d, %d", c.name, err, starts, picks, c.wantErr, c.starts, c.picks)
		}
	}
}
