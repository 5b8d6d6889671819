package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/tallyledger/tally/internal/bench"
	"github.com/tallyledger/tally/internal/tallytest"
)

// tally bench --database-url reports PostgreSQL's side of the cost: commits,
// sequential scans and the bench database backends' CPU per operation.
func TestBenchCost(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	args := []string{"--addr", env.Addr, "--api-key", env.AdminKey, "--scenario", "charge-uniform",
		"--clients", "4", "--accounts", "20", "--duration", "1500ms", "--warmup", "0s", "--quiet",
		"--server-pid", strconv.Itoa(os.Getpid()), "--database-url", dbURL}
	var out bytes.Buffer
	if err := run(append([]string{"bench"}, append(args, "--json")...), &out); err != nil {
		t.Fatal(err)
	}
	var r bench.Result
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	c := r.Cost
	if r.Ops == 0 || c.TallydCPUUsPerOp == nil || c.ClientCPUUsPerOp == nil || c.PGBackendsCPUUsPerOp == nil ||
		c.Commits == nil || c.CommitsPerS == nil || c.PGBackendsScope != bench.PGScopeBackends {
		t.Fatalf("cost not measured: ops %d, %s", r.Ops, out.String())
	}
	if *c.TallydCPUUsPerOp <= 0 || *c.ClientCPUUsPerOp <= 0 {
		t.Fatalf("no CPU per op: %s", out.String())
	}
	if c.ItemsPerBatch != nil {
		t.Fatalf("items/batch without --server-http: %v", *c.ItemsPerBatch)
	}
	out.Reset()
	if err := run(append([]string{"bench"}, args...), &out); err != nil {
		t.Fatal(err)
	}
	t.Logf("tally bench printed:\n%s", out.String())
	for _, want := range []string{"cpu µs/op    tallyd ", "pg cpu µs/op ", bench.PGScopeBackends, "/s (", "seq scans    ", "load average "} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("output lacks %q:\n%s", want, out.String())
		}
	}
}
