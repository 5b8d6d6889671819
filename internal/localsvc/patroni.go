package localsvc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/tallyledger/tally/internal/faultproxy"
)

// Patroni's timing settings (bootstrap.dcs), in seconds. Patroni needs
// loop_wait + 2*retry_timeout <= ttl: a leader that cannot refresh its
// lock keeps retrying DCS and PostgreSQL calls for retry_timeout, twice in
// one HA loop at worst, and must demote itself before its lock expires
// and a standby may take over. Patroni 3.0.2 enforces no minimums (its
// validator only checks that they are integers); the defaults are 30/10/10.
const (
	// patroniTTL is the leader lock's lease: a dead leader is replaced
	// about this long after its last refresh. 10 s rather than 30 keeps
	// a failover test short, while leaving retry_timeout room for a
	// shared, busy 2-core machine.
	patroniTTL = 10
	// patroniLoopWait is the pause between HA loops: each node refreshes
	// its state and the leader its lock every second, so a standby's lag
	// and a switchover are noticed within a second. The cost is one
	// small etcd write and a few PostgreSQL queries per node per second.
	patroniLoopWait = 1
	// patroniRetryTimeout is how long a failing etcd or PostgreSQL call is
	// retried before Patroni gives up on it (the leader then demotes).
	// 4 s rides out an etcd election (etcdElectionTimeout) or a stall of
	// a few seconds on a loaded machine; 1 + 2*4 = 9 <= 10.
	patroniRetryTimeout = 4
	// patroniDefaultMaxLagOnFailover is Patroni's own default (1 MiB): a
	// standby further behind than this is not promoted.
	patroniDefaultMaxLagOnFailover = 1 << 20
)

// Bounds of the Patroni helpers.
const (
	// patroniStartTimeout bounds bootstrapping the first node (initdb,
	// start, leader election) and a StartNode's wait for the REST API.
	patroniStartTimeout = 60 * time.Second
	// patroniStreamingTimeout bounds WaitStreaming: a base backup or
	// pg_rewind of a small cluster plus a few HA loops.
	patroniStreamingTimeout = 60 * time.Second
	// patroniKillTimeout bounds the wait for a killed node's processes to
	// be gone.
	patroniKillTimeout = 10 * time.Second
	// patronictlTimeout bounds one patronictl command.
	patronictlTimeout = 30 * time.Second
)

// patroniNode is one PostgreSQL node managed by its own Patroni.
type patroniNode struct {
	name    string
	dir     string // Dir/<name>, owned by the server user
	dataDir string
	conf    string // the Patroni YAML
	logPath string // Patroni's output, which includes PostgreSQL's log
	pgPort  int
	apiPort int
	// proxy is the node's PostgreSQL connect_address: what the other
	// node streams WAL from (and rewinds or base-backs up from) when
	// this node leads.
	proxy *faultproxy.Proxy

	offset atomic.Int64 // log size when Patroni was last started

	cur *child // guarded by Topology.mu
}

// writeConf writes the node's Patroni YAML.
func (t *Topology) writeConf(n *patroniNode) error {
	bootstrapDCS := map[string]any{
		"ttl":                     patroniTTL,
		"loop_wait":               patroniLoopWait,
		"retry_timeout":           patroniRetryTimeout,
		"maximum_lag_on_failover": t.settings.MaximumLagOnFailover,
		"synchronous_mode":        t.settings.SynchronousMode,
		// Not strict: with strict on, a leader whose only standby is
		// gone (just killed, or not yet rejoined after a failover)
		// blocks every commit until a standby is back. Off, Patroni
		// empties synchronous_standby_names then, and commits on the
		// lone primary are acknowledged unreplicated, the trade a
		// two-node production cluster makes for availability.
		"synchronous_mode_strict": false,
		"postgresql": map[string]any{
			"use_pg_rewind": true,
			"use_slots":     true,
			"parameters":    t.pgParameters(),
		},
	}
	hba := []string{
		"local all all trust",
		"host all all 127.0.0.1/32 trust",
		"host replication all 127.0.0.1/32 trust",
	}
	user := map[string]any{"username": "postgres"}
	cfg := map[string]any{
		"scope":     t.scope,
		"namespace": "/tally/",
		"name":      n.name,
		"log":       map[string]any{"level": "INFO"},
		"restapi": map[string]any{
			"listen":          fmt.Sprintf("127.0.0.1:%d", n.apiPort),
			"connect_address": fmt.Sprintf("127.0.0.1:%d", n.apiPort),
		},
		"etcd3": map[string]any{"hosts": t.etcd.endpoints()},
		"bootstrap": map[string]any{
			"dcs": bootstrapDCS,
			// no-sync: as in StartPostgres, an initdb that an OS
			// crash could lose does not matter for a throwaway cluster.
			"initdb": []any{map[string]any{"encoding": "UTF8"}, map[string]any{"locale": "C"}, "data-checksums", "no-sync"},
			"pg_hba": hba,
		},
		"postgresql": map[string]any{
			"listen":          fmt.Sprintf("127.0.0.1:%d", n.pgPort),
			"connect_address": n.proxy.Addr(),
			"data_dir":        n.dataDir,
			"bin_dir":         t.binDir,
			"pgpass":          filepath.Join(n.dir, "pgpass"),
			// Trust needs no passwords (Patroni's validator makes them
			// optional).
			"authentication": map[string]any{"superuser": user, "replication": user, "rewind": user},
			"pg_hba":         hba,
			"parameters": map[string]any{
				"unix_socket_directories": t.sockDir,
			},
			// A fast checkpoint: the default spread one would make a
			// new standby wait for minutes of checkpoint pacing.
			"basebackup": []any{map[string]any{"checkpoint": "fast"}},
			// A node whose rewind fails is rebuilt from a base backup
			// rather than left broken.
			"remove_data_directory_on_rewind_failure":     true,
			"remove_data_directory_on_diverged_timelines": true,
		},
		// No hardware watchdog in a test container; the default
		// ("automatic") would only log that it found none.
		"watchdog": map[string]any{"mode": "off"},
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("localsvc: patroni config: %w", err)
	}
	body := "# Written by internal/localsvc; edits are lost.\n" + string(b)
	if err := os.WriteFile(n.conf, []byte(body), 0o644); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	return nil
}

