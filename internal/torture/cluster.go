package torture

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/faultproxy"
	"github.com/tallyledger/tally/internal/localsvc"
)

// tallyd is one tallyd child process with its own fault proxies in front of
// PostgreSQL and Redis, and a client connected to it.
type tallyd struct {
	idx  int
	bin  string
	args []string
	// argsByBin overrides args for a binary that lacks some of their flags
	// (the previous release in a rolling upgrade).
	argsByBin map[string][]string
	grpcAddr  string
	httpAddr  string
	logPath   string
	pgProxy   *faultproxy.Proxy
	// pgProxy2 is in front of the standby in a PostgreSQL failover run
	// (nil otherwise); tallyd names both servers.
	pgProxy2   *faultproxy.Proxy
	redisProxy *faultproxy.Proxy
	cl         *client.Client
	hist       *History
	log        *slog.Logger

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
	expected bool // the current process is meant to exit (killed or stopped)
	termed   bool // ... and was asked to with SIGTERM, so it must exit 0
}

// readyTimeout bounds how long a (re)started tallyd may take to answer
// /readyz. It waits for PostgreSQL, which may itself be restarting.
const readyTimeout = 90 * time.Second

// holdSweepInterval is tallyd's --hold-sweep-interval in the torture: short,
// so expiries are written down by the sweeper as well as by writes.
const holdSweepInterval = 2 * time.Second

// newTallyd prepares a tallyd behind fault proxies. standbyTarget, when
// not empty, is a PostgreSQL standby: tallyd then gets a second proxy in
// front of it and a two-host database URL with
// target_session_attrs=read-write, so it connects to whichever server
// accepts writes (the primary, or the standby once promoted).
func newTallyd(idx int, bin, dir, pgTarget, standbyTarget, redisTarget, cacheTTL string, hist *History, log *slog.Logger) (*tallyd, error) {
	t := &tallyd{idx: idx, bin: bin, hist: hist, log: log}
	var err error
	if t.pgProxy, err = faultproxy.New("127.0.0.1:0", pgTarget); err != nil {
		return nil, err
	}
	dbURL := "postgres://postgres@" + t.pgProxy.Addr() + "/tally?sslmode=disable"
	if standbyTarget != "" {
		if t.pgProxy2, err = faultproxy.New("127.0.0.1:0", standbyTarget); err != nil {
			t.pgProxy.Close()
			return nil, err
		}
		dbURL = "postgres://postgres@" + t.pgProxy.Addr() + "," + t.pgProxy2.Addr() +
			"/tally?sslmode=disable&target_session_attrs=read-write"
	}
	if t.redisProxy, err = faultproxy.New("127.0.0.1:0", redisTarget); err != nil {
		t.closePG()
		return nil, err
	}
	gport, err := localsvc.FreePort()
	if err != nil {
		return nil, err
	}
	hport, err := localsvc.FreePort()
	if err != nil {
		return nil, err
	}
	t.grpcAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(gport))
	t.httpAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(hport))
	t.logPath = fmt.Sprintf("%s/tallyd-%d.log", dir, idx)
	t.args = []string{"serve",
		"--database-url", dbURL,
		"--redis-url", "redis://" + t.redisProxy.Addr() + "/0",
		"--grpc-addr", t.grpcAddr,
		"--http-addr", t.httpAddr,
		"--cache-ttl", cacheTTL,
		"--hold-sweep-interval", holdSweepInterval.String(),
		"--cache-op-timeout", "100ms",
		"--cache-breaker-cooldown", "1s",
		"--startup-timeout", "10m",
		"--connect-timeout", "2s",
		"--drain-timeout", "5s",
		"--log-level", "warn",
	}
	return t, nil
}

// childEnv is our environment without TALLY_* variables, which tallyd would
// read as flag defaults behind our back.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "TALLY_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// start launches the process and waits until /readyz answers 200.
func (t *tallyd) start(ctx context.Context) error {
	t.mu.Lock()
	if t.running() {
		t.mu.Unlock()
		return fmt.Errorf("tallyd %d already running", t.idx)
	}
	f, err := os.OpenFile(t.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.mu.Unlock()
		return err
	}
	fmt.Fprintf(f, "=== tally-torture: starting tallyd %d at %s ===\n", t.idx, time.Now().Format(time.RFC3339Nano))
	args := t.args
	if a, ok := t.argsByBin[t.bin]; ok {
		args = a
	}
	cmd := exec.Command(t.bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = childEnv()
	cmd.SysProcAttr = childProcAttr()
	err = cmd.Start()
	f.Close()
	if err != nil {
		t.mu.Unlock()
		return fmt.Errorf("start tallyd %d: %w", t.idx, err)
	}
	done := make(chan struct{})
	t.cmd, t.done, t.expected, t.termed = cmd, done, false, false
	t.mu.Unlock()
	go t.reap(cmd, done)
	return t.waitReady(ctx, done)
}

func (t *tallyd) reap(cmd *exec.Cmd, done chan struct{}) {
	err := cmd.Wait()
	t.mu.Lock()
	expected := t.expected && t.cmd == cmd
	termed := t.termed && t.cmd == cmd
	t.mu.Unlock()
	if termed && err != nil {
		t.log.Error("tallyd failed its graceful shutdown", "tallyd", t.idx, "status", err.Error())
		t.hist.AddCrash(Crash{Tallyd: t.idx, At: time.Now(), Status: err.Error() + " after SIGTERM", LogTail: tail(t.logPath, 1500)})
	}
	if !expected {
		status := "exit 0"
		if err != nil {
			status = err.Error()
		}
		t.log.Error("tallyd exited on its own", "tallyd", t.idx, "status", status)
		t.hist.AddCrash(Crash{Tallyd: t.idx, At: time.Now(), Status: status, LogTail: tail(t.logPath, 1500)})
	}
	close(done)
}

// running reports whether the current process is alive; t.mu must be held.
func (t *tallyd) running() bool {
	if t.done == nil {
		return false
	}
	select {
	case <-t.done:
		return false
	default:
		return true
	}
}

// isRunning reports whether the process is alive.
func (t *tallyd) isRunning() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.running()
}

