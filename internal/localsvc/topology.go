package localsvc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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

	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/internal/faultproxy"
)

// TopologyOptions configures StartTopology.
type TopologyOptions struct {
	// Dir holds every server's files: etcd/, pg0/ and pg1/ (Patroni's
	// config and log, PostgreSQL's data directory), haproxy/ and
	// pgbouncer/. If empty, a fresh directory is created with
	// os.MkdirTemp and removed by Close.
	Dir string
	// Logger receives lifecycle events (the servers' own logs go to
	// files in Dir). Nil discards them.
	Logger *slog.Logger
	// AsyncReplication turns Patroni's synchronous_mode off, so a commit
	// is acknowledged before the standby has it: the deliberately broken
	// configuration, which loses acknowledged commits on failover.
	AsyncReplication bool
	// MaximumLagOnFailover is Patroni's maximum_lag_on_failover in bytes:
	// a standby further behind is not promoted. 0 means Patroni's default
	// (1 MiB); the broken run sets it huge so a lagging standby is
	// promoted anyway.
	MaximumLagOnFailover int64
	// PGConf holds extra PostgreSQL settings for both nodes (Patroni's
	// postgresql.parameters in the DCS). They override the defaults set
	// here.
	PGConf map[string]string
	// PgBouncer configures the pooler in front of HAProxy. Target is
	// filled in (HAProxy's primary port); Dir defaults to Dir/pgbouncer
	// and Logger to the topology's.
	PgBouncer PgBouncerOptions
}

// TopologySettings documents the failover-relevant settings a Topology
// runs with; see the constants they come from for why.
type TopologySettings struct {
	// TTL, LoopWait and RetryTimeout are Patroni's ttl, loop_wait and
	// retry_timeout: a dead leader is replaced about TTL after its last
	// lock refresh.
	TTL, LoopWait, RetryTimeout time.Duration
	// MaximumLagOnFailover is Patroni's maximum_lag_on_failover in bytes.
	MaximumLagOnFailover int64
	// SynchronousMode is Patroni's synchronous_mode; SynchronousModeStrict
	// is always false.
	SynchronousMode, SynchronousModeStrict bool
	// EtcdHeartbeatInterval and EtcdElectionTimeout are etcd's raft
	// timings.
	EtcdHeartbeatInterval, EtcdElectionTimeout time.Duration
	// HAProxyCheckInterval, HAProxyFall and HAProxyRise are HAProxy's
	// health check inter, fall and rise.
	HAProxyCheckInterval     time.Duration
	HAProxyFall, HAProxyRise int
}

// ErrNoLeader is wrapped by Leader's error when the cluster currently has
// no leader (after the old one's lock expired, before a new one took it).
var ErrNoLeader = errors.New("localsvc: the cluster has no leader")

// Topology is a local copy of the production database topology: three
// etcd members, two PostgreSQL nodes each managed by Patroni, HAProxy
// routing to whichever node Patroni calls the primary, and PgBouncer in
// front of HAProxy:
//
//	client -> PgBouncer -> HAProxy -> primary's PostgreSQL
//	standby's PostgreSQL -> ReplicationProxy(primary) -> primary's PostgreSQL
//
// Its methods are safe for concurrent use; KillNode, StartNode and Close
// are serialized.
type Topology struct {
	dir           string
	ownDir        bool
	sockDir       string
	ownSock       bool
	created       []string // subdirectories of a caller's Dir to remove
	cred          *syscall.Credential
	log           *slog.Logger
	scope         string
	binDir        string // PostgreSQL's
	patroniBin    string
	patronictlBin string
	settings      TopologySettings
	pgConf        map[string]string

	etcd     *etcdCluster
	nodes    []*patroniNode
	haproxy  *haproxyProc
	bouncer  *PgBouncer
	guardian *child

	opMu sync.Mutex // serializes KillNode, StartNode and Close

	mu     sync.Mutex // guards closed and every node's cur and offset
	closed bool
}

// Bounds of the topology's waits.
const (
	// topologyStartTimeout bounds StartTopology when ctx has no deadline.
	topologyStartTimeout = 3 * time.Minute
	// waitLeaderTimeout bounds WaitLeader when ctx has no deadline:
	// patroniTTL for the old lock to expire, a promotion, and HAProxy's
	// checks, several times over.
	waitLeaderTimeout = 60 * time.Second
	// probeConnectTimeout bounds one probe connection to PostgreSQL.
	probeConnectTimeout = 2 * time.Second
	// pollInterval is the pause between two probes of a polling wait.
	pollInterval = 100 * time.Millisecond
)

