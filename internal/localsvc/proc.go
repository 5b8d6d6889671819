package localsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrClosed is returned by lifecycle methods called after Close.
var ErrClosed = errors.New("localsvc: server closed")

// ErrNotInstalled is wrapped by errors about a server program that is not
// installed, so tests can skip (loudly) instead of failing on a machine
// without it.
var ErrNotInstalled = errors.New("localsvc: not installed")

// FreePort asks the kernel for a currently unused TCP port on 127.0.0.1.
//
// The port is released before returning, so another process may grab it
// before the caller binds it; StartPostgres and StartRedis therefore retry
// with a new port when the server fails to bind one they picked themselves.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("localsvc: find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// postgresBinGlobs are the places PostgreSQL server binaries live when they
// are not on PATH (Debian/Ubuntu keep them out of PATH on purpose, RHEL uses
// /usr/pgsql-N).
var postgresBinGlobs = []string{
	"/usr/lib/postgresql/*/bin",
	"/usr/pgsql-*/bin",
	"/usr/local/pgsql/bin",
	"/opt/homebrew/opt/postgresql@*/bin",
	"/usr/local/opt/postgresql@*/bin",
}

// FindPostgresBin returns the path of a PostgreSQL program (postgres, initdb,
// pg_ctl, ...). It looks in PATH first, then in the well-known versioned
// install directories such as /usr/lib/postgresql/*/bin, highest major
// version first.
func FindPostgresBin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	var dirs []string
	for _, g := range postgresBinGlobs {
		m, _ := filepath.Glob(g)
		dirs = append(dirs, m...)
	}
	// Sort by the first number in the path, descending, so 16 beats 9.6
	// (a plain string sort would not).
	sort.SliceStable(dirs, func(i, j int) bool { return pathVersion(dirs[i]) > pathVersion(dirs[j]) })
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("localsvc: %s not found in PATH or %s", name, strings.Join(postgresBinGlobs, ", "))
}

// pathVersion extracts the first decimal number (with an optional .minor)
// from p, or -1.
func pathVersion(p string) float64 {
	start := strings.IndexAny(p, "0123456789")
	if start < 0 {
		return -1
	}
	end := start
	for end < len(p) && (p[end] == '.' || (p[end] >= '0' && p[end] <= '9')) {
		end++
	}
	v, err := strconv.ParseFloat(strings.TrimRight(p[start:end], "."), 64)
	if err != nil {
		return -1
	}
	return v
}

// child is a started server process and the goroutine reaping it.
type child struct {
	cmd  *exec.Cmd
	pid  int
	done chan struct{} // closed once the process has been reaped
	err  error         // Wait's result; valid after done is closed
}

// startChild starts cmd and reaps it in the background, so callers can wait
// for exit with a timeout instead of blocking in cmd.Wait.
func startChild(cmd *exec.Cmd) (*child, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

// running reports whether c is non-nil and not yet reaped.
func (c *child) running() bool {
	if c == nil {
		return false
	}
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// waitExit waits up to d for c to be reaped.
func (c *child) waitExit(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.done:
		return true
	case <-t.C:
		return false
	}
}

// killWaitMax bounds the wait for a SIGKILLed child to be reaped.
const killWaitMax = 10 * time.Second

// kill SIGKILLs c (nil or already reaped: nothing to do) and waits until
// it has been reaped; what names the server in errors.
func (c *child) kill(what string) error {
	if !c.running() {
		return nil
	}
	if err := c.signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("localsvc: kill %s: %w", what, err)
	}
	if !c.waitExit(killWaitMax) {
		return fmt.Errorf("localsvc: %s pid %d survived SIGKILL", what, c.pid)
	}
	return nil
}

// signal sends sig to the process itself (not its group).
func (c *child) signal(sig syscall.Signal) error {
	err := syscall.Kill(c.pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil // already gone; the reaper will notice
	}
	return err
}

// waitDirProcsGone waits until no live process has dir as its working
// directory. After the postmaster is SIGKILLed its backends are orphaned but
// still attach the old shared memory segment, and while they do a new
// postmaster refuses to start ("pre-existing shared memory block is still in
// use"). Idle ones notice the postmaster's death and exit at once, but a
// backend busy in a long query may not; after soft they are SIGKILLed.
func waitDirProcsGone(ctx context.Context, dir string, soft time.Duration, log *slog.Logger) error {
	deadline := time.Now().Add(soft)
	killed := false
	for {
		pids := dirProcs(dir)
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if killed {
				return fmt.Errorf("localsvc: processes %v in %s survive SIGKILL", pids, dir)
			}
			log.Warn("leftover server processes did not exit; killing them", "pids", pids)
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			killed = true
			deadline = time.Now().Add(10 * time.Second)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// filteredEnv is the environment for server children: ours minus variables
// that would change what initdb/postgres do behind our back (PGDATA, PGPORT,
// locale), plus LC_ALL=C so messages and initdb do not depend on which
// locales happen to be installed.
func filteredEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "PG") || strings.HasPrefix(k, "LC_") || k == "LANG" || k == "LANGUAGE" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C")
}

// openLog opens a server log for appending and returns it with its current
// size, so errors can show only what the latest attempt wrote.
func openLog(path string) (*os.File, int64, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, fi.Size(), nil
}

// logSince returns what was written to path after offset, at most max bytes
// from its end.
func logSince(path string, offset int64, max int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	start := offset
	if fi.Size()-start > max {
		start = fi.Size() - max
	}
	if start < 0 {
		start = 0
	}
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		return ""
	}
	b, _ := io.ReadAll(io.LimitReader(f, max))
	return strings.TrimSpace(string(b))
}

// withDefaultTimeout bounds ctx by d unless it already has a deadline, so a
// server that never becomes ready cannot hang a caller that passed
// context.Background().
func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// nopLogger returns l, or a logger that discards everything.
func nopLogger(l *slog.Logger) *slog.Logger {
	if l != nil {
		return l
	}
	return slog.New(slog.DiscardHandler)
}

// portRaceAttemptsMax bounds how often a server is started again on new
// ports after another process took one of its ports between FreePort and
// bind.
const portRaceAttemptsMax = 3

// retryPortRace calls start until it succeeds, fails for another reason
// than a taken port, or has been tried portRaceAttemptsMax times; before
// each retry, repick chooses new ports. A server on ports the caller chose
// (fixed) is started once: moving it would break the caller.
func retryPortRace(fixed bool, start, repick func() error) error {
	for attempt := 1; ; attempt++ {
		err := start()
		if err == nil || fixed || attempt >= portRaceAttemptsMax || !isBindError(err.Error()) {
			return err
		}
		if perr := repick(); perr != nil {
			return err
		}
	}
}

// isBindError reports whether a server log says the listen port was taken.
func isBindError(log string) bool {
	return strings.Contains(log, "Address already in use") || strings.Contains(log, "could not bind")
}
