package localsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Settings of the etcd cluster a Topology runs on.
const (
	// etcdMemberCount is three: the smallest cluster that keeps a quorum
	// when one member is lost, as in production.
	etcdMemberCount = 3
	// etcdHeartbeatInterval and etcdElectionTimeout are etcd's raft
	// timings, a tenth of the defaults (100 ms, 1 s): all members are on
	// one host, so round trips are microseconds, and a quick election
	// keeps an etcd hiccup from eating into Patroni's ttl. The election
	// timeout stays 10 heartbeats, as etcd recommends, so a member
	// starved of CPU for a few heartbeats on a busy machine does not
	// start needless elections.
	etcdHeartbeatInterval = 50 * time.Millisecond
	etcdElectionTimeout   = 500 * time.Millisecond
	// etcdStartTimeout bounds the wait for all members to report healthy.
	etcdStartTimeout = 30 * time.Second
)

// etcdCluster is a private etcd cluster run as child processes: the DCS
// (distributed configuration store) Patroni elects its leader in.
type etcdCluster struct {
	bin     string
	dir     string
	token   string
	log     *slog.Logger
	members []*etcdMember
}

// etcdMember is one etcd process.
type etcdMember struct {
	name       string
	dataDir    string
	logPath    string
	clientPort int
	peerPort   int
	offset     int64 // log size when this member was last started
	cur        *child
}

// startEtcd starts an etcd cluster of etcdMemberCount members with data in
// dir/eN, and waits until every member is healthy. token names the cluster
// so members of another test's cluster cannot join it by accident.
func startEtcd(ctx context.Context, dir, token string, log *slog.Logger) (*etcdCluster, error) {
	bin, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("localsvc: %w: %w", err, ErrNotInstalled)
	}
	ctx, cancel := withDefaultTimeout(ctx, etcdStartTimeout*portRaceAttemptsMax)
	defer cancel()
	e := &etcdCluster{bin: bin, dir: dir, token: token, log: log}
	// The ports go into every member's --initial-cluster, so a lost race
	// for one of them means starting all over: e.start picks new ports.
	start := func() error {
		err := e.start(ctx)
		if err != nil {
			e.close()
		}
		return err
	}
	err = retryPortRace(false, start, func() error {
		log.Info("etcd port taken, retrying on new ports")
		return nil
	})
	if err != nil {
		return nil, err
	}
	return e, nil
}

// start launches all members on fresh ports and data directories and waits
// for them to be healthy.
func (e *etcdCluster) start(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, etcdStartTimeout)
	defer cancel()
	ports, err := freePorts(2 * etcdMemberCount)
	if err != nil {
		return err
	}
	e.members = nil
	var initial []string
	for i := range etcdMemberCount {
		m := &etcdMember{
			name:       fmt.Sprintf("e%d", i),
			clientPort: ports[2*i],
			peerPort:   ports[2*i+1],
		}
		m.dataDir = filepath.Join(e.dir, m.name)
		m.logPath = filepath.Join(e.dir, m.name+".log")
		// A previous attempt's data would carry the old member ports.
		if err := os.RemoveAll(m.dataDir); err != nil {
			return fmt.Errorf("localsvc: %w", err)
		}
		e.members = append(e.members, m)
		initial = append(initial, fmt.Sprintf("%s=http://127.0.0.1:%d", m.name, m.peerPort))
	}
	for _, m := range e.members {
		if err := e.launch(m, strings.Join(initial, ",")); err != nil {
			return err
		}
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		healthy := 0
		for _, m := range e.members {
			if !m.cur.running() {
				return fmt.Errorf("localsvc: etcd member %s exited during startup: %v\n--- %s ---\n%s", m.name, m.cur.err, m.logPath, logSince(m.logPath, m.offset, 4096))
			}
			if etcdHealthy(ctx, m.clientAddr()) {
				healthy++
			}
		}
		if healthy == len(e.members) {
			e.log.Info("etcd cluster healthy", "endpoints", e.endpoints())
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("localsvc: etcd cluster not healthy (%d of %d members): %w%s", healthy, len(e.members), ctx.Err(), e.logTails())
		case <-tick.C:
		}
	}
}