// topologyNodes are the Patroni member names.
var topologyNodes = []string{"pg0", "pg1"}

// StartTopology starts the whole topology and waits until a query through
// PgBouncer works: etcd (all three members healthy), pg0's Patroni (which
// bootstraps the cluster and becomes leader), pg1's Patroni (until it
// streams from pg0, as the synchronous standby unless AsyncReplication),
// HAProxy (until it routes to pg0 only) and PgBouncer. On failure
// everything already started is torn down.
//
// It needs patroni (with etcd3 support), etcd, haproxy, pgbouncer and the
// PostgreSQL server binaries; if any is missing the error wraps
// ErrNotInstalled and names them. When running as root, Patroni (and so
// PostgreSQL) and PgBouncer run as the "postgres" OS user.
func StartTopology(ctx context.Context, opts TopologyOptions) (_ *Topology, err error) {
	ctx, cancel := withDefaultTimeout(ctx, topologyStartTimeout)
	defer cancel()
	begin := time.Now()
	t := &Topology{log: nopLogger(opts.Logger), pgConf: opts.PGConf}
	if err := t.findPrograms(); err != nil {
		return nil, err
	}
	for k, v := range opts.PGConf {
		if !confKey.MatchString(k) || strings.ContainsAny(v, "\r\n") {
			return nil, fmt.Errorf("localsvc: invalid postgresql setting %q = %q", k, v)
		}
	}
	t.settings = TopologySettings{
		TTL:                   patroniTTL * time.Second,
		LoopWait:              patroniLoopWait * time.Second,
		RetryTimeout:          patroniRetryTimeout * time.Second,
		MaximumLagOnFailover:  opts.MaximumLagOnFailover,
		SynchronousMode:       !opts.AsyncReplication,
		EtcdHeartbeatInterval: etcdHeartbeatInterval,
		EtcdElectionTimeout:   etcdElectionTimeout,
		HAProxyCheckInterval:  haproxyCheckInterval,
		HAProxyFall:           haproxyFall,
		HAProxyRise:           haproxyRise,
	}
	if t.settings.MaximumLagOnFailover <= 0 {
		t.settings.MaximumLagOnFailover = patroniDefaultMaxLagOnFailover
	}
	if t.cred, err = serverCredential(); err != nil {
		return nil, err
	}
	if t.dir, t.ownDir, err = makeServerDir(opts.Dir, "tally-topo-", t.cred); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, t.Close())
		}
	}()
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	t.scope = "tally-" + hex.EncodeToString(rnd[:])
	if err := t.makeSockDir(); err != nil {
		return nil, err
	}

	// etcd first: Patroni waits for its DCS, sleeping 5 s between tries.
	step := time.Now()
	etcdDir, err := t.subdir("etcd", 0o755, false)
	if err != nil {
		return nil, err
	}
	if t.etcd, err = startEtcd(ctx, etcdDir, t.scope, t.log); err != nil {
		return nil, err
	}
	etcdTook := time.Since(step)

	ports, err := freePorts(2 * len(topologyNodes))
	if err != nil {
		return nil, err
	}
	for i, name := range topologyNodes {
		dir, err := t.subdir(name, 0o700, true)
		if err != nil {
			return nil, err
		}
		n := &patroniNode{
			name:    name,
			dir:     dir,
			dataDir: filepath.Join(dir, "data"),
			conf:    filepath.Join(dir, "patroni.yml"),
			logPath: filepath.Join(dir, "patroni.log"),
			pgPort:  ports[2*i],
			apiPort: ports[2*i+1],
		}
		if n.proxy, err = faultproxy.New("127.0.0.1:0", net.JoinHostPort("127.0.0.1", strconv.Itoa(n.pgPort))); err != nil {
			return nil, fmt.Errorf("localsvc: replication proxy for %s: %w", name, err)
		}
		t.nodes = append(t.nodes, n)
	}
	for _, n := range t.nodes {
		if err := t.writeConf(n); err != nil {
			return nil, err
		}
	}
	if err := t.startGuardian(); err != nil {
		return nil, err
	}

	// pg0 alone first, so it is the one that bootstraps (initdb) and
	// leads; pg1 then joins with a base backup from it.
	step = time.Now()
	first := t.nodes[0]
	t.mu.Lock()
	err = t.startPatroni(first)
	t.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := t.waitBootstrap(ctx, first); err != nil {
		return nil, err
	}
	pg0Took := time.Since(step)
	step = time.Now()
	for _, n := range t.nodes[1:] {
		t.mu.Lock()
		err = t.startPatroni(n)
		t.mu.Unlock()
		if err != nil {
			return nil, err
		}
		if err := t.WaitStreaming(ctx, n.name); err != nil {
			return nil, err
		}
	}
	pg1Took := time.Since(step)

	step = time.Now()
	var servers []haproxyServer
	for _, n := range t.nodes {
		servers = append(servers, haproxyServer{name: n.name, pgPort: n.pgPort, apiPort: n.apiPort})
	}
	haDir, err := t.subdir("haproxy", 0o755, false)
	if err != nil {
		return nil, err
	}
	if t.haproxy, err = startHAProxy(ctx, haDir, servers); err != nil {
		return nil, err
	}
	if _, err := t.WaitLeader(ctx, ""); err != nil {
		return nil, err
	}
	haTook := time.Since(step)

	step = time.Now()
	bo := opts.PgBouncer
	bo.Target = t.PrimaryAddr()
	if bo.Dir == "" {
		if bo.Dir, err = t.subdir("pgbouncer", 0o755, false); err != nil {
			return nil, err
		}
	}
	if bo.Logger == nil {
		bo.Logger = t.log
	}
	if t.bouncer, err = StartPgBouncer(ctx, bo); err != nil {
		return nil, err
	}
	if err := t.waitQuery(ctx, t.PoolerURL("postgres")); err != nil {
		return nil, fmt.Errorf("localsvc: no query through pgbouncer: %w\n--- %s ---\n%s", err, t.bouncer.LogPath(), logSince(t.bouncer.LogPath(), 0, 2048))
	}
	t.log.Info("topology ready", "took", time.Since(begin), "etcd", etcdTook, "pg0", pg0Took, "pg1", pg1Took,
		"haproxy", haTook, "pgbouncer", time.Since(step), "dir", t.dir, "sync", t.settings.SynchronousMode)
	return t, nil
}

