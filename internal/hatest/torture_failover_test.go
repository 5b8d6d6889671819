package hatest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/torture"
)

// Bounds of the torture failover test.
const (
	tortureFailoverDuration = 20 * time.Second
	tortureFailoverTimeout  = 4 * time.Minute
)

// The torture workload and nemesis (cmd/tally-torture -pg-failover) with
// PostgreSQL as a primary and a synchronous streaming standby: mid-workload
// the primary is killed with SIGKILL and the standby promoted; tallyd finds
// it through its two-host URL. Every torture invariant, checked on the new
// primary, must hold: no acknowledged op lost, none applied twice, the
// books balance, the cache and the feed agree.
func TestTortureSurvivesPostgresFailover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), tortureFailoverTimeout)
	defer cancel()
	var out strings.Builder
	rep, err := torture.Run(ctx, torture.Config{Duration: tortureFailoverDuration, Seed: 1, PGFailover: true, Out: &out})
	t.Log("\n" + out.String())
	if err != nil {
		t.Fatal(err)
	}
	var sum strings.Builder
	rep.PrintSummary(&sum)
	t.Log("\n" + sum.String())
	if rep.Faults[torture.FaultPGFailover] != 1 {
		t.Errorf("%d PostgreSQL failovers, want 1", rep.Faults[torture.FaultPGFailover])
	}
	if !rep.Pass {
		t.Fatalf("torture run with a PostgreSQL failover found %d violations (seed %d)", rep.Violations, rep.Seed)
	}
}
