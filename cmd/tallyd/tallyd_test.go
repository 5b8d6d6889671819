package main_test

// These tests build the tallyd binary once and run it as a subprocess, the
// way operators do: against a per-package database on the shared PostgreSQL
// (cloned from the migrated template) or against private servers where a
// test needs to hurt them.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

var (
	// tallydBin is the binary built by TestMain.
	tallydBin string
	// dbURL is this package's own migrated database.
	dbURL string
	// adminKey is an admin API key in dbURL.
	adminKey string
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "tallyd-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	tallydBin = filepath.Join(dir, "tallyd")
	build := exec.Command("go", "build", "-o", tallydBin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build tallyd: %v\n%s", err, out)
		return 1
	}
	return testdb.Main(m, tallytest.DBOptions(), func(db *testdb.DB) {
		dbURL = db.URL()
		// tallyd serve refuses to start without an active API key: make the
		// first admin key the way an operator does.
		out, err := exec.Command(tallydBin, "keys", "create", "--database-url", dbURL, "--name", "admin", "--role", "admin", "--quiet").Output()
		if err != nil {
			fmt.Fprintf(os.Stderr, "tallyd keys create: %v\n", err)
			os.Exit(1)
		}
		adminKey = strings.TrimSpace(string(out))
	})
}

// newAdminKey makes an admin API key in the database at url with `tallyd
// keys create` and returns it.
func newAdminKey(t *testing.T, url string) string {
	t.Helper()
	code, out := runToExit(t, "keys", "create", "--database-url", url, "--name", "admin-"+tallytest.RandomSuffix(), "--role", "admin", "--quiet")
	if code != 0 {
		t.Fatalf("tallyd keys create: exit %d: %s", code, out)
	}
	return strings.TrimSpace(out)
}

// syncBuffer collects a process's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a running tallyd.
type proc struct {
	t        *testing.T
	cmd      *exec.Cmd
	out      *syncBuffer
	done     chan struct{}
	waitErr  error
	grpcAddr string
	httpAddr string
}

// childEnv is our environment without TALLY_* variables (tallyd reads its
// flags from them), plus extra.
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TALLY_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// run starts tallyd with args; it is killed at cleanup if still running.
func run(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(tallydBin, args...)
	p.cmd.Env = env
	if env == nil {
		p.cmd.Env = childEnv()
	}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.waitErr = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		if p.running() {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("tallyd %s output:\n%s", strings.Join(args, " "), p.out.String())
		}
	})
	return p
}

// addrs returns a free gRPC and HTTP address.
func addrs(t *testing.T) (grpcAddr, httpAddr string) {
	t.Helper()
	g, err := localsvc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	h, err := localsvc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return "127.0.0.1:" + strconv.Itoa(g), "127.0.0.1:" + strconv.Itoa(h)
}

// serve starts `tallyd serve` on the given addresses.
func serve(t *testing.T, databaseURL, grpcAddr, httpAddr string, extra ...string) *proc {
	t.Helper()
	args := append([]string{"serve", "--database-url", databaseURL, "--grpc-addr", grpcAddr, "--http-addr", httpAddr, "--log-level", "warn"}, extra...)
	p := run(t, nil, args...)
	p.grpcAddr, p.httpAddr = grpcAddr, httpAddr
	return p
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// waitReady waits until /readyz answers 200.
func (p *proc) waitReady(limit time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		if !p.running() {
			p.t.Fatalf("tallyd exited before it was ready (%v):\n%s", p.waitErr, p.out.String())
		}
		code, _ := httpGet("http://" + p.httpAddr + "/readyz")
		if code == http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("tallyd not ready within %v:\n%s", limit, p.out.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// wait waits for the process to exit and returns its exit code (-1 when
// killed by a signal).
func (p *proc) wait(limit time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit):
		p.t.Fatalf("tallyd still running after %v:\n%s", limit, p.out.String())
	}
	return p.cmd.ProcessState.ExitCode()
}

func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
}