// findPrograms locates every program the topology runs, and reports all
// missing ones at once.
func (t *Topology) findPrograms() error {
	var missing []string
	look := func(name string, find func(string) (string, error)) string {
		p, err := find(name)
		if err != nil {
			missing = append(missing, name)
		}
		return p
	}
	t.patroniBin = look("patroni", exec.LookPath)
	t.patronictlBin = look("patronictl", exec.LookPath)
	look("etcd", exec.LookPath)
	look("haproxy", findSbin)
	look("pgbouncer", findSbin)
	if pg := look("postgres", FindPostgresBin); pg != "" {
		if real, err := filepath.EvalSymlinks(pg); err == nil {
			pg = real
		}
		t.binDir = filepath.Dir(pg)
		for _, tool := range []string{"pg_ctl", "initdb", "pg_basebackup", "pg_rewind", "pg_controldata", "pg_isready"} {
			if _, err := os.Stat(filepath.Join(t.binDir, tool)); err != nil {
				missing = append(missing, filepath.Join(t.binDir, tool))
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("localsvc: topology needs %s (Debian: apt-get install patroni etcd-server haproxy pgbouncer postgresql): %w",
			strings.Join(missing, ", "), ErrNotInstalled)
	}
	return nil
}

// subdir creates Dir/name with mode perm, owned by the server user if
// server is set, and remembers it for Close.
func (t *Topology) subdir(name string, perm os.FileMode, server bool) (string, error) {
	dir := filepath.Join(t.dir, name)
	if err := os.RemoveAll(dir); err != nil { // a previous run's leftovers
		return "", fmt.Errorf("localsvc: %w", err)
	}
	if err := os.Mkdir(dir, perm); err != nil {
		return "", fmt.Errorf("localsvc: %w", err)
	}
	t.created = append(t.created, dir)
	if server {
		if err := chownTree(dir, t.cred); err != nil {
			return "", fmt.Errorf("localsvc: %w", err)
		}
	}
	return dir, nil
}

// makeSockDir creates the Unix socket directory both nodes share (their
// ports differ); see Postgres.makeSockDir for why it may live outside Dir.
func (t *Topology) makeSockDir() error {
	t.sockDir = filepath.Join(t.dir, "sock")
	if len(t.sockDir) > maxSockDirLen {
		d, err := os.MkdirTemp("", "tpts")
		if err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		t.sockDir, t.ownSock = d, true
	} else {
		if err := os.RemoveAll(t.sockDir); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		if err := os.Mkdir(t.sockDir, 0o700); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		t.created = append(t.created, t.sockDir)
	}
	if t.cred != nil {
		if err := ensureTraversable(filepath.Dir(t.sockDir), t.cred); err != nil {
			return err
		}
	}
	return chownTree(t.sockDir, t.cred)
}

// waitBootstrap waits until the first node has initialized the cluster,
// holds the leader lock and accepts writes.
func (t *Topology) waitBootstrap(ctx context.Context, n *patroniNode) error {
	ctx, cancel := context.WithTimeout(ctx, patroniStartTimeout)
	defer cancel()
	var last error
	for {
		t.mu.Lock()
		c := n.cur
		t.mu.Unlock()
		if !c.running() {
			return fmt.Errorf("localsvc: patroni %s exited while bootstrapping: %v%s", n.name, c.err, n.logTail(8192))
		}
		last = t.checkBootstrap(ctx, n)
		if last == nil {
			t.log.Info("cluster bootstrapped", "leader", n.name)
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("localsvc: %s did not bootstrap the cluster: %w (last: %v)%s%s", n.name, ctx.Err(), last, n.logTail(8192), t.etcd.logTails())
		case <-time.After(pollInterval):
		}
	}
}

// checkBootstrap checks one condition of waitBootstrap after the other.
func (t *Topology) checkBootstrap(ctx context.Context, n *patroniNode) error {
	st, err := n.status(ctx)
	if err != nil {
		return err
	}
	if st.State != "running" || (st.Role != "master" && st.Role != "primary") {
		return fmt.Errorf("%s is %s %s", n.name, st.State, st.Role)
	}
	leader, err := t.Leader(ctx)
	if err != nil {
		return err
	}
	if leader != n.name {
		return fmt.Errorf("leader is %q", leader)
	}
	var primary bool
	if err := probe(ctx, t.nodeURL(n, "postgres"), "SELECT NOT pg_is_in_recovery()", &primary); err != nil {
		return err
	}
	if !primary {
		return fmt.Errorf("%s is in recovery", n.name)
	}
	return nil
}

// Settings returns the timing and replication settings the topology runs
// with.
func (t *Topology) Settings() TopologySettings { return t.settings }

// Dir returns the directory holding every server's files and logs.
func (t *Topology) Dir() string { return t.dir }

// PoolerAddr returns PgBouncer's host:port: the path the application
// takes (PgBouncer -> HAProxy -> primary).
func (t *Topology) PoolerAddr() string { return t.bouncer.Addr() }

// PrimaryAddr returns HAProxy's primary frontend: the direct path to
// whichever node is the primary, for migrations and checks.
func (t *Topology) PrimaryAddr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(t.haproxy.port))
}

