package localsvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// PgBouncerOptions configures StartPgBouncer.
type PgBouncerOptions struct {
	// Dir holds pgbouncer.ini, the auth file and pgbouncer.log. If empty, a
	// fresh directory is created with os.MkdirTemp and removed by Close.
	Dir string
	// Port is the TCP port to listen on at 127.0.0.1; 0 picks a free one.
	Port int
	// Target is the host:port of the PostgreSQL server (or HAProxy) that
	// PgBouncer connects to. It need not be up yet.
	Target string
	// PoolMode is "transaction" (the default), "session" or "statement".
	PoolMode string
	// DefaultPoolSize is the number of server connections per (database,
	// user) pair; 0 means 20.
	DefaultPoolSize int
	// MaxClientConn is the number of client connections accepted; 0 means
	// 200.
	MaxClientConn int
	// Logger receives lifecycle events (not PgBouncer's own log, which goes
	// to Dir/pgbouncer.log). Nil discards them.
	Logger *slog.Logger
	// ExtraConf holds additional [pgbouncer] settings, unquoted. They
	// override the defaults this package sets.
	ExtraConf map[string]string
}

// PgBouncer is a private PgBouncer run as a child process, in front of one
// PostgreSQL server. Its methods are safe for concurrent use.
type PgBouncer struct {
	bin     string
	dir     string
	ownDir  bool
	conf    string
	logPath string
	cred    *syscall.Credential
	log     *slog.Logger
	fixed   bool

	opMu sync.Mutex // serializes Start and Close

	mu     sync.Mutex // guards the fields below
	port   int
	cur    *child
	closed bool
}

// Bounds of PgBouncer's lifecycle and the pooling settings chosen for it.
const (
	// pgbouncerStartTimeout bounds a Start whose context has no deadline.
	pgbouncerStartTimeout = 30 * time.Second
	// pgbouncerDefaultPoolSize and pgbouncerDefaultMaxClientConn are the
	// defaults of PgBouncerOptions.DefaultPoolSize and MaxClientConn.
	pgbouncerDefaultPoolSize      = 20
	pgbouncerDefaultMaxClientConn = 200
)

// pgbouncerAuthUser is the one user PgBouncer admits (with trust, it must
// still be listed in the auth file); the servers behind it trust it too.
const pgbouncerAuthUser = "postgres"