// stop ends the process with SIGTERM and expects a clean exit.
func (p *proc) stop() {
	p.t.Helper()
	p.signal(syscall.SIGTERM)
	if code := p.wait(30 * time.Second); code != 0 {
		p.t.Fatalf("tallyd exited with %d after SIGTERM:\n%s", code, p.out.String())
	}
}

func httpGet(url string) (int, []byte) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// newClient is a retrying client that reconnects quickly to a restarted
// server (gRPC's default reconnect backoff starts at a second).
func newClient(t *testing.T, addr, apiKey string, policy client.Policy, extra ...grpc.DialOption) *client.Client {
	t.Helper()
	cl, err := client.New(client.Config{Addr: addr, APIKey: apiKey, Policy: policy, DialOptions: append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}),
	}, extra...)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newAccount creates a customer account in a fresh currency and credits it.
func newAccount(t *testing.T, cl *client.Client, funds int64) string {
	t.Helper()
	ctx := ctxT(t)
	cur := "D" + strings.ToUpper(tallytest.RandomSuffix()[:10])
	a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: cur})
	if err != nil {
		t.Fatalf("CreateAccount: %v", err)
	}
	if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: funds, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("Credit: %v", err)
	}
	return a.GetAccountId()
}

// openStore opens the database for checks.
func openStore(t *testing.T, url string) *tallytest.Env {
	t.Helper()
	st, err := store.Open(context.Background(), store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return &tallytest.Env{Store: st}
}

// charges records keys sent and acknowledged.
type charges struct {
	mu       sync.Mutex
	amount   map[string]int64
	transfer map[string]string
	failures []string
	acks     atomic.Int64
}

func newCharges() *charges {
	return &charges{amount: map[string]int64{}, transfer: map[string]string{}}
}

func (c *charges) waitAcks(t *testing.T, n int64, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for c.acks.Load() < n {
		if time.Now().After(deadline) {
			c.mu.Lock()
			defer c.mu.Unlock()
			t.Fatalf("only %d of %d charges acknowledged within %v; failures: %v", c.acks.Load(), n, limit, c.failures)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// chargeUntilDefinite sends one charge with the retrying client, resending
// the same key after every retryable failure until a definite answer.
func (c *charges) chargeUntilDefinite(ctx context.Context, cl *client.Client, acct string, amount int64) {
	req := &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()}
	c.mu.Lock()
	c.amount[req.IdempotencyKey] = amount
	c.mu.Unlock()
	deadline := time.Now().Add(60 * time.Second)
	for {
		r, err := cl.Charge(ctx, req)
		if err == nil {
			c.mu.Lock()
			c.transfer[req.IdempotencyKey] = r.GetTransfer().GetTransferId()
			c.mu.Unlock()
			c.acks.Add(1)
			return
		}
		if retry, _ := client.Retryable(err); !retry || time.Now().After(deadline) || ctx.Err() != nil {
			c.mu.Lock()
			c.failures = append(c.failures, fmt.Sprintf("charge %s: %v", req.IdempotencyKey, err))
			c.mu.Unlock()
			return
		}
	}
}

// check asserts every key was acknowledged and applied exactly once with its
// amount, each acknowledged transfer is the stored one, the account holds
// funds minus the charges, and the books balance.
func (c *charges) check(t *testing.T, env *tallytest.Env, acct string, funds int64) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.failures) > 0 {
		t.Fatalf("%d charges failed; first: %s", len(c.failures), strings.Join(c.failures[:min(5, len(c.failures))], "; "))
	}
	var keys []string
	var sum int64
	for k, a := range c.amount {
		keys = append(keys, k)
		sum += a
	}
	if len(c.transfer) != len(keys) {
		t.Fatalf("%d of %d keys acknowledged", len(c.transfer), len(keys))
	}
	ctx := ctxT(t)
	rows, err := env.Store.Pool().Query(ctx, `SELECT idempotency_key, transfer_id::text, amount FROM transfers WHERE idempotency_key = ANY($1)`, keys)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for rows.Next() {
		var k, id string
		var amount int64
		if err := rows.Scan(&k, &id, &amount); err != nil {
			t.Fatal(err)
		}
		seen[k]++
		if amount != c.amount[k] || id != c.transfer[k] {
			t.Fatalf("key %s: stored transfer %s of %d, acknowledged %s of %d", k, id, amount, c.transfer[k], c.amount[k])
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if seen[k] != 1 {
			t.Fatalf("key %s applied %d times, want exactly once", k, seen[k])
		}
	}
	var balance, version int64
	if err := env.Store.Pool().QueryRow(ctx, `SELECT balance, version FROM accounts WHERE account_id = $1`, acct).Scan(&balance, &version); err != nil {
		t.Fatal(err)
	}
	if balance != funds-sum || version != int64(len(keys))+1 {
		t.Fatalf("account %s: balance %d at v%d, want %d at v%d", acct, balance, version, funds-sum, len(keys)+1)
	}
	env.CheckBooks(t)
}

// kill -9 of tallyd during a stream of concurrent charges, twice; clients
// retry the same keys until they get definite answers: every key is applied
// exactly once and every acknowledged charge is there.
func TestKill9DuringCharges(t *testing.T) {
	grpcAddr, httpAddr := addrs(t)
	p := serve(t, dbURL, grpcAddr, httpAddr)
	p.waitReady(30 * time.Second)
	// Without --redis-url there is no cache, and /healthz says so.
	if code, body := httpGet("http://" + httpAddr + "/healthz"); code != http.StatusOK || !strings.Contains(string(body), `"cache":{"state":"disabled"}`) {
		t.Fatalf("/healthz without a cache: %d %s", code, body)
	}
	// Count the attempts that failed, to show the kills cut calls.
	var failedAttempts atomic.Int64
	countFailures := grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if err != nil {
			failedAttempts.Add(1)
		}
		return err
	})
	cl := newClient(t, grpcAddr, adminKey, client.Policy{CallTimeout: 3 * time.Second, RetryAttemptsMax: 20, BackoffBase: 20 * time.Millisecond, BackoffMax: 300 * time.Millisecond}, countFailures)
	const funds = 1_000_000
	acct := newAccount(t, cl, funds)

	cs := newCharges()
	ctx, abort := context.WithCancel(context.Background())
	stop := make(chan struct{})
	var stopOnce sync.Once
	var wg sync.WaitGroup
	t.Cleanup(func() { abort(); stopOnce.Do(func() { close(stop) }); wg.Wait() })
	for range 4 {
		wg.Go(func() {
			for i := 0; i < 2000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				cs.chargeUntilDefinite(ctx, cl, acct, 1+rand.Int64N(9))
			}
		})
	}
	cs.waitAcks(t, 40, 30*time.Second)
	for range 2 {
		failedBefore := failedAttempts.Load()
		p.signal(syscall.SIGKILL)
		if code := p.wait(10 * time.Second); code != -1 {
			t.Fatalf("tallyd exit code %d after SIGKILL, want killed by the signal", code)
		}
		before := cs.acks.Load()
		p = serve(t, dbURL, grpcAddr, httpAddr)
		p.waitReady(30 * time.Second)
		cs.waitAcks(t, before+40, 30*time.Second)
		if failedAttempts.Load() == failedBefore {
			t.Fatal("no call failed across a kill -9: the kill cut nothing")
		}
	}
	stopOnce.Do(func() { close(stop) })
	wg.Wait()
	p.stop()
	t.Logf("%d charges across two kill -9s; %d attempts failed and were retried", len(cs.amount), failedAttempts.Load())
	cs.check(t, openStore(t, dbURL), acct, funds)
}