func (t *tallyd) waitReady(ctx context.Context, done chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+t.httpAddr+"/readyz", nil)
		if resp, err := hc.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-done:
			return fmt.Errorf("tallyd %d exited during startup; log tail:\n%s", t.idx, tail(t.logPath, 2000))
		case <-ctx.Done():
			return fmt.Errorf("tallyd %d not ready: %w; log tail:\n%s", t.idx, ctx.Err(), tail(t.logPath, 2000))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// signal sends sig to the running process, marks its exit as expected and
// waits up to wait for it to be reaped.
func (t *tallyd) signal(sig syscall.Signal, wait time.Duration) (exited bool, err error) {
	t.mu.Lock()
	if !t.running() {
		t.mu.Unlock()
		return true, nil
	}
	t.expected = true
	t.termed = t.termed || sig == syscall.SIGTERM
	cmd, done := t.cmd, t.done
	t.mu.Unlock()
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return false, err
	}
	select {
	case <-done:
		return true, nil
	case <-time.After(wait):
		return false, nil
	}
}

// kill is kill -9.
func (t *tallyd) kill() error {
	exited, err := t.signal(syscall.SIGKILL, 10*time.Second)
	if err == nil && !exited {
		err = fmt.Errorf("tallyd %d survived SIGKILL", t.idx)
	}
	return err
}

// term is a graceful stop as a deployment does it: SIGTERM, then tallyd
// drains (its --drain-timeout is 5s) and must exit 0 well within wait. A
// tallyd that does not is recorded and killed.
func (t *tallyd) term(wait time.Duration) error {
	exited, err := t.signal(syscall.SIGTERM, wait)
	if err != nil {
		return err
	}
	if !exited {
		t.hist.AddCrash(Crash{Tallyd: t.idx, At: time.Now(), Status: fmt.Sprintf("still running %s after SIGTERM", wait),
			LogTail: tail(t.logPath, 1500)})
		return t.kill()
	}
	return nil
}

// stop asks for a graceful shutdown and kills after a while.
func (t *tallyd) stop() {
	if exited, _ := t.signal(syscall.SIGTERM, 15*time.Second); !exited {
		_ = t.kill()
	}
}

// close stops the process and releases the proxies and client.
func (t *tallyd) close() {
	t.stop()
	if t.cl != nil {
		t.cl.Close()
	}
	t.closePG()
	t.redisProxy.Close()
}

// pgProxies returns the proxies in front of PostgreSQL: one, or two in a
// failover run (network faults hit both: tallyd's whole path to the
// database).
func (t *tallyd) pgProxies() []*faultproxy.Proxy {
	if t.pgProxy2 != nil {
		return []*faultproxy.Proxy{t.pgProxy, t.pgProxy2}
	}
	return []*faultproxy.Proxy{t.pgProxy}
}

func (t *tallyd) closePG() {
	for _, p := range t.pgProxies() {
		p.Close()
	}
}

// heal clears every network fault in front of this tallyd.
func (t *tallyd) heal() {
	for _, p := range t.pgProxies() {
		p.Heal()
	}
	t.redisProxy.Heal()
}

// tail returns the last n bytes of a file.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	_, _ = f.ReadAt(b, off)
	return strings.TrimSpace(string(b))
}

// serveFlags returns the flags `bin serve -h` lists.
func serveFlags(ctx context.Context, bin string) (map[string]bool, error) {
	cmd := exec.CommandContext(ctx, bin, "serve", "-h")
	cmd.Env = childEnv()
	out, _ := cmd.CombinedOutput() // -h exits non-zero
	flags := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if f, ok := strings.CutPrefix(strings.TrimSpace(line), "-"); ok {
			if name, _, _ := strings.Cut(f, " "); name != "" {
				flags[name] = true
			}
		}
	}
	if len(flags) == 0 {
		return nil, fmt.Errorf("%s serve -h lists no flags:\n%s", bin, out)
	}
	return flags, nil
}

// filterArgs drops "--name value" pairs whose flag is not in known, and
// returns what it dropped.
func filterArgs(args []string, known map[string]bool) (kept, dropped []string) {
	for i := 0; i < len(args); i++ {
		name, isFlag := strings.CutPrefix(args[i], "--")
		if !isFlag || known[name] {
			kept = append(kept, args[i])
			continue
		}
		dropped = append(dropped, args[i])
		if i+1 < len(args) && !strings.HasPrefix(args[i+1], "--") {
			i++ // its value
		}
	}
	return kept, dropped
}
