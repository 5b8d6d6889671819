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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// RedisOptions configures StartRedis.
type RedisOptions struct {
	// Dir is the server's working directory, also holding redis.log. If
	// empty, a fresh directory is created with os.MkdirTemp and removed by
	// Close.
	Dir string
	// Port is the TCP port to listen on at 127.0.0.1; 0 picks a free one.
	Port int
	// Logger receives lifecycle events. Nil discards them.
	Logger *slog.Logger
	// Args are extra redis-server arguments, appended to the command line,
	// e.g. {"--replicaof", "127.0.0.1", "6380"}.
	Args []string
}

// SentinelOptions configures StartSentinel.
type SentinelOptions struct {
	// Dir, Port and Logger are as in RedisOptions.
	Dir    string
	Port   int
	Logger *slog.Logger
	// MasterName and MasterAddr (host:port) name the monitored master.
	MasterName string
	MasterAddr string
	// Quorum is how many Sentinels must agree the master is down.
	Quorum int
	// DownAfter is how long the master must not answer before a Sentinel
	// considers it down; FailoverTimeout bounds one failover attempt.
	DownAfter       time.Duration
	FailoverTimeout time.Duration
}

// Redis is a private, non-persistent Redis server run as a child process.
// Its methods are safe for concurrent use.
type Redis struct {
	bin     string
	args    []string // extra arguments (RedisOptions.Args)
	conf    string   // sentinel: the config file it owns and rewrites
	dir     string
	ownDir  bool
	logPath string
	log     *slog.Logger
	fixed   bool

	opMu sync.Mutex // serializes Start and Close

	mu     sync.Mutex // guards the fields below
	port   int
	cur    *child
	closed bool
}

// redisStartTimeout bounds how long a Start waits for PONG when the
// caller's context has no deadline.
const redisStartTimeout = 30 * time.Second

// StartRedis starts redis-server (found in PATH) on 127.0.0.1 with
// persistence disabled (--save "" --appendonly no), so every start begins
// empty, and waits until it answers PING.
func StartRedis(ctx context.Context, opts RedisOptions) (_ *Redis, err error) {
	r := &Redis{log: nopLogger(opts.Logger), port: opts.Port, fixed: opts.Port != 0, args: opts.Args}
	if err := r.launch(ctx, opts.Dir, nil); err != nil {
		return nil, err
	}
	return r, nil
}

// StartSentinel starts a Redis Sentinel (redis-server --sentinel) on
// 127.0.0.1 monitoring one master, and waits until it answers PING. Kill,
// Start and Close work as for a Redis server. The Sentinel writes what it
// learns (replicas, other Sentinels, the current master) back into its
// config file in Dir, so a restarted Sentinel remembers it.
func StartSentinel(ctx context.Context, opts SentinelOptions) (_ *Redis, err error) {
	host, port, err := net.SplitHostPort(opts.MasterAddr)
	if err != nil {
		return nil, fmt.Errorf("localsvc: sentinel master address: %w", err)
	}
	if opts.MasterName == "" || opts.Quorum < 1 || opts.DownAfter <= 0 || opts.FailoverTimeout <= 0 {
		return nil, errors.New("localsvc: sentinel needs MasterName, Quorum, DownAfter and FailoverTimeout")
	}
	r := &Redis{log: nopLogger(opts.Logger), port: opts.Port, fixed: opts.Port != 0}
	conf := func(dir string) error {
		r.conf = filepath.Join(dir, "sentinel.conf")
		body := fmt.Sprintf("sentinel resolve-hostnames yes\n"+
			"sentinel monitor %[1]s %[2]s %[3]s %[4]d\n"+
			"sentinel down-after-milliseconds %[1]s %[5]d\n"+
			"sentinel failover-timeout %[1]s %[6]d\n"+
			"sentinel parallel-syncs %[1]s 1\n",
			opts.MasterName, host, port, opts.Quorum, opts.DownAfter.Milliseconds(), opts.FailoverTimeout.Milliseconds())
		return os.WriteFile(r.conf, []byte(body), 0o644)
	}
	if err := r.launch(ctx, opts.Dir, conf); err != nil {
		return nil, err
	}
	return r, nil
}

