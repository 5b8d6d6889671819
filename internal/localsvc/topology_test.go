package localsvc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// topoRows returns the ids in table t on url, through the simple protocol
// (url may be PgBouncer's).
func topoRows(t *testing.T, ctx context.Context, url string) string {
	t.Helper()
	conn := connectSimple(t, ctx, url)
	defer conn.Close(ctx)
	r, err := conn.Query(ctx, "SELECT id FROM t ORDER BY id")
	if err != nil {
		t.Fatalf("%s: %v", url, err)
	}
	ids, err := pgx.CollectRows(r, pgx.RowTo[int])
	if err != nil {
		t.Fatalf("%s: %v", url, err)
	}
	return fmt.Sprint(ids)
}

// procsUnder returns "pid cmdline" of every live process whose working
// directory or command line mentions dir.
func procsUnder(dir string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		if state, _, ok := procStat(e.Name()); !ok || state == 'Z' || state == 'X' {
			continue
		}
		cwd, _ := os.Readlink("/proc/" + e.Name() + "/cwd")
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		line := strings.ReplaceAll(string(cmd), "\x00", " ")
		if strings.HasPrefix(cwd, dir) || strings.Contains(line, dir) {
			out = append(out, e.Name()+" "+line)
		}
	}
	return out
}

// TestTopology runs the production topology through a crash of the
// leader's machine, its rejoin and a planned switchover, checking that a
// committed row survives each and that Close leaves no process behind.
func TestTopology(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	topo, err := StartTopology(ctx, TopologyOptions{Dir: dir, Logger: testLogger(t)})
	if errors.Is(err, ErrNotInstalled) {
		t.Skipf("SKIPPED, NOT TESTED: the HA topology is MISSING programs: %v; install with apt-get install patroni etcd-server haproxy pgbouncer", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			topo.Close()
		}
	}()
	t.Logf("startup (etcd x3, pg0 bootstrap, pg1 sync standby, haproxy, pgbouncer): %v", time.Since(begin))
	if s := topo.Settings(); !s.SynchronousMode || s.LoopWait+2*s.RetryTimeout > s.TTL {
		t.Fatalf("settings %+v", s)
	}
	if got := fmt.Sprint(topo.Nodes()); got != "[pg0 pg1]" {
		t.Fatalf("Nodes = %s", got)
	}
	leader, err := topo.Leader(ctx)
	if err != nil || leader != "pg0" {
		t.Fatalf("Leader = %q, %v; want pg0", leader, err)
	}

	pool := connectSimple(t, ctx, topo.PoolerURL("postgres"))
	if _, err := pool.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY)"); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}

	// A machine dies: the leader's Patroni and PostgreSQL at once.
	step := time.Now()
	if err := topo.KillNode(leader); err != nil {
		t.Fatal(err)
	}
	next, err := topo.WaitLeader(ctx, leader)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("failover %s -> %s (lock expiry + promotion + haproxy switch): %v", leader, next, time.Since(step))
	if got := topoRows(t, ctx, topo.NodeURL(next, "postgres")); got != "[1]" {
		t.Fatalf("rows on new leader %s = %s, want [1]", next, got)
	}
	// PgBouncer's server connection died with the old primary; a new
	// client transaction gets one to the new primary.
	step = time.Now()
	for {
		_, err := pool.Exec(ctx, "INSERT INTO t VALUES (2)")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		t.Logf("insert through pgbouncer after failover: %v", err)
		pool.Close(ctx)
		pool = connectSimple(t, ctx, topo.PoolerURL("postgres"))
	}
	t.Logf("first write through pgbouncer after failover: %v later", time.Since(step))

	// The dead machine comes back and rejoins as the sync standby.
	step = time.Now()
	if err := topo.StartNode(ctx, leader); err != nil {
		t.Fatal(err)
	}
	if err := topo.StartNode(ctx, leader); err == nil {
		t.Fatal("StartNode of a running node succeeded")
	}
	if err := topo.WaitStreaming(ctx, leader); err != nil {
		t.Fatal(err)
	}
	t.Logf("rejoin of %s (pg_rewind, streaming, sync standby): %v", leader, time.Since(step))
	if got := topoRows(t, ctx, topo.NodeURL(leader, "postgres")); got != "[1 2]" {
		t.Fatalf("rows on rejoined %s = %s, want [1 2]", leader, got)
	}

	step = time.Now()
	from, to, err := topo.Switchover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if from != next || to != leader {
		t.Fatalf("Switchover = %s -> %s, want %s -> %s", from, to, next, leader)
	}
	t.Logf("switchover %s -> %s: %v", from, to, time.Since(step))
	if got := topoRows(t, ctx, topo.DirectURL("postgres")); got != "[1 2]" {
		t.Fatalf("rows through haproxy after switchover = %s, want [1 2]", got)
	}
	for {
		_, err := pool.Exec(ctx, "INSERT INTO t VALUES (3)")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		pool.Close(ctx)
		pool = connectSimple(t, ctx, topo.PoolerURL("postgres"))
	}
	if got := topoRows(t, ctx, topo.PoolerURL("postgres")); got != "[1 2 3]" {
		t.Fatalf("rows through pgbouncer after switchover = %s, want [1 2 3]", got)
	}
	pool.Close(ctx)

	step = time.Now()
	closed = true
	if err := topo.Close(); err != nil {
		t.Fatal(err)
	}
	if err := topo.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("close: %v", time.Since(step))
	if left := procsUnder(dir); len(left) > 0 {
		t.Fatalf("processes left after Close:\n%s", strings.Join(left, "\n"))
	}
	if err := topo.KillNode("pg0"); !errors.Is(err, ErrClosed) {
		t.Fatalf("KillNode after Close = %v, want ErrClosed", err)
	}
	t.Logf("total: %v", time.Since(begin))
}

