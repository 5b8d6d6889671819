package cache

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/tallyledger/tally/internal/faultproxy"
)

// All tests run against a real Redis: the promises are about Redis
// behaviour (Lua atomicity, PTTL, READONLY, timeouts on real sockets), which
// a mock would only restate.

// sharedRedisURL is the shared Redis used by tests that do not hurt it. Keys
// get a random prefix so that parallel test runs never see each other.
func sharedRedisURL() string {
	if u := os.Getenv("TALLY_TEST_REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

func sharedRedisAddr(t *testing.T) string {
	t.Helper()
	opt, err := redis.ParseURL(sharedRedisURL())
	if err != nil {
		t.Fatal(err)
	}
	return opt.Addr
}

// requireSharedRedis skips when the shared Redis is not there, rather than
// failing with a wall of timeouts; CI starts it, so there it really runs.
func requireSharedRedis(t testing.TB) {
	t.Helper()
	opt, err := redis.ParseURL(sharedRedisURL())
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("shared redis %s not reachable: %v", sharedRedisURL(), err)
		}
		t.Skipf("shared redis %s not reachable: %v", sharedRedisURL(), err)
	}
}

// logBuf collects log output so tests can check state-change logging.
type logBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// newCache builds a cache on url with a random key prefix and removes its
// keys at the end. Zero cfg fields take test-friendly values.
func newCache(t testing.TB, url string, cfg Config) (*Cache, *logBuf) {
	t.Helper()
	cfg.URL = url
	if cfg.KeyPrefix == "" {
		cfg.KeyPrefix = "tallytest:" + uuid.NewString() + ":"
	}
	lb := &logBuf{}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(lb, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cleanupPrefix(cfg.KeyPrefix)
		_ = c.Close()
	})
	return c, lb
}

// cleanupPrefix deletes a test's keys from the shared Redis, best-effort.
func cleanupPrefix(prefix string) {
	opt, err := redis.ParseURL(sharedRedisURL())
	if err != nil {
		return
	}
	rc := redis.NewClient(opt)
	defer rc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	iter := rc.Scan(ctx, 0, prefix+"*", 100).Iterator()
	for iter.Next(ctx) {
		rc.Del(ctx, iter.Val())
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// proxied puts a fault proxy in front of the shared Redis and returns it
// with the URL to reach Redis through it.
func proxied(t *testing.T) (*faultproxy.Proxy, string) {
	t.Helper()
	p, err := faultproxy.New("127.0.0.1:0", sharedRedisAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	opt, _ := redis.ParseURL(sharedRedisURL())
	return p, fmt.Sprintf("redis://%s/%d", p.Addr(), opt.DB)
}

// privateRedis is a redis-server owned by one test, for faults that would
// hurt the shared one (kill, restart empty, read-only).
type privateRedis struct {
	t    testing.TB
	port int
	mu   sync.Mutex
	cmd  *exec.Cmd
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func startPrivateRedis(t testing.TB) *privateRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not on PATH")
	}
	r := &privateRedis{t: t, port: freePort(t)}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *privateRedis) url() string  { return fmt.Sprintf("redis://127.0.0.1:%d/0", r.port) }
func (r *privateRedis) addr() string { return fmt.Sprintf("127.0.0.1:%d", r.port) }

// start (re)starts the server, empty, on its port and waits until it answers.
func (r *privateRedis) start() {
	r.t.Helper()
	cmd := exec.Command("redis-server", "--save", "", "--appendonly", "no",
		"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--loglevel", "warning")
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.mu.Lock()
	r.cmd = cmd
	r.mu.Unlock()
	rc := redis.NewClient(&redis.Options{Addr: r.addr(), MaxRetries: -1})
	defer rc.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := rc.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			r.stop()
			r.t.Fatalf("private redis on %d did not start: %v", r.port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop kills the server (SIGKILL: a crash, not a shutdown) and reaps it.
func (r *privateRedis) stop() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}

// client is a plain client on the private server, outside any breaker.
func (r *privateRedis) client() *redis.Client {
	rc := redis.NewClient(&redis.Options{Addr: r.addr(), MaxRetries: -1})
	r.t.Cleanup(func() { _ = rc.Close() })
	return rc
}

func bal(id uuid.UUID, version, balance int64) Balance {
	return Balance{
		AccountID:   id,
		Currency:    "USD",
		Balance:     balance,
		CreditLimit: 1000,
		Available:   balance + 1000,
		Version:     version,
		AsOf:        time.Now().UTC(),
	}
}

// mustHit asserts a hit with the given version and balance.
func mustHit(t *testing.T, c *Cache, id uuid.UUID, version, balance int64) Balance {
	t.Helper()
	got, ok := c.Get(context.Background(), id)
	if !ok {
		t.Fatalf("Get %s: miss, want v%d; status %+v", id, version, c.Status())
	}
	if got.Version != version || got.Balance != balance || got.AccountID != id {
		t.Fatalf("Get %s: got v%d balance %d account %s, want v%d balance %d",
			id, got.Version, got.Balance, got.AccountID, version, balance)
	}
	return got
}

func mustMiss(t *testing.T, c *Cache, id uuid.UUID) {
	t.Helper()
	if got, ok := c.Get(context.Background(), id); ok {
		t.Fatalf("Get %s: hit %+v, want miss", id, got)
	}
}

// timedGet returns the outcome and duration of one Get.
func timedGet(c *Cache, id uuid.UUID) (bool, time.Duration) {
	start := time.Now()
	_, ok := c.Get(context.Background(), id)
	return ok, time.Since(start)
}

// eventually polls cond every 10ms until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