// DirectURL returns a URL for database db on the primary through HAProxy,
// bypassing PgBouncer.
func (t *Topology) DirectURL(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", t.PrimaryAddr(), db)
}

// PoolerURL returns a URL for database db through PgBouncer.
func (t *Topology) PoolerURL(db string) string { return t.bouncer.URL(db) }

// PgBouncer returns the topology's PgBouncer, e.g. to Kill and Start it.
// Close closes it.
func (t *Topology) PgBouncer() *PgBouncer { return t.bouncer }

// Nodes returns the Patroni member names, "pg0" and "pg1".
func (t *Topology) Nodes() []string {
	var names []string
	for _, n := range t.nodes {
		names = append(names, n.name)
	}
	return names
}

// NodePort returns the node's real PostgreSQL port (not its replication
// proxy), or 0 for an unknown name.
func (t *Topology) NodePort(name string) int {
	if n, err := t.node(name); err == nil {
		return n.pgPort
	}
	return 0
}

// NodeURL returns a URL for database db on the named node itself,
// whatever its role, or "" for an unknown name.
func (t *Topology) NodeURL(name, db string) string {
	if n, err := t.node(name); err == nil {
		return t.nodeURL(n, db)
	}
	return ""
}

// NodeLogPath returns the path of the node's log (Patroni's output, which
// includes its PostgreSQL's), or "" for an unknown name.
func (t *Topology) NodeLogPath(name string) string {
	if n, err := t.node(name); err == nil {
		return n.logPath
	}
	return ""
}