// pgParameters returns the cluster-wide PostgreSQL settings, which Patroni
// keeps in the DCS so both nodes run with the same ones: the production
// durability settings of StartPostgres, what streaming replication and
// pg_rewind need (wal_log_hints), then TopologyOptions.PGConf.
func (t *Topology) pgParameters() map[string]string {
	p := map[string]string{
		"wal_level":             "replica",
		"hot_standby":           "on",
		"max_wal_senders":       "10",
		"max_replication_slots": "10",
		"wal_log_hints":         "on",
		"fsync":                 "on",
		"synchronous_commit":    "on",
		"full_page_writes":      "on",
		"max_connections":       "200",
		"shared_buffers":        "128MB",
		// PostgreSQL's log goes to its stderr, which Patroni passes on
		// to patroni.log, so one file tells the node's story.
		"logging_collector": "off",
		"log_destination":   "stderr",
		"log_line_prefix":   "%m [%p] ",
	}
	for k, v := range t.pgConf {
		p[k] = v
	}
	return p
}

// startPatroni launches the node's Patroni as the server user; the caller
// holds t.mu and has checked it is not running.
func (t *Topology) startPatroni(n *patroniNode) error {
	logf, offset, err := openLog(n.logPath)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	fmt.Fprintf(logf, "=== localsvc: starting patroni %s (postgres %d, api %d) at %s ===\n", n.name, n.pgPort, n.apiPort, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(t.patroniBin, n.conf)
	cmd.Dir = n.dir
	cmd.Env = patroniEnv(n.dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Patroni detaches the postmaster (setsid, reparented to init), so
	// this death signal reaches only Patroni; the guardian takes the
	// postmasters down.
	cmd.SysProcAttr = sysProcAttr(t.cred, syscall.SIGKILL)
	c, err := startChild(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("localsvc: start patroni: %w", err)
	}
	n.cur = c
	n.offset.Store(offset)
	t.log.Info("patroni starting", "node", n.name, "pid", c.pid, "pg_port", n.pgPort, "api_port", n.apiPort)
	return nil
}

// patroniEnv is filteredEnv without the Python settings of whoever runs
// the tests (a pyenv or virtualenv must not leak into /usr/bin/python3),
// with HOME in the node's directory, which the server user can write.
func patroniEnv(home string) []string {
	var env []string
	for _, kv := range filteredEnv() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "PYTHON") || strings.HasPrefix(k, "PYENV") || k == "VIRTUAL_ENV" || k == "HOME" || strings.HasPrefix(k, "PATRONI") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "HOME="+home)
}

