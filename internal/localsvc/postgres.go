package localsvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// PostgresOptions configures StartPostgres.
type PostgresOptions struct {
	// Dir is the parent directory for the data directory, the socket
	// directory and the server log. If empty, a fresh directory is created
	// with os.MkdirTemp and removed again by Close. If Dir already holds an
	// initialized cluster (Dir/data/PG_VERSION), it is reused without initdb,
	// which lets `tallyd dev` keep its data across runs.
	Dir string
	// Port is the TCP port to listen on at 127.0.0.1; 0 picks a free one.
	Port int
	// Logger receives lifecycle events (not the server log, which goes to
	// Dir/postgres.log). Nil discards them.
	Logger *slog.Logger
	// ExtraConf holds additional postgresql.conf settings, e.g.
	// {"log_statement": "all"}. Values are given unquoted; they are quoted
	// here. They override the defaults this package sets.
	ExtraConf map[string]string
}

// Postgres is a private PostgreSQL server run as a child process. Its
// methods are safe for concurrent use; Start, Stop, Restart and Close are
// serialized, while Kill may be called at any time (also during Start, to
// simulate a crash during recovery).
type Postgres struct {
	bin     string
	dir     string
	ownDir  bool   // dir was created by us, so Close removes all of it
	sockDir string // may live outside dir when dir's path is too long
	ownSock bool   // sockDir is a separate temp dir Close must remove
	dataDir string
	logPath string
	cred    *syscall.Credential // non-nil when servers run as another user
	log     *slog.Logger
	fixed   bool // the caller chose the port, so never move it

	opMu sync.Mutex // serializes lifecycle operations

	mu     sync.Mutex // guards the fields below
	port   int
	cur    *child
	closed bool
}

// Timeouts for shutting down; generous because a checkpoint on a slow disk
// can take a while, but bounded so a wedged server cannot hang a test.
const (
	pgStopTimeout  = 60 * time.Second
	pgStartTimeout = 2 * time.Minute
)

