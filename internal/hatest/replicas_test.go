package hatest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/bench"
	"github.com/tallyledger/tally/internal/tallytest"
)

// replicasBenchDuration keeps the three-replica benchmark short.
const replicasBenchDuration = 2 * time.Second

// `tally bench` against three tally servers on one database: the
// connections go to every server in turn, each server commits charges, and
// the books balance.
func TestBenchThreeReplicas(t *testing.T) {
	envs := make([]*tallytest.Env, 3)
	addrs := make([]string, len(envs))
	for i := range envs {
		envs[i] = tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL()})
		addrs[i] = envs[i].Addr
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := bench.Run(ctx, bench.Config{Addr: strings.Join(addrs, ","), APIKey: envs[0].AdminKey, Scenario: "charge-uniform",
		Clients: 6, Accounts: 30, Duration: replicasBenchDuration, Warmup: 0, Log: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	if res.Conns != 3 || res.Ops == 0 || len(res.Errors) > 0 {
		t.Fatalf("bench over 3 replicas: %d conns, %d ops, errors %v", res.Conns, res.Ops, res.Errors)
	}
	for i, e := range envs {
		st := e.Ledger.BatchStats()
		if st.Items == 0 {
			t.Errorf("server %d (%s) committed nothing: the load was not spread", i, addrs[i])
		}
		t.Logf("server %d: %d calls in %d batches", i, st.Items, st.Batches)
	}
	t.Logf("3 replicas: %.0f ops/s, p99 %.1f ms", res.Throughput, res.Latency.P99)
	envs[0].CheckBooks(t)
}