// StartPgBouncer starts pgbouncer (found in PATH or /usr/sbin) listening on
// 127.0.0.1, forwarding every database name to opts.Target as user
// postgres, and waits until it accepts connections. It does not wait for
// the target: PgBouncer connects to it only when a client needs a server
// connection.
//
// Clients authenticate with trust as user postgres. Startup parameters
// other than the ones PgBouncer tracks (and extra_float_digits, which JDBC
// and lib/pq send) are rejected, as PgBouncer 1.18 does in production:
// clients must set e.g. statement_timeout with SET instead.
//
// When running as root, PgBouncer runs as the "postgres" OS user (it
// refuses root), so Dir must be traversable by that user.
func StartPgBouncer(ctx context.Context, opts PgBouncerOptions) (_ *PgBouncer, err error) {
	b := &PgBouncer{log: nopLogger(opts.Logger), port: opts.Port, fixed: opts.Port != 0}
	if b.bin, err = findSbin("pgbouncer"); err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(opts.Target)
	if err != nil {
		return nil, fmt.Errorf("localsvc: pgbouncer target %q: %w", opts.Target, err)
	}
	if b.cred, err = serverCredential(); err != nil {
		return nil, err
	}
	if b.dir, b.ownDir, err = makeServerDir(opts.Dir, "tally-pgbouncer-", b.cred); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil && b.ownDir {
			os.RemoveAll(b.dir)
		}
	}()
	b.conf = filepath.Join(b.dir, "pgbouncer.ini")
	b.logPath = filepath.Join(b.dir, "pgbouncer.log")
	if b.port == 0 {
		if b.port, err = FreePort(); err != nil {
			return nil, err
		}
	}
	b.opMu.Lock()
	defer b.opMu.Unlock()
	start := func() error {
		if err := b.writeConf(opts, host, port); err != nil {
			return err
		}
		return b.start(ctx)
	}
	err = retryPortRace(b.fixed, start, func() error {
		p, err := FreePort()
		if err != nil {
			return err
		}
		b.log.Info("pgbouncer port taken, retrying", "old", b.Port(), "new", p)
		b.mu.Lock()
		b.port = p
		b.mu.Unlock()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// writeConf writes pgbouncer.ini and the auth file for the current port.
func (b *PgBouncer) writeConf(opts PgBouncerOptions, targetHost, targetPort string) error {
	mode := opts.PoolMode
	switch mode {
	case "":
		mode = "transaction"
	case "transaction", "session", "statement":
	default:
		return fmt.Errorf("localsvc: unknown pgbouncer pool mode %q (want transaction, session or statement)", mode)
	}
	poolSize, maxClients := opts.DefaultPoolSize, opts.MaxClientConn
	if poolSize <= 0 {
		poolSize = pgbouncerDefaultPoolSize
	}
	if maxClients <= 0 {
		maxClients = pgbouncerDefaultMaxClientConn
	}
	auth := filepath.Join(b.dir, "userlist.txt")
	settings := map[string]string{
		"listen_addr": "127.0.0.1",
		"listen_port": strconv.Itoa(b.Port()),
		// No Unix socket: clients use TCP, and a socket in a shared
		// directory such as /tmp could clash with another PgBouncer.
		"unix_socket_dir": "",
		// Foreground process: its log goes to stderr, which is our log
		// file, and there is no daemon to find by pidfile.
		"logfile":   "",
		"pidfile":   "",
		"auth_type": "trust",
		"auth_file": auth,
		"pool_mode": mode,
		// The servers' own defaults apply; only their pool size and the
		// client limit are ours to choose.
		"default_pool_size": strconv.Itoa(poolSize),
		"max_client_conn":   strconv.Itoa(maxClients),
		// JDBC and lib/pq send extra_float_digits; anything else unknown
		// is rejected, as in production.
		"ignore_startup_parameters": "extra_float_digits",
		// A server connection idle for over a second is checked before
		// reuse, so one left dead by a failover (the old primary's,
		// through HAProxy) is dropped instead of failing a client's
		// query. The check costs one round trip per idle period.
		"server_check_query": "select 1",
		"server_check_delay": "1",
		// Retry a failed server login after 1 s, not 15: during a
		// failover the new primary is reachable seconds later, and
		// clients wait in PgBouncer's queue meanwhile.
		"server_login_retry":     "1",
		"server_connect_timeout": "5",
		// A queued client gives up after 30 s, longer than a failover
		// (Patroni's ttl plus promotion) but bounded, so a dead
		// topology fails tests instead of hanging them.
		"query_wait_timeout": "30",
	}
	for k, v := range opts.ExtraConf {
		if !confKey.MatchString(k) || strings.ContainsAny(v, "\r\n") {
			return fmt.Errorf("localsvc: invalid pgbouncer setting %q = %q", k, v)
		}
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var s strings.Builder
	s.WriteString("; Written by internal/localsvc on every start; edits are lost.\n")
	// The wildcard makes every database name a client asks for map to
	// the same name on the target.
	fmt.Fprintf(&s, "[databases]\n* = host=%s port=%s user=%s\n\n[pgbouncer]\n", targetHost, targetPort, pgbouncerAuthUser)
	for _, k := range keys {
		fmt.Fprintf(&s, "%s = %s\n", k, settings[k])
	}
	if err := os.WriteFile(b.conf, []byte(s.String()), 0o644); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	// With trust the password is not checked, but the user must exist.
	if err := os.WriteFile(auth, []byte(strconv.Quote(pgbouncerAuthUser)+` ""`+"\n"), 0o644); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	return nil
}

// Addr returns PgBouncer's host:port.
func (b *PgBouncer) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(b.Port()))
}

// Port returns the TCP port; it stays the same across Kill/Start.
func (b *PgBouncer) Port() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.port
}

// URL returns a connection URL for database db through PgBouncer as user
// postgres.
func (b *PgBouncer) URL(db string) string {
	return fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", pgbouncerAuthUser, b.Addr(), db)
}

// LogPath returns the path of PgBouncer's log, which accumulates output
// across restarts.
func (b *PgBouncer) LogPath() string { return b.logPath }