// StartPostgres initializes (unless already initialized) and starts a
// private PostgreSQL server listening on 127.0.0.1, and waits until it
// accepts connections. The superuser is "postgres" with trust
// authentication. Durability settings are the production ones (fsync,
// synchronous_commit) because crash tests depend on them.
//
// When running as root, the server runs as the "postgres" OS user, which
// must exist; Dir and its ancestors must then be traversable by that user
// (ancestors below os.TempDir() are made so automatically).
func StartPostgres(ctx context.Context, opts PostgresOptions) (_ *Postgres, err error) {
	ctx, cancel := withDefaultTimeout(ctx, pgStartTimeout+time.Minute)
	defer cancel()
	p := &Postgres{log: nopLogger(opts.Logger), port: opts.Port, fixed: opts.Port != 0}

	// Take initdb from the same directory as postgres: a PATH mixing major
	// versions would otherwise produce a cluster the server cannot read.
	bin, err := FindPostgresBin("postgres")
	if err != nil {
		return nil, err
	}
	if real, err := filepath.EvalSymlinks(bin); err == nil {
		bin = real
	}
	p.bin = bin
	initdb := filepath.Join(filepath.Dir(bin), "initdb")
	if _, err := os.Stat(initdb); err != nil {
		if initdb, err = FindPostgresBin("initdb"); err != nil {
			return nil, err
		}
	}
	if p.cred, err = serverCredential(); err != nil {
		return nil, err
	}

	if opts.Dir == "" {
		if p.dir, err = os.MkdirTemp("", "tally-pg-"); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
		p.ownDir = true
	} else {
		if p.dir, err = filepath.Abs(opts.Dir); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
		if err := os.MkdirAll(p.dir, 0o755); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
	}
	// Resolve symlinks: server processes are recognized by their working
	// directory, which the kernel reports resolved.
	if real, err := filepath.EvalSymlinks(p.dir); err == nil {
		p.dir = real
	}
	initialized := false
	defer func() {
		if err == nil {
			return
		}
		// Undo only what this call created: a reused cluster in a
		// caller's Dir must survive a failed start.
		switch {
		case p.ownDir:
			os.RemoveAll(p.dir)
		case initialized:
			os.RemoveAll(p.dataDir)
		}
		if p.ownSock {
			os.RemoveAll(p.sockDir)
		}
	}()
	if p.cred != nil {
		if p.ownDir {
			// MkdirTemp makes 0700 dirs; the server user must get through.
			if err := os.Chmod(p.dir, 0o755); err != nil {
				return nil, fmt.Errorf("localsvc: %w", err)
			}
		}
		if err := ensureTraversable(p.dir, p.cred); err != nil {
			return nil, err
		}
	}
	p.dataDir = filepath.Join(p.dir, "data")
	p.logPath = filepath.Join(p.dir, "postgres.log")
	if err := p.makeSockDir(); err != nil {
		return nil, err
	}

	if _, err := os.Stat(filepath.Join(p.dataDir, "PG_VERSION")); err != nil {
		initialized = true
		if err := p.initdb(ctx, initdb); err != nil {
			return nil, err
		}
	}
	if err := p.writeConf(opts.ExtraConf); err != nil {
		return nil, err
	}

	if p.port == 0 {
		if p.port, err = FreePort(); err != nil {
			return nil, err
		}
	}
	p.opMu.Lock()
	defer p.opMu.Unlock()
	err = retryPortRace(p.fixed, func() error { return p.start(ctx) }, func() error {
		port, err := FreePort()
		if err != nil {
			return err
		}
		p.log.Info("postgres port taken, retrying", "old", p.Port(), "new", port)
		p.mu.Lock()
		p.port = port
		p.mu.Unlock()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// URL returns a connection URL for database db over TCP as the postgres
// superuser.
func (p *Postgres) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", p.Port(), db)
}

// Port returns the TCP port the server listens on. It stays the same across
// Stop/Start, so URLs handed out earlier remain valid.
func (p *Postgres) Port() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.port
}

// Dir returns the directory holding the data directory and postgres.log.
func (p *Postgres) Dir() string { return p.dir }

// LogPath returns the path of the server's log file, which accumulates
// output across restarts.
func (p *Postgres) LogPath() string { return p.logPath }

// Stop shuts the server down and waits for the postmaster to exit. mode is
// one of PostgreSQL's shutdown modes, signalled the way pg_ctl would:
// "smart" (SIGTERM, waits for clients to disconnect), "fast" (SIGINT,
// disconnects clients, checkpoints; "" means fast) or "immediate" (SIGQUIT,
// no checkpoint, crash recovery on next start). Stopping a server that is
// not running is not an error. If the server has not exited after a
// minute it is killed and an error returned.
func (p *Postgres) Stop(mode string) error {
	sig, err := shutdownSignal(mode)
	if err != nil {
		return err
	}
	p.opMu.Lock()
	defer p.opMu.Unlock()
	return p.stop(mode, sig)
}

// stop does Stop's work; the caller holds opMu.
func (p *Postgres) stop(mode string, sig syscall.Signal) error {
	p.mu.Lock()
	c := p.cur
	p.mu.Unlock()
	if !c.running() {
		return nil
	}
	p.log.Info("stopping postgres", "mode", mode, "pid", c.pid)
	if err := c.signal(sig); err != nil {
		return fmt.Errorf("localsvc: signal postgres: %w", err)
	}
	if c.waitExit(pgStopTimeout) {
		return nil
	}
	p.killAll(c)
	return fmt.Errorf("localsvc: postgres did not stop (%s) within %v; killed it", mode, pgStopTimeout)
}

// Start starts a stopped or killed server again on the same port and data
// directory and waits until it accepts connections (after crash recovery,
// if the previous instance was killed or stopped with "immediate"). It is
// an error to Start a running server.
func (p *Postgres) Start(ctx context.Context) error {
	p.opMu.Lock()
	defer p.opMu.Unlock()
	return p.start(ctx)
}

// Restart is Stop(mode) followed by Start(ctx).
func (p *Postgres) Restart(ctx context.Context, mode string) error {
	sig, err := shutdownSignal(mode)
	if err != nil {
		return err
	}
	p.opMu.Lock()
	defer p.opMu.Unlock()
	if err := p.stop(mode, sig); err != nil {
		return err
	}
	return p.start(ctx)
}

// Kill sends SIGKILL to the postmaster only, like a crash of the server
// process, and waits until it has been reaped. Its backends are orphaned
// and exit on their own once they notice; Start copes with the ones that
// linger. Killing a server that is not running is not an error.
func (p *Postgres) Kill() error {
	p.mu.Lock()
	c := p.cur
	p.mu.Unlock()
	if c.running() {
		p.log.Info("killing postgres", "pid", c.pid)
	}
	return c.kill("postgres")
}

// Close stops the server with "immediate" (its data is being thrown away, so
// a checkpoint would be wasted time), kills anything left in its process
// group and removes its files: the whole Dir if StartPostgres created it,
// otherwise the data directory, socket directory and log inside Dir. Close
// is idempotent.
func (p *Postgres) Close() error {
	p.opMu.Lock()
	defer p.opMu.Unlock()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()

	stopErr := p.stop("immediate", syscall.SIGQUIT)
	// Orphans of an earlier Kill would keep the shared memory alive.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	goneErr := waitDirProcsGone(ctx, p.dataDir, 0, p.log)
	return errors.Join(stopErr, goneErr, p.removeFiles())
}

// start launches the postmaster and waits for it to be ready; the caller
// holds opMu.
func (p *Postgres) start(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, pgStartTimeout)
	defer cancel()

	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	if p.cur.running() {
		p.mu.Unlock()
		return errors.New("localsvc: postgres is already running")
	}
	port := p.port
	p.mu.Unlock()

	if err := waitDirProcsGone(ctx, p.dataDir, 3*time.Second, p.log); err != nil {
		return fmt.Errorf("localsvc: waiting for old postgres processes: %w", err)
	}
	p.removeStalePidFile()

	logf, offset, err := openLog(p.logPath)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	fmt.Fprintf(logf, "=== localsvc: starting postgres on port %d at %s ===\n", port, time.Now().Format(time.RFC3339Nano))
	// The port goes on the command line rather than in postgresql.conf so a
	// retry after a bind failure does not need to rewrite the config.
	cmd := exec.Command(p.bin, "-D", p.dataDir, "-p", strconv.Itoa(port))
	cmd.Dir = p.dataDir // the server user may not be able to read our cwd
	cmd.Env = filteredEnv()
	// An *os.File is handed to the child as its fd, so Wait does not wait for
	// orphaned backends that inherited it (a pipe would make it hang).
	cmd.Stdout, cmd.Stderr = logf, logf
	// SIGQUIT on parent death is an immediate shutdown: the postmaster takes
	// its backends down with it, which SIGKILL would not.
	cmd.SysProcAttr = sysProcAttr(p.cred, syscall.SIGQUIT)
	c, err := startChild(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("localsvc: start postgres: %w", err)
	}
	p.mu.Lock()
	p.cur = c
	p.mu.Unlock()
	p.log.Info("postgres starting", "pid", c.pid, "port", port, "dir", p.dir)

	if err := p.waitReady(ctx, c, port); err != nil {
		if c.running() {
			_ = c.signal(syscall.SIGQUIT)
			if !c.waitExit(10 * time.Second) {
				p.killAll(c)
			}
		}
		return fmt.Errorf("%w\n--- postgres log ---\n%s", err, logSince(p.logPath, offset, 4096))
	}
	p.log.Info("postgres ready", "pid", c.pid, "port", port)
	return nil
}

