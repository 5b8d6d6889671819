package hatest

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/torture"
)

// Bounds of the Patroni tests. The run is long enough for a failover
// (the leader key must expire: up to Patroni's ttl), the old primary's
// rejoin and a switchover, with writes after each.
const (
	patroniRunDuration    = 40 * time.Second
	patroniBrokenDuration = 25 * time.Second
	patroniTestTimeout    = 8 * time.Minute
	// brokenLagFor is how long the broken run's standby is cut off from
	// the primary's WAL while the primary keeps acknowledging charges.
	brokenLagFor = 3 * time.Second
)

// tallydPoolerArgs put every tallyd in transaction-pooler mode: it talks
// to PgBouncer (transaction pooling), as in production.
var tallydPoolerArgs = []string{"--database-pooler", "transaction"}

// topology adapts localsvc's Patroni deployment to what a torture run
// needs: migrations and the checker go direct to the primary (HAProxy),
// tallyds through PgBouncer.
type topology struct{ *localsvc.Topology }

func (t topology) TallydTarget() string { return t.PoolerAddr() }

// startTopology starts etcd, two Patroni nodes, HAProxy and PgBouncer, or
// skips loudly when Debian's packages are missing.
func startTopology(t *testing.T, ctx context.Context, opts localsvc.TopologyOptions) *localsvc.Topology {
	t.Helper()
	opts.Dir = filepath.Join(t.TempDir(), "topology")
	start := time.Now()
	topo, err := localsvc.StartTopology(ctx, opts)
	if errors.Is(err, localsvc.ErrNotInstalled) {
		t.Skipf("SKIPPED, NOT PASSED: %v (apt-get install patroni etcd-server etcd-client haproxy pgbouncer; .ci/run does)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := topo.Close(); err != nil {
			t.Errorf("closing the topology: %v", err)
		}
	})
	leader, _ := topo.Leader(ctx)
	t.Logf("topology up in %s: etcd x3, Patroni %v (leader %s), HAProxy primary at %s, PgBouncer (transaction) at %s",
		time.Since(start).Round(time.Millisecond), topo.Nodes(), leader, topo.PrimaryAddr(), topo.PoolerAddr())
	return topo
}

// other is the node of a two-node topology that is not name.
func other(topo *localsvc.Topology, name string) string {
	for _, n := range topo.Nodes() {
		if n != name {
			return n
		}
	}
	return ""
}

// killLeader kills the leader's machine (KillNode) and waits until another
// node leads and takes writes through HAProxy; it returns that node and
// how long it took.
func killLeader(ctx context.Context, topo *localsvc.Topology, leader string) (string, time.Duration, error) {
	killed := time.Now()
	if err := topo.KillNode(leader); err != nil {
		return "", 0, err
	}
	promoted, err := topo.WaitLeader(ctx, leader)
	return promoted, time.Since(killed), err
}

// patroniFailover is the unplanned fault: the leader's machine dies
// (Patroni and PostgreSQL killed with SIGKILL together), Patroni promotes
// the synchronous standby once the leader key expires, and the old
// primary, started again, rejoins as a standby (pg_rewind if its timeline
// went further).
func patroniFailover(topo *localsvc.Topology) func(context.Context) (torture.FaultOutcome, error) {
	return func(ctx context.Context) (torture.FaultOutcome, error) {
		leader, err := topo.Leader(ctx)
		if err != nil {
			return torture.FaultOutcome{}, err
		}
		standby := other(topo, leader)
		if err := topo.WaitStreaming(ctx, standby); err != nil {
			return torture.FaultOutcome{}, err
		}
		promoted, took, err := killLeader(ctx, topo, leader)
		if err != nil {
			return torture.FaultOutcome{}, err
		}
		recovered := time.Now()
		if err := topo.StartNode(ctx, leader); err != nil {
			return torture.FaultOutcome{}, err
		}
		if err := topo.WaitStreaming(ctx, leader); err != nil {
			return torture.FaultOutcome{}, err
		}
		return torture.FaultOutcome{Recovered: recovered,
			Detail: fmt.Sprintf("leader %s killed -9 (Patroni and PostgreSQL); %s promoted and writable through HAProxy after %s; %s rejoined as a streaming standby %s later",
				leader, promoted, took.Round(time.Millisecond), leader, time.Since(recovered).Round(time.Millisecond))}, nil
	}
}

// patroniSwitchover is the planned fault: `patronictl switchover` to the
// synchronous standby.
func patroniSwitchover(topo *localsvc.Topology) func(context.Context) (torture.FaultOutcome, error) {
	return func(ctx context.Context) (torture.FaultOutcome, error) {
		leader, err := topo.Leader(ctx)
		if err != nil {
			return torture.FaultOutcome{}, err
		}
		if err := topo.WaitStreaming(ctx, other(topo, leader)); err != nil {
			return torture.FaultOutcome{}, err
		}
		began := time.Now()
		from, to, err := topo.Switchover(ctx)
		if err != nil {
			return torture.FaultOutcome{}, err
		}
		recovered := time.Now()
		if err := topo.WaitStreaming(ctx, from); err != nil {
			return torture.FaultOutcome{}, err
		}
		return torture.FaultOutcome{Recovered: recovered,
			Detail: fmt.Sprintf("patronictl switchover %s -> %s; writable through HAProxy after %s; %s streaming again %s later",
				from, to, recovered.Sub(began).Round(time.Millisecond), from, time.Since(recovered).Round(time.Millisecond))}, nil
	}
}