// Kill sends SIGKILL to PgBouncer and waits until it has been reaped, like a
// crash of the pooler: every client connection breaks. Killing a PgBouncer
// that is not running is not an error.
func (b *PgBouncer) Kill() error {
	b.mu.Lock()
	c := b.cur
	b.mu.Unlock()
	if c.running() {
		b.log.Info("killing pgbouncer", "pid", c.pid)
	}
	return c.kill("pgbouncer")
}

// Start starts a killed PgBouncer again on the same port and waits until it
// accepts connections. It is an error to Start a running PgBouncer.
func (b *PgBouncer) Start(ctx context.Context) error {
	b.opMu.Lock()
	defer b.opMu.Unlock()
	return b.start(ctx)
}

// Close kills PgBouncer (it holds no state worth a graceful shutdown) and
// removes Dir if StartPgBouncer created it, else the files it wrote there.
// Close is idempotent.
func (b *PgBouncer) Close() error {
	b.opMu.Lock()
	defer b.opMu.Unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	err := b.Kill()
	if b.ownDir {
		return errors.Join(err, os.RemoveAll(b.dir))
	}
	return errors.Join(err, os.Remove(b.conf), os.Remove(filepath.Join(b.dir, "userlist.txt")), os.Remove(b.logPath))
}

// start launches pgbouncer and waits until it accepts TCP connections; the
// caller holds opMu.
func (b *PgBouncer) start(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, pgbouncerStartTimeout)
	defer cancel()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	if b.cur.running() {
		b.mu.Unlock()
		return errors.New("localsvc: pgbouncer is already running")
	}
	port := b.port
	b.mu.Unlock()

	logf, offset, err := openLog(b.logPath)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	fmt.Fprintf(logf, "=== localsvc: starting pgbouncer on port %d at %s ===\n", port, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(b.bin, b.conf)
	cmd.Dir = b.dir
	cmd.Env = filteredEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	// PgBouncer keeps nothing on disk, so SIGKILL on parent death loses
	// nothing.
	cmd.SysProcAttr = sysProcAttr(b.cred, syscall.SIGKILL)
	c, err := startChild(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("localsvc: start pgbouncer: %w", err)
	}
	b.mu.Lock()
	b.cur = c
	b.mu.Unlock()

	fail := func(msg error) error {
		if c.running() {
			_ = c.signal(syscall.SIGKILL)
			c.waitExit(5 * time.Second)
		}
		return fmt.Errorf("%w\n--- pgbouncer log ---\n%s", msg, logSince(b.logPath, offset, 4096))
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return fail(fmt.Errorf("localsvc: pgbouncer exited during startup: %v", c.err))
		case <-ctx.Done():
			return fail(fmt.Errorf("localsvc: pgbouncer not listening: %w", ctx.Err()))
		case <-tick.C:
		}
		// PgBouncer listens only once its config is loaded, so an
		// accepted connection means it is ready for clients.
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.Close()
			b.log.Info("pgbouncer ready", "pid", c.pid, "port", port)
			return nil
		}
	}
}

// findSbin finds a server program in PATH or, since root's PATH is not
// everyone's, in /usr/sbin and /usr/local/sbin.
func findSbin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/usr/local/sbin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("localsvc: %s not found in PATH, /usr/sbin or /usr/local/sbin: %w", name, ErrNotInstalled)
}

// makeServerDir returns the absolute, symlink-resolved directory for a
// server's files: dir, created if needed, or a fresh temp directory (own
// reports which). When servers run as another user the directory is made
// reachable by it; files in it are written by us and only read by the
// server.
func makeServerDir(dir, pattern string, cred *syscall.Credential) (_ string, own bool, err error) {
	if dir == "" {
		if dir, err = os.MkdirTemp("", pattern); err != nil {
			return "", false, fmt.Errorf("localsvc: %w", err)
		}
		own = true
		// MkdirTemp makes 0700 dirs; the server user must get through.
		if err := os.Chmod(dir, 0o755); err != nil {
			os.RemoveAll(dir)
			return "", false, fmt.Errorf("localsvc: %w", err)
		}
	} else {
		if dir, err = filepath.Abs(dir); err != nil {
			return "", false, fmt.Errorf("localsvc: %w", err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", false, fmt.Errorf("localsvc: %w", err)
		}
	}
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	if cred != nil {
		if err := ensureTraversable(dir, cred); err != nil {
			if own {
				os.RemoveAll(dir)
			}
			return "", false, err
		}
	}
	return dir, own, nil
}
