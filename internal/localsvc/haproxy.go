package localsvc

import (
	"bufio"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Settings of the HAProxy in front of the Patroni nodes.
const (
	// haproxyCheckInterval is how often HAProxy asks each node's Patroni
	// whether it is the primary. With haproxyFall 2 a dead or demoted
	// primary stops receiving connections about a second after Patroni
	// stops calling it the primary; haproxyRise 1 lets the new one in on
	// its first good check.
	haproxyCheckInterval = 500 * time.Millisecond
	haproxyFall          = 2
	haproxyRise          = 1
	// haproxyStartTimeout bounds the wait for HAProxy to listen.
	haproxyStartTimeout = 30 * time.Second
)

// haproxyServer is one backend server of the primary frontend.
type haproxyServer struct {
	name    string
	pgPort  int // where connections go
	apiPort int // Patroni's REST API, which answers the health check
}

// haproxyProc is a private HAProxy run as a child process, routing a TCP
// port to whichever server's Patroni says it is the primary, with a stats
// page that shows what HAProxy currently believes.
type haproxyProc struct {
	bin       string
	dir       string
	conf      string
	logPath   string
	offset    int64
	port      int // the primary frontend
	statsPort int
	servers   []haproxyServer
	cur       *child
}

// startHAProxy starts HAProxy in the foreground with its files in dir and
// waits until both its ports listen. It does not wait for a healthy
// server: that is the caller's business.
func startHAProxy(ctx context.Context, dir string, servers []haproxyServer) (*haproxyProc, error) {
	bin, err := findSbin("haproxy")
	if err != nil {
		return nil, err
	}
	ctx, cancel := withDefaultTimeout(ctx, haproxyStartTimeout*portRaceAttemptsMax)
	defer cancel()
	h := &haproxyProc{bin: bin, dir: dir, conf: filepath.Join(dir, "haproxy.cfg"), logPath: filepath.Join(dir, "haproxy.log"), servers: servers}
	pick := func() error {
		ports, err := freePorts(2)
		if err != nil {
			return err
		}
		h.port, h.statsPort = ports[0], ports[1]
		return nil
	}
	if err := pick(); err != nil {
		return nil, err
	}
	if err := retryPortRace(false, func() error { return h.start(ctx) }, pick); err != nil {
		return nil, err
	}
	return h, nil
}

// writeConf writes haproxy.cfg, following Patroni's HAProxy example.
func (h *haproxyProc) writeConf() error {
	var b strings.Builder
	fmt.Fprintf(&b, `# Written by internal/localsvc on every start; edits are lost.
global
    maxconn 1000
    nbthread 1
    # Foreground (-db): the log is stdout, which is haproxy.log.
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    timeout connect 2s
    timeout check 1s
    # A ledger's pool (and PgBouncer's) holds idle connections for long;
    # a short idle timeout would cut them behind the pool's back.
    timeout client 30m
    timeout server 30m

listen stats
    mode http
    # Polled many times a second by WaitLeader; not worth a log line.
    no log
    bind 127.0.0.1:%d
    stats enable
    stats uri /

listen primary
    bind 127.0.0.1:%d
    # Log health changes and failed sessions, not every healthy one.
    option tcplog
    option dontlog-normal
    option httpchk OPTIONS /primary
    http-check expect status 200
    # shutdown-sessions: connections to a node that stopped being the
    # primary are cut at once, so clients reconnect to the new one
    # instead of writing into a demoted or dead server.
    default-server inter %dms fall %d rise %d on-marked-down shutdown-sessions
`, h.statsPort, h.port, haproxyCheckInterval.Milliseconds(), haproxyFall, haproxyRise)
	for _, s := range h.servers {
		fmt.Fprintf(&b, "    server %s 127.0.0.1:%d maxconn 100 check port %d\n", s.name, s.pgPort, s.apiPort)
	}
	if err := os.WriteFile(h.conf, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	return nil
}

// start writes the config, launches haproxy and waits until it listens.
func (h *haproxyProc) start(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, haproxyStartTimeout)
	defer cancel()
	if err := h.writeConf(); err != nil {
		return err
	}
	logf, offset, err := openLog(h.logPath)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	h.offset = offset
	fmt.Fprintf(logf, "=== localsvc: starting haproxy on port %d (stats %d) at %s ===\n", h.port, h.statsPort, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(h.bin, "-db", "-f", h.conf)
	cmd.Dir = h.dir
	cmd.Env = filteredEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	// HAProxy keeps no state, so SIGKILL on parent death loses nothing.
	cmd.SysProcAttr = sysProcAttr(nil, syscall.SIGKILL)
	c, err := startChild(cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("localsvc: start haproxy: %w", err)
	}
	h.cur = c
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return fmt.Errorf("localsvc: haproxy exited during startup: %v%s", c.err, h.logTail())
		case <-ctx.Done():
			h.close()
			return fmt.Errorf("localsvc: haproxy not listening: %w%s", ctx.Err(), h.logTail())
		case <-tick.C:
		}
		// HAProxy binds all its listeners before serving any, so the
		// stats page answering means the primary port is bound too.
		if _, err := h.status(ctx); err == nil {
			return nil
		}
	}
}

// status returns what HAProxy believes of each server of the primary
// frontend: "UP", "DOWN", or a transition such as "UP 1/2" (one failed
// check of haproxyFall), from its stats page in CSV.
func (h *haproxyProc) status(ctx context.Context) (map[string]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/;csv", h.statsPort), nil)
	if err != nil {
		return nil, err
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("haproxy stats: %s", resp.Status)
	}
	// The header line starts with "# "; drop it so csv sees field names.
	r := bufio.NewReader(resp.Body)
	if _, err := r.Discard(2); err != nil {
		return nil, err
	}
	cr := csv.NewReader(r)
	cr.FieldsPerRecord = -1
	header, err := cr.Read()
	if err != nil {
		return nil, err
	}
	col := map[string]int{}
	for i, name := range header {
		col[name] = i
	}
	px, sv, st := col["pxname"], col["svname"], col["status"]
	if st == 0 {
		return nil, errors.New("haproxy stats: no status column")
	}
	out := map[string]string{}
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		if len(rec) > st && rec[px] == "primary" && rec[sv] != "FRONTEND" && rec[sv] != "BACKEND" {
			out[rec[sv]] = rec[st]
		}
	}
}

// logTail returns HAProxy's latest output for error messages.
func (h *haproxyProc) logTail() string {
	return fmt.Sprintf("\n--- %s ---\n%s", h.logPath, logSince(h.logPath, h.offset, 4096))
}

// close SIGKILLs HAProxy and waits for it to be reaped.
func (h *haproxyProc) close() error {
	return h.cur.kill("haproxy")
}