// runTopologyTorture runs the torture workload (two tallyds behind
// PgBouncer) on topo with faults and logs its summary.
func runTopologyTorture(t *testing.T, ctx context.Context, topo *localsvc.Topology, d time.Duration, faults []torture.ScheduledFault) *torture.Report {
	t.Helper()
	var out strings.Builder
	rep, err := torture.Run(ctx, torture.Config{Duration: d, Seed: 1, Topology: topology{topo}, Faults: faults,
		TallydArgs: tallydPoolerArgs, Out: &out})
	t.Log("\n" + out.String())
	if err != nil {
		t.Fatal(err)
	}
	var sum strings.Builder
	rep.PrintSummary(&sum)
	t.Log("\n" + sum.String())
	return rep
}

// The torture workload with two tallyds behind PgBouncer (transaction
// pooling) and HAProxy, on PostgreSQL managed by Patroni with etcd in
// synchronous mode: a leader killed -9 with its Patroni, then a planned
// switchover. Every torture invariant holds on the final primary, no
// acknowledged op is lost, and the longest write gap of each is printed.
func TestPatroniFailoverAndSwitchover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), patroniTestTimeout)
	defer cancel()
	topo := startTopology(t, ctx, localsvc.TopologyOptions{})
	rep := runTopologyTorture(t, ctx, topo, patroniRunDuration, []torture.ScheduledFault{
		{Name: "patroni_failover", At: 0.2, Do: patroniFailover(topo)},
		{Name: "patroni_switchover", At: 0.6, Do: patroniSwitchover(topo)},
	})
	if len(rep.ScheduledFaults) != 2 {
		t.Fatalf("%d scheduled faults happened, want the failover and the switchover", len(rep.ScheduledFaults))
	}
	for _, f := range rep.ScheduledFaults {
		t.Logf("%s: acknowledged before %d, after %d, lost %d, longest write gap %s",
			f.Name, f.AckedBefore, f.AckedAfter, f.Lost, f.WriteGap.Round(time.Millisecond))
		if f.Lost != 0 {
			t.Errorf("%s lost %d acknowledged ops", f.Name, f.Lost)
		}
	}
	if !rep.Pass {
		t.Fatalf("torture on Patroni found %d violations (seed %d)", rep.Violations, rep.Seed)
	}
	t.Logf("RESULT: PASS: all %d invariants hold on the final primary", len(rep.Invariants))
}

// The check can fail: with synchronous_mode off, the standby cut off from
// the primary's WAL while the primary keeps acknowledging charges, and
// maximum_lag_on_failover high enough that Patroni promotes it anyway,
// the killed primary takes acknowledged charges with it, and the run
// must report them lost and fail.
func TestPatroniBrokenAsyncFailoverLosesAcks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), patroniTestTimeout)
	defer cancel()
	topo := startTopology(t, ctx, localsvc.TopologyOptions{AsyncReplication: true, MaximumLagOnFailover: 1 << 40})
	lagging := func(ctx context.Context) (torture.FaultOutcome, error) {
		leader, err := topo.Leader(ctx)
		if err != nil {
			return torture.FaultOutcome{}, err
		}
		link := topo.ReplicationProxy(leader)
		link.Blackhole()
		defer link.Heal()
		time.Sleep(brokenLagFor)
		promoted, took, err := killLeader(ctx, topo, leader)
		if err != nil {
			return torture.FaultOutcome{}, err
		}
		return torture.FaultOutcome{Recovered: time.Now(),
			Detail: fmt.Sprintf("asynchronous standby cut off from %s's WAL for %s, then %s killed -9; lagging %s promoted after %s",
				leader, brokenLagFor, leader, promoted, took.Round(time.Millisecond))}, nil
	}
	rep := runTopologyTorture(t, ctx, topo, patroniBrokenDuration, []torture.ScheduledFault{
		{Name: "async_lagging_failover", At: 0.3, Do: lagging},
	})
	if len(rep.ScheduledFaults) != 1 {
		t.Fatalf("the broken failover did not happen")
	}
	f := rep.ScheduledFaults[0]
	t.Logf("%s: acknowledged before %d, after %d, lost %d, longest write gap %s",
		f.Name, f.AckedBefore, f.AckedAfter, f.Lost, f.WriteGap.Round(time.Millisecond))
	if f.Lost == 0 || rep.Pass {
		t.Fatalf("the broken run lost %d acknowledged ops and the checker says pass=%v: want losses and FAIL, or the check cannot fail", f.Lost, rep.Pass)
	}
	t.Logf("as it must: the broken run lost %d acknowledged ops and the checker FAILED (%d violations)", f.Lost, rep.Violations)
}