// ReplicationProxy returns the fault proxy in front of the node's
// PostgreSQL, which is that node's Patroni postgresql.connect_address:
// while the node leads, the standby streams WAL from it through this
// proxy, so Blackhole on the leader's proxy makes the standby lag (and,
// in synchronous mode, commits on the leader wait). HAProxy and NodeURL
// use the real port. Nil for an unknown name.
func (t *Topology) ReplicationProxy(name string) *faultproxy.Proxy {
	if n, err := t.node(name); err == nil {
		return n.proxy
	}
	return nil
}

// HAProxyStatus returns HAProxy's current view of each node ("UP",
// "DOWN", or a transition such as "UP 1/2").
func (t *Topology) HAProxyStatus(ctx context.Context) (map[string]string, error) {
	return t.haproxy.status(ctx)
}

// node returns the named node.
func (t *Topology) node(name string) (*patroniNode, error) {
	for _, n := range t.nodes {
		if n.name == name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("localsvc: no node %q (have %s)", name, strings.Join(t.Nodes(), ", "))
}

// nodeURL returns a URL for database db on n's real port.
func (t *Topology) nodeURL(n *patroniNode, db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", n.pgPort, db)
}

// members returns the cluster as the DCS sees it, asking the REST API of
// the first node whose Patroni is running and answers.
func (t *Topology) members(ctx context.Context) ([]clusterMember, error) {
	var errs []error
	for _, n := range t.nodes {
		t.mu.Lock()
		running := n.cur.running()
		t.mu.Unlock()
		if !running {
			continue
		}
		ms, err := n.cluster(ctx)
		if err == nil {
			return ms, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", n.name, err))
	}
	if len(errs) == 0 {
		return nil, errors.New("localsvc: no Patroni is running")
	}
	return nil, fmt.Errorf("localsvc: no Patroni REST API answers: %w", errors.Join(errs...))
}

// Leader returns the name of the node holding Patroni's leader lock, as
// the DCS sees it (asked through any running node's REST API). Right
// after a leader is killed this is still the dead node until its lock
// expires (about TTL). When no node holds the lock, the error wraps
// ErrNoLeader.
func (t *Topology) Leader(ctx context.Context) (string, error) {
	ms, err := t.members(ctx)
	if err != nil {
		return "", err
	}
	for _, m := range ms {
		if m.Role == "leader" {
			return m.Name, nil
		}
	}
	return "", ErrNoLeader
}

// WaitLeader waits until a node other than notName ("" accepts any) holds
// the leader lock, HAProxy routes to it alone (it is UP and every other
// node DOWN), and a connection through PrimaryAddr reaches it and is not
// in recovery. It returns the leader. Without a deadline in ctx it gives
// up after a minute.
func (t *Topology) WaitLeader(ctx context.Context, notName string) (string, error) {
	ctx, cancel := withDefaultTimeout(ctx, waitLeaderTimeout)
	defer cancel()
	var last error
	for {
		leader, err := t.Leader(ctx)
		if err == nil {
			if leader == notName {
				err = fmt.Errorf("leader is still %s", leader)
			} else {
				err = t.checkRouting(ctx, leader)
			}
		}
		if err == nil {
			return leader, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("localsvc: no leader other than %q reachable through haproxy: %w (last: %v)%s", notName, ctx.Err(), last, t.logTails())
		case <-time.After(pollInterval):
		}
	}
}

// checkRouting checks that HAProxy sends connections to leader only and
// that leader is a primary.
func (t *Topology) checkRouting(ctx context.Context, leader string) error {
	st, err := t.haproxy.status(ctx)
	if err != nil {
		return err
	}
	for _, n := range t.nodes {
		s := st[n.name]
		if n.name == leader && !strings.HasPrefix(s, "UP") || n.name != leader && !strings.HasPrefix(s, "DOWN") {
			return fmt.Errorf("haproxy sees %v with leader %s", st, leader)
		}
	}
	ln, err := t.node(leader)
	if err != nil {
		return err
	}
	var primary bool
	var port int
	if err := probe(ctx, t.DirectURL("postgres"), "SELECT NOT pg_is_in_recovery(), inet_server_port()", &primary, &port); err != nil {
		return err
	}
	if !primary || port != ln.pgPort {
		return fmt.Errorf("haproxy reached port %d (primary %v), want %s's %d", port, primary, leader, ln.pgPort)
	}
	return nil
}

// WaitStreaming waits until the named node is a standby streaming from the
// leader (pg_stat_replication on the leader) and, in synchronous mode, is
// the synchronous standby both in PostgreSQL (sync_state 'sync') and in
// Patroni (role sync_standby, which makes it eligible for failover).
// Without a deadline in ctx it gives up after a minute.
func (t *Topology) WaitStreaming(ctx context.Context, name string) error {
	n, err := t.node(name)
	if err != nil {
		return err
	}
	ctx, cancel := withDefaultTimeout(ctx, patroniStreamingTimeout)
	defer cancel()
	var last error
	for {
		last = t.checkStreaming(ctx, n)
		if last == nil {
			t.log.Info("standby streaming", "node", name, "sync", t.settings.SynchronousMode)
			return nil
		}
		t.mu.Lock()
		c := n.cur
		t.mu.Unlock()
		if !c.running() {
			return fmt.Errorf("localsvc: patroni %s is not running (%v): %v%s", name, c.err, last, n.logTail(8192))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("localsvc: %s not streaming: %w (last: %v)%s", name, ctx.Err(), last, t.logTails())
		case <-time.After(pollInterval):
		}
	}
}

// checkStreaming checks WaitStreaming's conditions once.
func (t *Topology) checkStreaming(ctx context.Context, n *patroniNode) error {
	ms, err := t.members(ctx)
	if err != nil {
		return err
	}
	var leader, role string
	for _, m := range ms {
		if m.Role == "leader" {
			leader = m.Name
		}
		if m.Name == n.name {
			role = m.Role
		}
	}
	switch {
	case leader == "":
		return ErrNoLeader
	case leader == n.name:
		return fmt.Errorf("%s is the leader", n.name)
	case t.settings.SynchronousMode && role != "sync_standby":
		return fmt.Errorf("patroni calls %s %q, not sync_standby", n.name, role)
	}
	ln, err := t.node(leader)
	if err != nil {
		return err
	}
	var state, syncState string
	err = probeArgs(ctx, t.nodeURL(ln, "postgres"),
		"SELECT coalesce(max(state), ''), coalesce(max(sync_state), '') FROM pg_stat_replication WHERE application_name = $1",
		[]any{n.name}, &state, &syncState)
	if err != nil {
		return err
	}
	if state != "streaming" || t.settings.SynchronousMode && syncState != "sync" {
		return fmt.Errorf("on leader %s, %s's replication state is %q, sync_state %q", leader, n.name, state, syncState)
	}
	return nil
}

// KillNode SIGKILLs the node's Patroni and its PostgreSQL (postmaster and
// every backend) together, like a machine dying, and waits until they are
// gone. Its leader lock, if it held it, stays in etcd until it expires
// (about TTL). Killing a dead node is not an error.
func (t *Topology) KillNode(name string) error {
	n, err := t.node(name)
	if err != nil {
		return err
	}
	t.opMu.Lock()
	defer t.opMu.Unlock()
	t.mu.Lock()
	closed := t.closed
	t.mu.Unlock()
	if closed {
		return ErrClosed
	}
	t.log.Info("killing node", "node", name)
	return t.killNode(context.Background(), n)
}

// StartNode starts the node's Patroni again and waits until its REST API
// answers. Patroni then starts PostgreSQL as a standby of the current
// leader, rewinding it first (pg_rewind) if it was a primary that had
// diverged, or rebuilding it from a base backup if that fails; use
// WaitStreaming to wait for that. It is an error to start a running node.
func (t *Topology) StartNode(ctx context.Context, name string) error {
	n, err := t.node(name)
	if err != nil {
		return err
	}
	ctx, cancel := withDefaultTimeout(ctx, patroniStartTimeout)
	defer cancel()
	t.opMu.Lock()
	defer t.opMu.Unlock()
	t.mu.Lock()
	switch {
	case t.closed:
		err = ErrClosed
	case n.cur.running():
		err = fmt.Errorf("localsvc: patroni %s is already running", name)
	default:
		err = t.startPatroni(n)
	}
	c := n.cur
	t.mu.Unlock()
	if err != nil {
		return err
	}
	for {
		if _, err := n.status(ctx); err == nil {
			return nil
		}
		select {
		case <-c.done:
			return fmt.Errorf("localsvc: patroni %s exited during startup: %v%s", name, c.err, n.logTail(8192))
		case <-ctx.Done():
			return fmt.Errorf("localsvc: patroni %s REST API not answering: %w%s", name, ctx.Err(), n.logTail(8192))
		case <-time.After(pollInterval):
		}
	}
}

// Switchover makes the synchronous (or only) standby the leader in a
// planned switchover (`patronictl switchover --force`), after waiting for
// it to stream, and waits as WaitLeader does for the new leader. It
// returns the old and the new leader.
func (t *Topology) Switchover(ctx context.Context) (from, to string, err error) {
	ctx, cancel := withDefaultTimeout(ctx, patroniStreamingTimeout+patronictlTimeout+waitLeaderTimeout)
	defer cancel()
	if from, err = t.Leader(ctx); err != nil {
		return "", "", err
	}
	for _, n := range t.nodes {
		if n.name != from {
			to = n.name
		}
	}
	if err := t.WaitStreaming(ctx, to); err != nil {
		return from, to, err
	}
	ln, _ := t.node(from)
	out, err := t.patronictl(ctx, ln, "switchover", "--leader", from, "--candidate", to, "--force")
	if err != nil {
		return from, to, err
	}
	t.log.Info("switchover requested", "from", from, "to", to, "patronictl", strings.TrimSpace(out))
	got, err := t.WaitLeader(ctx, from)
	if err != nil {
		return from, to, err
	}
	if got != to {
		return from, got, fmt.Errorf("localsvc: switchover from %s to %s made %s the leader", from, to, got)
	}
	return from, to, nil
}

// logTails returns the latest log output of both nodes and HAProxy, for
// error messages.
func (t *Topology) logTails() string {
	var b strings.Builder
	for _, n := range t.nodes {
		b.WriteString(n.logTail(4096))
	}
	if t.haproxy != nil {
		b.WriteString(t.haproxy.logTail())
	}
	return b.String()
}

// Close tears everything down: PgBouncer, HAProxy, both nodes (SIGKILL,
// as their data is thrown away), the guardian, the replication proxies and
// etcd, waits until none of their processes is left, and removes Dir if
// StartTopology created it (else the subdirectories it created). Close is
// idempotent.
func (t *Topology) Close() error {
	t.opMu.Lock()
	defer t.opMu.Unlock()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.mu.Unlock()

	var errs []error
	if t.bouncer != nil {
		errs = append(errs, t.bouncer.Close())
	}
	if t.haproxy != nil {
		errs = append(errs, t.haproxy.close())
	}
	for _, n := range t.nodes {
		errs = append(errs, t.killNode(context.Background(), n))
	}
	t.stopGuardian()
	for _, n := range t.nodes {
		if n.proxy != nil {
			errs = append(errs, n.proxy.Close())
		}
	}
	if t.etcd != nil {
		errs = append(errs, t.etcd.close())
	}
	if t.ownSock {
		errs = append(errs, os.RemoveAll(t.sockDir))
	}
	if t.ownDir {
		errs = append(errs, os.RemoveAll(t.dir))
	} else {
		for _, d := range t.created {
			errs = append(errs, os.RemoveAll(d))
		}
	}
	return errors.Join(errs...)
}

// waitQuery waits until SELECT 1 works on url.
func (t *Topology) waitQuery(ctx context.Context, url string) error {
	var last error
	for {
		var one int
		if last = probe(ctx, url, "SELECT 1", &one); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(pollInterval):
		}
	}
}

// probe runs one query without arguments on a fresh connection and scans
// its single row into dest. It uses the simple protocol, which works
// through PgBouncer in transaction mode.
func probe(ctx context.Context, url, sql string, dest ...any) error {
	return probeArgs(ctx, url, sql, nil, dest...)
}

// probeArgs is probe with query arguments.
func probeArgs(ctx context.Context, url, sql string, args []any, dest ...any) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return err
	}
	cfg.ConnectTimeout = probeConnectTimeout
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	ctx, cancel := context.WithTimeout(ctx, 2*probeConnectTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.QueryRow(ctx, sql, args...).Scan(dest...)
}