// launch prepares the directory (calling prepare, if any, with it) and
// starts the server, retrying on a lost race for the port.
func (r *Redis) launch(ctx context.Context, dir string, prepare func(dir string) error) (err error) {
	if r.bin, err = exec.LookPath("redis-server"); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	if dir == "" {
		if r.dir, err = os.MkdirTemp("", "tally-redis-"); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		r.ownDir = true
	} else {
		if r.dir, err = filepath.Abs(dir); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		if err := os.MkdirAll(r.dir, 0o755); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
	}
	defer func() {
		if err != nil && r.ownDir {
			os.RemoveAll(r.dir)
		}
	}()
	r.logPath = filepath.Join(r.dir, "redis.log")
	if prepare != nil {
		if err := prepare(r.dir); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
	}
	if r.port == 0 {
		if r.port, err = FreePort(); err != nil {
			return err
		}
	}
	r.opMu.Lock()
	defer r.opMu.Unlock()
	return retryPortRace(r.fixed, func() error { return r.start(ctx) }, func() error {
		port, err := FreePort()
		if err != nil {
			return err
		}
		r.mu.Lock()
		r.port = port
		r.mu.Unlock()
		return nil
	})
}

// Addr returns the server's host:port.
func (r *Redis) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(r.Port()))
}

// URL returns a redis:// URL for database 0.
func (r *Redis) URL() string {
	return "redis://" + r.Addr() + "/0"
}

// Port returns the TCP port; it stays the same across Kill/Start.
func (r *Redis) Port() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.port
}

// Kill sends SIGKILL to the server and waits until it has been reaped, like
// a crash of the cache. All data is lost. Killing a server that is not
// running is not an error.
func (r *Redis) Kill() error {
	r.mu.Lock()
	c := r.cur
	r.mu.Unlock()
	if c.running() {
		r.log.Info("killing redis", "pid", c.pid)
	}
	return c.kill("redis")
}

// Start starts a killed server again, empty, on the same port, and waits
// until it answers PING. It is an error to Start a running server.
func (r *Redis) Start(ctx context.Context) error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	return r.start(ctx)
}

// Close kills the server and removes Dir if StartRedis created it (else just
// redis.log). Close is idempotent.
func (r *Redis) Close() error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	err := r.Kill()
	if r.ownDir {
		return errors.Join(err, os.RemoveAll(r.dir))
	}
	return errors.Join(err, os.RemoveAll(r.logPath))
}

// start launches redis-server and waits for PONG; the caller holds opMu.
func (r *Redis) start(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, redisStartTimeout)
	defer cancel()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return ErrClosed
	}
	if r.cur.running() {
		r.mu.Unlock()
		return errors.New("localsvc: redis is already running")
	}
	port := r.port
	r.mu.Unlock()

	// Redis loads dump.rdb at startup even with saving disabled; make sure
	// "start empty" holds even if something wrote one.
	_ = os.Remove(filepath.Join(r.dir, "dump.rdb"))

	logf, offset, err := openLog(r.logPath)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	fmt.Fprintf(logf, "=== localsvc: starting redis on port %d at %s ===\n", port, time.Now().Format(time.RFC3339Nano))
	var args []string
	if r.conf != "" {
		// A Sentinel: its config file must come first, and it has no
		// data to persist.
		args = []string{r.conf, "--sentinel"}
	} else {
		args = []string{"--save", "", "--appendonly", "no"}
	}
	args = append(args,
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--dir", r.dir,
		"--daemonize", "no",
		"--logfile", "") // "" = stdout, which is the log file
	args = append(args, r.args...)
	cmd := exec.Command(r.bin, args...)
	cmd.Dir = r.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// Nothing is persisted, so SIGKILL on parent death loses nothing.
	cmd.SysProcAttr = sysProcAttr(nil, syscall.SIGKILL)
	c, err := startChild(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("localsvc: start redis: %w", err)
	}
	r.mu.Lock()
	r.cur = c
	r.mu.Unlock()

	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return fmt.Errorf("localsvc: redis exited during startup: %v\n--- redis log ---\n%s", c.err, logSince(r.logPath, offset, 4096))
		case <-ctx.Done():
			_ = c.signal(syscall.SIGKILL)
			c.waitExit(5 * time.Second)
			return fmt.Errorf("localsvc: redis not ready: %w\n--- redis log ---\n%s", ctx.Err(), logSince(r.logPath, offset, 4096))
		case <-tick.C:
		}
		if ping(addr) == nil {
			r.log.Info("redis ready", "pid", c.pid, "port", port)
			return nil
		}
	}
}

// ping sends an inline PING and expects +PONG, so readiness checks need no
// Redis client library.
func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return fmt.Errorf("unexpected PING reply %q", line)
	}
	return nil
}