// launch starts one member.
func (e *etcdCluster) launch(m *etcdMember, initialCluster string) error {
	logf, offset, err := openLog(m.logPath)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	m.offset = offset
	fmt.Fprintf(logf, "=== localsvc: starting etcd %s (client %d, peer %d) at %s ===\n", m.name, m.clientPort, m.peerPort, time.Now().Format(time.RFC3339Nano))
	client := fmt.Sprintf("http://127.0.0.1:%d", m.clientPort)
	peer := fmt.Sprintf("http://127.0.0.1:%d", m.peerPort)
	cmd := exec.Command(e.bin,
		"--name", m.name,
		"--data-dir", m.dataDir,
		"--listen-client-urls", client,
		"--advertise-client-urls", client,
		"--listen-peer-urls", peer,
		"--initial-advertise-peer-urls", peer,
		"--initial-cluster", initialCluster,
		"--initial-cluster-state", "new",
		"--initial-cluster-token", e.token,
		"--heartbeat-interval", strconv.FormatInt(etcdHeartbeatInterval.Milliseconds(), 10),
		"--election-timeout", strconv.FormatInt(etcdElectionTimeout.Milliseconds(), 10),
		"--logger", "zap",
		"--log-outputs", "stderr")
	cmd.Dir = e.dir
	cmd.Env = filteredEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	// etcd does not refuse root, and its data is thrown away with the
	// topology, so it runs as us and may be SIGKILLed when we die.
	cmd.SysProcAttr = sysProcAttr(nil, syscall.SIGKILL)
	c, err := startChild(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("localsvc: start etcd: %w", err)
	}
	m.cur = c
	return nil
}

// etcdHealthy reports whether the member at addr answers /health with
// health "true", which etcd does only while it is part of a cluster with
// an elected leader.
func etcdHealthy(ctx context.Context, addr string) bool {
	var h struct {
		Health string `json:"health"`
	}
	if err := getJSON(ctx, "http://"+addr+"/health", &h); err != nil {
		return false
	}
	return h.Health == "true"
}

// clientAddr returns the member's client host:port.
func (m *etcdMember) clientAddr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(m.clientPort))
}

// endpoints returns every member's client host:port.
func (e *etcdCluster) endpoints() []string {
	var eps []string
	for _, m := range e.members {
		eps = append(eps, m.clientAddr())
	}
	return eps
}

// logTails returns the latest output of every member, for error messages.
func (e *etcdCluster) logTails() string {
	var b strings.Builder
	for _, m := range e.members {
		fmt.Fprintf(&b, "\n--- %s ---\n%s", m.logPath, logSince(m.logPath, m.offset, 2048))
	}
	return b.String()
}

// close SIGKILLs every member and waits for them to be reaped; the data is
// thrown away, so there is nothing to shut down cleanly.
func (e *etcdCluster) close() error {
	var errs []error
	for _, m := range e.members {
		errs = append(errs, m.cur.kill("etcd "+m.name))
	}
	return errors.Join(errs...)
}

// httpProbeTimeout bounds one HTTP request to a local server's status API
// (etcd's /health, Patroni's REST API, HAProxy's stats page): they answer
// in milliseconds, and a hung one must not stall a polling loop.
const httpProbeTimeout = 2 * time.Second

// probeClient is the HTTP client for local status APIs. It keeps no idle
// connections, so polling a server that is about to be killed leaves
// nothing half-open behind.
var probeClient = &http.Client{
	Timeout:   httpProbeTimeout,
	Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
}

// getJSON GETs url and decodes a JSON body into v; a status other than 200
// is an error.
func getJSON(ctx context.Context, url string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// freePorts returns n distinct free ports. All are held open until the
// last is found, so they differ from each other (FreePort alone may hand
// out the same port twice); as with FreePort, another process may still
// take one before it is bound.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("localsvc: find free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
