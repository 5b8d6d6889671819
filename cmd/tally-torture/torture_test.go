package main

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/torture"
)

// TestTorture runs a seeded torture run (the same as
// `go run ./cmd/tally-torture -duration 60s -seed 1`). It takes about a
// minute and a half, so it only runs with TALLY_TORTURE=1;
// TALLY_TORTURE_DURATION and TALLY_TORTURE_SEED override the defaults, and
// TALLY_TORTURE_PGBOUNCER=1 runs it behind PgBouncer (-pgbouncer).
func TestTorture(t *testing.T) {
	if os.Getenv("TALLY_TORTURE") != "1" {
		t.Skip("set TALLY_TORTURE=1 to run the torture test (about 90 s)")
	}
	cfg := torture.Config{Duration: 60 * time.Second, Seed: 1, Out: t.Output()}
	if v := os.Getenv("TALLY_TORTURE_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("TALLY_TORTURE_DURATION: %v", err)
		}
		cfg.Duration = d
	}
	if v := os.Getenv("TALLY_TORTURE_SEED"); v != "" {
		s, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("TALLY_TORTURE_SEED: %v", err)
		}
		cfg.Seed = s
	}
	cfg.PgBouncer = os.Getenv("TALLY_TORTURE_PGBOUNCER") == "1"
	rep, err := torture.Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	rep.PrintSummary(t.Output())
	if len(rep.FaultsMissing) > 0 && cfg.Duration >= 60*time.Second {
		t.Errorf("fault kinds never injected: %v", rep.FaultsMissing)
	}
	if !rep.Pass {
		t.Fatalf("torture run found %d violations (seed %d)", rep.Violations, rep.Seed)
	}
}