// killNode SIGKILLs the node's Patroni (with everything in its process
// group, such as a running pg_rewind or pg_basebackup) and every process
// running in its data directory (the postmaster and all backends), and
// waits until they are gone. The caller holds t.opMu.
func (t *Topology) killNode(ctx context.Context, n *patroniNode) error {
	t.mu.Lock()
	c := n.cur
	t.mu.Unlock()
	pg := dirProcs(n.dataDir)
	if c.running() {
		// The group first, so Patroni cannot start a new postmaster
		// between the two steps.
		if err := syscall.Kill(-c.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("localsvc: kill patroni %s: %w", n.name, err)
		}
	}
	for _, pid := range pg {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if c != nil && !c.waitExit(patroniKillTimeout) {
		return fmt.Errorf("localsvc: patroni %s pid %d survived SIGKILL", n.name, c.pid)
	}
	ctx, cancel := context.WithTimeout(ctx, patroniKillTimeout)
	defer cancel()
	for {
		// A postmaster Patroni started just before it died may appear
		// after the first sweep.
		pids := dirProcs(n.dataDir)
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("localsvc: postgres processes %v of %s survive SIGKILL: %w", pids, n.name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// patroniStatus is the part of Patroni's GET /patroni answer we use.
type patroniStatus struct {
	State string `json:"state"` // "running", "starting", "stopped", ...
	Role  string `json:"role"`  // "master" (3.0's name for primary) or "replica"
}

// status asks the node's Patroni about its PostgreSQL.
func (n *patroniNode) status(ctx context.Context) (patroniStatus, error) {
	var s patroniStatus
	err := getJSON(ctx, fmt.Sprintf("http://127.0.0.1:%d/patroni", n.apiPort), &s)
	return s, err
}

// clusterMember is one member in Patroni's GET /cluster answer.
type clusterMember struct {
	Name  string `json:"name"`
	Role  string `json:"role"` // "leader", "sync_standby" or "replica"
	State string `json:"state"`
	Lag   any    `json:"lag"` // bytes, or "unknown"
}

// cluster asks the node's Patroni for the cluster as the DCS sees it.
func (n *patroniNode) cluster(ctx context.Context) ([]clusterMember, error) {
	var c struct {
		Members []clusterMember `json:"members"`
	}
	err := getJSON(ctx, fmt.Sprintf("http://127.0.0.1:%d/cluster", n.apiPort), &c)
	return c.Members, err
}

// logTail returns the node's latest Patroni and PostgreSQL output.
func (n *patroniNode) logTail(max int64) string {
	return fmt.Sprintf("\n--- %s ---\n%s", n.logPath, logSince(n.logPath, n.offset.Load(), max))
}

// guardianScript is run by /bin/sh with the data directories as
// arguments. It sleeps until SIGTERM (its parent-death signal) and then
// takes down the postmaster of each data directory with an immediate
// shutdown (SIGQUIT), which stops its backends too. Patroni detaches its
// postmasters, so without this a killed test binary would leave them
// running. A PID from postmaster.pid is signalled only if that process
// still runs in the data directory, so a recycled PID is left alone.
const guardianScript = `
cleanup() {
	for d in "$@"; do
		p=$(head -n 1 "$d/postmaster.pid" 2>/dev/null) || continue
		[ -n "$p" ] && [ "$(readlink "/proc/$p/cwd")" = "$d" ] && kill -QUIT "$p"
	done
	exit 0
}
trap 'cleanup "$@"' TERM
while :; do sleep 1 & wait $!; done
`

// startGuardian starts the guardian of the nodes' postmasters, as the
// server user (which may signal them).
func (t *Topology) startGuardian() error {
	args := []string{"-c", guardianScript, "localsvc-guardian"}
	for _, n := range t.nodes {
		args = append(args, n.dataDir)
	}
	cmd := exec.Command("/bin/sh", args...)
	cmd.Dir = t.dir
	cmd.Env = filteredEnv()
	cmd.SysProcAttr = sysProcAttr(t.cred, syscall.SIGTERM)
	c, err := startChild(cmd)
	if err != nil {
		return fmt.Errorf("localsvc: start guardian: %w", err)
	}
	t.guardian = c
	return nil
}

// stopGuardian kills the guardian and its sleep.
func (t *Topology) stopGuardian() {
	if !t.guardian.running() {
		return
	}
	_ = syscall.Kill(-t.guardian.pid, syscall.SIGKILL)
	t.guardian.waitExit(5 * time.Second)
}

// patronictl runs patronictl with the node's config and returns its
// output.
func (t *Topology) patronictl(ctx context.Context, n *patroniNode, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, patronictlTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, t.patronictlBin, append([]string{"-c", n.conf}, args...)...)
	cmd.Dir = n.dir
	cmd.Env = patroniEnv(n.dir)
	cmd.SysProcAttr = sysProcAttr(t.cred, syscall.SIGKILL)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("localsvc: patronictl %s: %w\n%s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// chownTree hands dir and everything below it to the server user.
func chownTree(dir string, cred *syscall.Credential) error {
	if cred == nil {
		return nil
	}
	return filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, int(cred.Uid), int(cred.Gid))
	})
}