// killAll SIGKILLs the postmaster and every other process running in the
// data directory, for when a shutdown hangs.
func (p *Postgres) killAll(c *child) {
	_ = c.signal(syscall.SIGKILL)
	for _, pid := range dirProcs(p.dataDir) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	c.waitExit(10 * time.Second)
}

// waitReady polls until the postmaster reports "ready" in postmaster.pid
// (as pg_ctl does) and accepts a TCP connection.
func (p *Postgres) waitReady(ctx context.Context, c *child, port int) error {
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for {
		select {
		case <-c.done:
			return fmt.Errorf("localsvc: postgres exited during startup: %v", c.err)
		case <-ctx.Done():
			return fmt.Errorf("localsvc: postgres not ready: %w", ctx.Err())
		case <-tick.C:
		}
		pid, status, ok := readPidFile(filepath.Join(p.dataDir, "postmaster.pid"))
		if !ok || pid != c.pid || status != "ready" {
			continue
		}
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
	}
}

// readPidFile returns the postmaster PID (line 1) and status (line 8,
// "starting", "ready", "stopping" or "standby") from postmaster.pid.
func readPidFile(path string) (pid int, status string, ok bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, "", false
	}
	lines := strings.Split(string(b), "\n")
	pid, err = strconv.Atoi(strings.TrimSpace(lines[0]))
	if err != nil {
		return 0, "", false
	}
	if len(lines) >= 8 {
		status = strings.TrimSpace(lines[7])
	}
	return pid, status, true
}