// TestTopologyDiesWithParent SIGKILLs a process that started a topology
// and checks that none of its processes survives it: Patroni detaches its
// postmasters, so this is the guardian's job.
func TestTopologyDiesWithParent(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("parent-death signals are Linux-only")
	}
	if os.Getenv("LOCALSVC_TOPO_HELPER") == "1" {
		helperTopology()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestTopologyDiesWithParent$")
	cmd.Env = append(os.Environ(), "LOCALSVC_TOPO_HELPER=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var dir, status string
	if _, err := fmt.Fscanln(out, &status, &dir); err != nil || status != "ready" {
		cmd.Process.Kill()
		cmd.Wait()
		if status == "missing" {
			t.Skipf("SKIPPED, NOT TESTED: the HA topology is MISSING programs; install with apt-get install patroni etcd-server haproxy pgbouncer")
		}
		t.Fatalf("helper did not start a topology: %q %v", status, err)
	}
	defer os.RemoveAll(dir)
	if len(procsUnder(dir)) < 6 {
		t.Fatalf("helper's topology has too few processes: %v", procsUnder(dir))
	}
	cmd.Process.Kill()
	cmd.Wait()
	step := time.Now()
	deadline := time.Now().Add(15 * time.Second)
	for {
		left := procsUnder(dir)
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes outlived their parent:\n%s", strings.Join(left, "\n"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("all topology processes gone %v after the parent died", time.Since(step))
}

// helperTopology runs in the child of TestTopologyDiesWithParent: it
// starts a topology, prints "ready <dir>" and waits to be killed.
func helperTopology() {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "tally-topohelper-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	topo, err := StartTopology(ctx, TopologyOptions{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		if errors.Is(err, ErrNotInstalled) {
			fmt.Println("missing", dir)
		}
		os.Exit(1)
	}
	fmt.Println("ready", topo.Dir())
	<-ctx.Done() // killed long before this
	os.Exit(1)
}