// lockAccount holds the account's row lock in an open transaction, so
// charges on it wait (stay in flight) until release.
func lockAccount(t *testing.T, url, acct string) (release func()) {
	t.Helper()
	ctx := ctxT(t)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE`, acct); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			_ = tx.Rollback(context.Background())
			_ = conn.Close(context.Background())
		})
	}
	t.Cleanup(release)
	return release
}

// waitLockWaiters waits until some backend of the database waits on a lock.
func waitLockWaiters(t *testing.T, url string) {
	t.Helper()
	ctx := ctxT(t)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	deadline := time.Now().Add(20 * time.Second)
	for {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND application_name LIKE 'tallyd%' AND wait_event_type = 'Lock'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no charge is waiting for the account lock")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// inflight sends n charges on acct through the raw client (no retries), each
// with its own key; they block on the account lock.
func inflight(cl *client.Client, acct string, n int) (keys []string, errs []error, wait func()) {
	keys, errs = make([]string, n), make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		keys[i] = client.NewIdempotencyKey()
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, errs[i] = cl.Raw().Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: 1, IdempotencyKey: keys[i]})
		})
	}
	return keys, errs, wg.Wait
}

func countTransfers(t *testing.T, env *tallytest.Env, keys []string) map[string]int {
	t.Helper()
	rows, err := env.Store.Pool().Query(ctxT(t), `SELECT idempotency_key FROM transfers WHERE idempotency_key = ANY($1)`, keys)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	n := map[string]int{}
	for _, k := range got {
		n[k]++
	}
	return n
}

// SIGTERM: tallyd stops accepting at once, lets in-flight calls finish, and
// exits 0 within the drain time; new connections are refused.
func TestSIGTERMDrainsInFlightCalls(t *testing.T) {
	grpcAddr, httpAddr := addrs(t)
	const drain = 5 * time.Second
	p := serve(t, dbURL, grpcAddr, httpAddr, "--drain-timeout", drain.String())
	p.waitReady(30 * time.Second)
	cl := newClient(t, grpcAddr, adminKey, client.Policy{})
	acct := newAccount(t, cl, 1000)
	env := openStore(t, dbURL)

	release := lockAccount(t, dbURL, acct)
	keys, errs, wait := inflight(cl, acct, 5)
	waitLockWaiters(t, dbURL)

	termAt := time.Now()
	p.signal(syscall.SIGTERM)
	// Stop accepting: new connections are refused while calls drain.
	deadline := time.Now().Add(3 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", grpcAddr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("tallyd still accepts gRPC connections 3s after SIGTERM")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if !p.running() {
		t.Fatalf("tallyd exited with calls in flight:\n%s", p.out.String())
	}
	release()
	wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("in-flight charge %d: %v, want it to finish during the drain", i, err)
		}
	}
	if code := p.wait(drain + 5*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0:\n%s", code, p.out.String())
	}
	if el := time.Since(termAt); el > drain {
		t.Fatalf("tallyd took %v to exit after SIGTERM, want within the drain time %v", el, drain)
	}
	if _, err := net.DialTimeout("tcp", grpcAddr, time.Second); err == nil {
		t.Fatal("gRPC port still accepts connections after exit")
	}
	for k, n := range countTransfers(t, env, keys) {
		if n != 1 {
			t.Fatalf("key %s applied %d times", k, n)
		}
	}
	if n := len(countTransfers(t, env, keys)); n != len(keys) {
		t.Fatalf("%d of %d drained charges stored", n, len(keys))
	}
	env.CheckBooks(t)
}

// SIGTERM with calls that cannot finish: tallyd still exits within a bound
// after the drain time; the cut calls' keys, retried on a new tallyd, are
// each applied exactly once.
func TestSIGTERMDrainTimeout(t *testing.T) {
	grpcAddr, httpAddr := addrs(t)
	const drain = time.Second
	p := serve(t, dbURL, grpcAddr, httpAddr, "--drain-timeout", drain.String())
	p.waitReady(30 * time.Second)
	cl := newClient(t, grpcAddr, adminKey, client.Policy{})
	acct := newAccount(t, cl, 1000)
	env := openStore(t, dbURL)

	release := lockAccount(t, dbURL, acct)
	keys, errs, wait := inflight(cl, acct, 3)
	waitLockWaiters(t, dbURL)
	termAt := time.Now()
	p.signal(syscall.SIGTERM)
	code := p.wait(drain + 15*time.Second)
	exitAfter := time.Since(termAt)
	release()
	wait()
	t.Logf("exited %v after SIGTERM with code %d", exitAfter, code)
	if code != 0 {
		t.Fatalf("exit code %d, want 0:\n%s", code, p.out.String())
	}
	if exitAfter > drain+3*time.Second {
		t.Errorf("tallyd took %v to exit after SIGTERM with stuck calls; want about the drain time %v", exitAfter, drain)
	}
	for i, err := range errs {
		if retry, _ := client.Retryable(err); err != nil && !retry {
			t.Fatalf("cut call %d: %v, want a retryable code (or success)", i, err)
		}
	}
	// Retry every key on a new tallyd: each is applied exactly once.
	p = serve(t, dbURL, grpcAddr, httpAddr)
	p.waitReady(30 * time.Second)
	for _, k := range keys {
		if _, err := cl.Charge(ctxT(t), &tallyv1.ChargeRequest{AccountId: acct, Amount: 1, IdempotencyKey: k}); err != nil {
			t.Fatalf("retry of %s: %v", k, err)
		}
	}
	n := countTransfers(t, env, keys)
	for _, k := range keys {
		if n[k] != 1 {
			t.Fatalf("key %s applied %d times, want exactly once", k, n[k])
		}
	}
	p.stop()
	env.CheckBooks(t)
}

// newDatabase returns a fresh database on the shared server: a clone of the
// migrated template, or an empty one.
func newDatabase(t *testing.T, migrated bool) *testdb.DB {
	t.Helper()
	opts := tallytest.DBOptions()
	if !migrated {
		opts = testdb.Options{TemplateName: "tally_template_empty_v1"}
	}
	db, err := testdb.New(ctxT(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

// runToExit runs tallyd to completion and returns its exit code and output.
func runToExit(t *testing.T, args ...string) (int, string) {
	t.Helper()
	p := run(t, nil, args...)
	code := p.wait(60 * time.Second)
	return code, p.out.String()
}

// serve refuses a database with synchronous_commit off unless
// --allow-unsafe-durability accepts the risk.
func TestServeRefusesUnsafeDurability(t *testing.T) {
	t.Parallel()
	db := newDatabase(t, true)
	conn, err := pgx.Connect(ctxT(t), db.URL())
	if err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(ctxT(t), "ALTER DATABASE "+pgx.Identifier{db.Name()}.Sanitize()+" SET synchronous_commit = off")
	conn.Close(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	grpcAddr, httpAddr := addrs(t)
	code, out := runToExit(t, "serve", "--database-url", db.URL(), "--grpc-addr", grpcAddr, "--http-addr", httpAddr)
	if code == 0 || !strings.Contains(out, "synchronous_commit=off") || !strings.Contains(out, "--allow-unsafe-durability") {
		t.Fatalf("serve on synchronous_commit=off: exit %d, output:\n%s\nwant a refusal naming synchronous_commit and --allow-unsafe-durability", code, out)
	}
	if c, err := net.DialTimeout("tcp", grpcAddr, time.Second); err == nil {
		c.Close()
		t.Fatal("something listens on the gRPC address of a refused tallyd")
	}

	newAdminKey(t, db.URL())
	p := serve(t, db.URL(), grpcAddr, httpAddr, "--allow-unsafe-durability")
	p.waitReady(30 * time.Second)
	if out := p.out.String(); !strings.Contains(out, "unsafe durability") {
		t.Fatalf("no warning logged when serving with unsafe durability:\n%s", out)
	}
	p.stop()
}

// serve refuses an un-migrated database and says to run `tallyd migrate`;
// `tallyd migrate` fixes it, and so does `serve --migrate`.
func TestServeRefusesUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	db := newDatabase(t, false)
	grpcAddr, httpAddr := addrs(t)
	code, out := runToExit(t, "serve", "--database-url", db.URL(), "--grpc-addr", grpcAddr, "--http-addr", httpAddr)
	if code == 0 || !strings.Contains(out, "tallyd migrate") {
		t.Fatalf("serve on an empty database: exit %d, output:\n%s\nwant a refusal mentioning `tallyd migrate`", code, out)
	}
	if code, out := runToExit(t, "migrate", "--database-url", db.URL()); code != 0 {
		t.Fatalf("tallyd migrate: exit %d:\n%s", code, out)
	}
	key := newAdminKey(t, db.URL())
	p := serve(t, db.URL(), grpcAddr, httpAddr)
	p.waitReady(30 * time.Second)
	cl := newClient(t, grpcAddr, key, client.Policy{})
	newAccount(t, cl, 100)
	p.stop()
	// Migrating again is a no-op.
	if code, out := runToExit(t, "migrate", "--database-url", db.URL()); code != 0 {
		t.Fatalf("tallyd migrate again: exit %d:\n%s", code, out)
	}

	db2 := newDatabase(t, false)
	// An empty database can hold no key before it is migrated: this part is
	// about --migrate, so it runs without authentication.
	p = serve(t, db2.URL(), grpcAddr, httpAddr, "--migrate", "--insecure-no-auth")
	p.waitReady(30 * time.Second)
	cl2 := newClient(t, grpcAddr, "", client.Policy{})
	newAccount(t, cl2, 100)
	p.stop()
}

type healthz struct {
	Status       string `json:"status"`
	Dependencies map[string]struct {
		State  string `json:"state"`
		Detail string `json:"detail"`
	} `json:"dependencies"`
}

func getHealthz(t *testing.T, httpAddr string) (int, healthz) {
	t.Helper()
	code, body := httpGet("http://" + httpAddr + "/healthz")
	var h healthz
	if err := json.Unmarshal(body, &h); err != nil {
		t.Fatalf("/healthz answered %d with %q: %v", code, body, err)
	}
	return code, h
}

// /healthz reports each dependency as JSON, and the cache as degraded (not
// down) while Redis is dead; /readyz and grpc health stay up.
func TestHealthz(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not on PATH")
	}
	r, err := localsvc.StartRedis(ctxT(t), localsvc.RedisOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	grpcAddr, httpAddr := addrs(t)
	p := serve(t, dbURL, grpcAddr, httpAddr, "--redis-url", r.URL(), "--cache-failures-max", "2", "--cache-breaker-cooldown", "300ms")
	p.waitReady(30 * time.Second)
	cl := newClient(t, grpcAddr, adminKey, client.Policy{})
	acct := newAccount(t, cl, 100)
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	expect := func(when, overall, cacheState string) {
		t.Helper()
		code, h := getHealthz(t, httpAddr)
		if code != http.StatusOK || h.Status != overall || h.Dependencies["postgres"].State != "ok" || h.Dependencies["cache"].State != cacheState {
			t.Fatalf("/healthz %s: %d %+v, want 200 with status %q, postgres ok, cache %q", when, code, h, overall, cacheState)
		}
		if code, body := httpGet("http://" + httpAddr + "/readyz"); code != http.StatusOK || !strings.Contains(string(body), `"status":"`+overall+`"`) {
			t.Fatalf("/readyz %s: %d %s, want 200 with status %q", when, code, body, overall)
		}
		for _, svc := range []string{"", "tally.v1.LedgerService"} {
			resp, err := hc.Check(ctxT(t), &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("grpc health %q %s: %v %v, want SERVING", svc, when, resp.GetStatus(), err)
			}
		}
	}
	read := func() *tallyv1.Balance {
		t.Helper()
		b, err := cl.Raw().GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: acct})
		if err != nil || b.GetBalance() != 100 {
			t.Fatalf("GetBalance: %v %v", b, err)
		}
		return b
	}
	read()
	expect("with Redis up", "ok", "ok")

	if err := r.Kill(); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if b := read(); b.GetSource() != tallyv1.BalanceSource_BALANCE_SOURCE_STORE {
			t.Fatalf("read with Redis dead from %v", b.GetSource())
		}
	}
	expect("with Redis dead", "degraded", "degraded")
	// The metrics show it too: failed calls, and a breaker that is not closed.
	_, metrics := httpGet("http://" + httpAddr + "/metrics")
	if !strings.Contains(string(metrics), `tally_cache_breaker_state{state="closed"} 0`) ||
		regexp.MustCompile(`(?m)^tally_cache_errors_total [1-9]`).Find(metrics) == nil {
		t.Fatalf("/metrics with Redis dead: %s", regexp.MustCompile(`(?m)^tally_cache.*$`).FindAll(metrics, -1))
	}

	if err := r.Start(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		time.Sleep(100 * time.Millisecond)
		read()
		if _, h := getHealthz(t, httpAddr); h.Dependencies["cache"].State == "ok" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("cache not ok again within 10s of Redis coming back")
		}
	}
	expect("after Redis came back", "ok", "ok")
	p.stop()
}

// procsUnder returns the live processes whose working directory or command
// line is inside dir.
func procsUnder(dir string) []string {
	ents, _ := os.ReadDir("/proc")
	var found []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		if i := bytes.LastIndexByte(stat, ')'); i < 0 || len(stat) < i+3 || stat[i+2] == 'Z' || stat[i+2] == 'X' {
			continue // zombies hold nothing
		}
		cwd, _ := os.Readlink("/proc/" + e.Name() + "/cwd")
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.HasPrefix(cwd, dir) || bytes.Contains(cmdline, []byte(dir)) {
			found = append(found, e.Name()+" "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return found
}

// `tallyd dev` starts a private PostgreSQL and Redis, answers a charge, and
// on SIGINT stops cleanly, leaving no server process and no data behind.
func TestDevStartsAndCleansUp(t *testing.T) {
	t.Parallel()
	if _, err := localsvc.FindPostgresBin("postgres"); err != nil {
		t.Skipf("PostgreSQL server binaries not installed: %v", err)
	}
	_, redisErr := exec.LookPath("redis-server")
	// A temp dir of our own, as TMPDIR, so everything dev creates is in it.
	// It must be traversable by the postgres user when we run as root.
	tmp, err := os.MkdirTemp("", "tallyd-dev-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	grpcAddr, httpAddr := addrs(t)
	p := run(t, childEnv("TMPDIR="+tmp), "dev", "--grpc-addr", grpcAddr, "--http-addr", httpAddr)
	p.grpcAddr, p.httpAddr = grpcAddr, httpAddr
	p.waitReady(2 * time.Minute)

	servers := strings.Join(procsUnder(tmp), "\n")
	if !strings.Contains(servers, "postgres") || (redisErr == nil && !strings.Contains(servers, "redis")) {
		t.Fatalf("want the private postgres (and redis, when installed) running under %s, found:\n%s", tmp, servers)
	}
	if redisErr == nil {
		if _, h := getHealthz(t, httpAddr); h.Dependencies["cache"].State != "ok" {
			t.Fatalf("dev /healthz: %+v, want the private Redis in use", h)
		}
	}

	// dev made an admin key and printed it as an export line.
	keyRE := regexp.MustCompile(`export TALLY_API_KEY=(tly_\S+)`)
	var m []string
	for deadline := time.Now().Add(10 * time.Second); m == nil; time.Sleep(20 * time.Millisecond) {
		if m = keyRE.FindStringSubmatch(p.out.String()); m == nil && time.Now().After(deadline) {
			t.Fatalf("tallyd dev printed no API key:\n%s", p.out.String())
		}
	}
	cl := newClient(t, grpcAddr, m[1], client.Policy{})
	acct := newAccount(t, cl, 100)
	req := &tallyv1.ChargeRequest{AccountId: acct, Amount: 30, IdempotencyKey: client.NewIdempotencyKey()}
	r1, err := cl.Charge(ctxT(t), req)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := cl.Charge(ctxT(t), req)
	if err != nil || !r2.GetReplayed() || r2.GetTransfer().GetTransferId() != r1.GetTransfer().GetTransferId() || r2.GetBalance().GetBalance() != 70 {
		t.Fatalf("charge replay: %v %v (first %v)", r2, err, r1)
	}

	p.signal(syscall.SIGINT)
	if code := p.wait(60 * time.Second); code != 0 {
		t.Fatalf("tallyd dev exited with %d after SIGINT:\n%s", code, p.out.String())
	}
	// The servers' processes may take a moment to be reaped by init.
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := procsUnder(tmp)
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes left behind by tallyd dev: %v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ents, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) > 0 {
		t.Fatalf("tallyd dev left %v in its temp dir", names)
	}
	if c, err := net.DialTimeout("tcp", grpcAddr, time.Second); err == nil {
		c.Close()
		t.Fatal("gRPC port still open after tallyd dev stopped")
	}
}
