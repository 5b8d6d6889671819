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
}

// Redis is a private, non-persistent Redis server run as a child process.
// Its methods are safe for concurrent use.
type Redis struct {
	bin     string
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
	r := &Redis{log: nopLogger(opts.Logger), port: opts.Port, fixed: opts.Port != 0}
	if r.bin, err = exec.LookPath("redis-server"); err != nil {
		return nil, fmt.Errorf("localsvc: %w", err)
	}
	if opts.Dir == "" {
		if r.dir, err = os.MkdirTemp("", "tally-redis-"); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
		r.ownDir = true
	} else {
		if r.dir, err = filepath.Abs(opts.Dir); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
		if err := os.MkdirAll(r.dir, 0o755); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
	}
	defer func() {
		if err != nil && r.ownDir {
			os.RemoveAll(r.dir)
		}
	}()
	r.logPath = filepath.Join(r.dir, "redis.log")
	if r.port == 0 {
		if r.port, err = FreePort(); err != nil {
			return nil, err
		}
	}
	r.opMu.Lock()
	defer r.opMu.Unlock()
	for attempt := 1; ; attempt++ {
		err = r.start(ctx)
		if err == nil {
			return r, nil
		}
		// See StartPostgres: only a lost race for the port is retried.
		if r.fixed || attempt >= 3 || !isBindError(err.Error()) {
			return nil, err
		}
		port, perr := FreePort()
		if perr != nil {
			return nil, err
		}
		r.mu.Lock()
		r.port = port
		r.mu.Unlock()
	}
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
	if !c.running() {
		return nil
	}
	r.log.Info("killing redis", "pid", c.pid)
	if err := c.signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("localsvc: kill redis: %w", err)
	}
	if !c.waitExit(10 * time.Second) {
		return fmt.Errorf("localsvc: redis pid %d survived SIGKILL", c.pid)
	}
	return nil
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
	cmd := exec.Command(r.bin,
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", r.dir,
		"--daemonize", "no",
		"--logfile", "") // "" = stdout, which is the log file
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