// removeStalePidFile deletes postmaster.pid if the process it names is gone.
// Postgres does this check itself, but as the postgres user it cannot tell a
// dead PID from a reused one owned by root (kill(pid, 0) gives EPERM), so
// a recycled PID would otherwise block startup.
func (p *Postgres) removeStalePidFile() {
	path := filepath.Join(p.dataDir, "postmaster.pid")
	pid, _, ok := readPidFile(path)
	if !ok || pidAlive(pid) && isPostgresProcess(pid) {
		return
	}
	if err := os.Remove(path); err == nil {
		p.log.Info("removed stale postmaster.pid", "pid", pid)
	}
}

// isPostgresProcess reports whether pid looks like a postgres server
// process; when that cannot be determined it answers true, leaving the
// decision to postgres itself.
func isPostgresProcess(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return true
	}
	return strings.HasPrefix(strings.TrimSpace(string(b)), "postgres")
}

// initdb creates the cluster. --no-sync skips initdb's final fsync of
// every file: that only protects against an OS crash right after initdb,
// which for a throwaway cluster does not matter, and it saves seconds.
// The running server still uses fsync=on.
func (p *Postgres) initdb(ctx context.Context, initdb string) error {
	if err := os.MkdirAll(p.dataDir, 0o700); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	if err := p.chown(p.dataDir); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, initdb, "-D", p.dataDir, "-U", "postgres",
		"--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
	cmd.Dir = p.dataDir
	cmd.Env = filteredEnv()
	cmd.SysProcAttr = sysProcAttr(p.cred, syscall.SIGKILL)
	out, err := cmd.CombinedOutput()
	if logf, _, lerr := openLog(p.logPath); lerr == nil {
		logf.Write(out)
		logf.Close()
	}
	if err != nil {
		return fmt.Errorf("localsvc: initdb: %w\n%s", err, strings.TrimSpace(string(out)))
	}
	p.log.Info("initdb done", "dir", p.dataDir)
	return nil
}

// confKey restricts setting names so a key cannot smuggle in extra lines.
var confKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

// writeConf writes our settings to localsvc.conf in the data directory and
// includes it from postgresql.conf once. A separate file (rewritten on every
// StartPostgres) keeps a reused cluster from accumulating duplicates.
func (p *Postgres) writeConf(extra map[string]string) error {
	settings := map[string]string{
		"listen_addresses":        "127.0.0.1",
		"unix_socket_directories": p.sockDir,
		"fsync":                   "on",
		"synchronous_commit":      "on",
		"full_page_writes":        "on",
		"max_connections":         "200",
		"shared_buffers":          "128MB",
		"logging_collector":       "off",
		"log_destination":         "stderr",
	}
	for k, v := range extra {
		if !confKey.MatchString(k) || strings.ContainsAny(v, "\r\n") {
			return fmt.Errorf("localsvc: invalid postgresql.conf setting %q = %q", k, v)
		}
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("# Written by internal/localsvc on every start; edits are lost.\n")
	for _, k := range keys {
		// Every setting accepts a quoted value, so quote them all.
		fmt.Fprintf(&b, "%s = '%s'\n", k, strings.ReplaceAll(settings[k], "'", "''"))
	}
	path := filepath.Join(p.dataDir, "localsvc.conf")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	if err := p.chown(path); err != nil {
		return err
	}

	main := filepath.Join(p.dataDir, "postgresql.conf")
	cur, err := os.ReadFile(main)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	const include = "include = 'localsvc.conf'"
	if strings.Contains(string(cur), include) {
		return nil
	}
	f, err := os.OpenFile(main, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	_, err = fmt.Fprintf(f, "\n%s\n", include)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	return nil
}

// maxSockDirLen keeps "<dir>/.s.PGSQL.NNNNN.lock" under the 107-byte limit
// of a Unix socket path.
const maxSockDirLen = 80

// makeSockDir creates the private Unix socket directory. Sockets never go
// to /var/run/postgresql (shared with any system server, and not writable
// by us in general). If Dir's path is too long for a socket, a short temp
// dir is used instead.
func (p *Postgres) makeSockDir() error {
	p.sockDir = filepath.Join(p.dir, "sock")
	if len(p.sockDir) > maxSockDirLen {
		d, err := os.MkdirTemp("", "tpgs")
		if err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		p.sockDir, p.ownSock = d, true
		if p.cred != nil {
			if err := ensureTraversable(filepath.Dir(d), p.cred); err != nil {
				return err
			}
		}
	} else if err := os.MkdirAll(p.sockDir, 0o700); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	return p.chown(p.sockDir)
}

// chown hands path to the server user, if servers run as another user.
func (p *Postgres) chown(path string) error {
	if p.cred == nil {
		return nil
	}
	if err := os.Chown(path, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	return nil
}

// removeFiles deletes what StartPostgres created.
func (p *Postgres) removeFiles() error {
	var errs []error
	if p.ownSock {
		errs = append(errs, os.RemoveAll(p.sockDir))
	}
	if p.ownDir {
		errs = append(errs, os.RemoveAll(p.dir))
	} else if p.dir != "" {
		errs = append(errs,
			os.RemoveAll(filepath.Join(p.dir, "data")),
			os.RemoveAll(filepath.Join(p.dir, "sock")),
			os.RemoveAll(filepath.Join(p.dir, "postgres.log")))
	}
	return errors.Join(errs...)
}

// shutdownSignal maps a pg_ctl shutdown mode to the postmaster signal.
func shutdownSignal(mode string) (syscall.Signal, error) {
	switch mode {
	case "smart":
		return syscall.SIGTERM, nil
	case "fast", "":
		return syscall.SIGINT, nil
	case "immediate":
		return syscall.SIGQUIT, nil
	}
	return 0, fmt.Errorf("localsvc: unknown shutdown mode %q (want smart, fast or immediate)", mode)
}

// serverCredential returns the identity to run PostgreSQL under: nil (our
// own) normally, the "postgres" OS user when we are root, since postgres
// refuses to run as root.
func serverCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("localsvc: running as root, and postgres cannot run as root: need OS user \"postgres\": %w", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("localsvc: bad uid/gid for user postgres: %s/%s", u.Uid, u.Gid)
	}
	// Groups is left empty, so the child drops root's supplementary groups.
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// ensureTraversable makes sure the server user can reach dir: it needs
// search (x) permission on every ancestor. Directories below os.TempDir()
// (for example the 0700 ones from testing.T.TempDir) get o+x added; anything
// else is reported rather than silently opened up.
func ensureTraversable(dir string, cred *syscall.Credential) error {
	tmp, err := filepath.EvalSymlinks(os.TempDir())
	if err != nil {
		tmp = os.TempDir()
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	for d := real; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		if !canTraverse(fi, cred) {
			if !strings.HasPrefix(d, tmp+string(filepath.Separator)) {
				return fmt.Errorf("localsvc: OS user postgres (uid %d) cannot traverse %s; use a Dir under %s or chmod o+x it", cred.Uid, d, tmp)
			}
			if err := os.Chmod(d, fi.Mode().Perm()|0o001); err != nil {
				return fmt.Errorf("localsvc: %w", err)
			}
		}
		if parent := filepath.Dir(d); parent == d {
			return nil
		}
	}
}

// canTraverse reports whether the credential has search permission on the
// directory described by fi (supplementary groups are ignored).
func canTraverse(fi os.FileInfo, cred *syscall.Credential) bool {
	m := fi.Mode().Perm()
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return m&0o001 != 0
	}
	switch {
	case st.Uid == cred.Uid:
		return m&0o100 != 0
	case st.Gid == cred.Gid:
		return m&0o010 != 0
	default:
		return m&0o001 != 0
	}
}
