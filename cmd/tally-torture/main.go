// Command tally-torture is Tally's crash-safety torture test.
//
// It builds tallyd from this checkout, starts a private PostgreSQL and Redis
// and several tallyd processes (each behind TCP fault proxies to both), runs
// concurrent clients that charge, credit, transfer, hold, refund, batch and
// read balances, a client that freezes, updates and closes accounts, and a
// change-feed follower, while a seeded nemesis kills tallyd, restarts
// PostgreSQL, kills and flushes Redis, partitions and slows the network and
// plants stale cache values; then heals everything, lets the follower catch
// up, runs a Reconcile, and checks the history, the feed and the final state
// against the ledger's invariants.
//
//	go run ./cmd/tally-torture -duration 60s -seed 1
//
// With -pg-failover, PostgreSQL runs as a primary with a synchronous
// streaming standby, every tallyd names both (target_session_attrs=
// read-write), and once, at 40% of the run, the primary is killed with
// SIGKILL and the standby promoted; the check runs on the new primary.
//
// With -pgbouncer, a PgBouncer in transaction pooling mode stands between
// every tallyd's PostgreSQL fault proxy and PostgreSQL, and the tallyds run
// with --database-pooler transaction; PostgreSQL restarts happen behind it.
//
// Exit status: 0 all invariants hold; 1 a violation was found (or a run of
// at least a minute did not inject every fault kind); 2 the run could not be
// carried out (bad flags, a server would not start).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tallyledger/tally/internal/torture"
)

func main() {
	os.Exit(run())
}

func run() int {
	var cfg torture.Config
	var jsonOut string
	fs := flag.NewFlagSet("tally-torture", flag.ContinueOnError)
	fs.DurationVar(&cfg.Duration, "duration", torture.DefaultDuration, "how long the workload and nemesis run (checking comes after)")
	fs.Int64Var(&cfg.Seed, "seed", 0, "seed of the fault schedule and workload (default: time-based, printed)")
	fs.IntVar(&cfg.Tallyds, "tallyds", torture.DefaultTallyds, "number of tallyd processes (at least 2)")
	fs.IntVar(&cfg.Clients, "clients", torture.DefaultClients, "number of concurrent clients")
	fs.IntVar(&cfg.Accounts, "accounts", torture.DefaultAccounts, "number of customer accounts (over two currencies; at least 8)")
	fs.DurationVar(&cfg.CacheTTL, "cache-ttl", torture.DefaultCacheTTL, "tallyd --cache-ttl for the run")
	fs.StringVar(&jsonOut, "json-out", "", "write the report as JSON to this file")
	fs.StringVar(&cfg.TallydBin, "tallyd-bin", "", "use this tallyd binary instead of building ./cmd/tallyd")
	fs.StringVar(&cfg.OldTallydBin, "old-tallyd-bin", "", "rolling upgrade: start every tallyd on this (previous release's) binary and replace them one at a time by the new one during the run, instead of injecting faults")
	fs.BoolVar(&cfg.PGFailover, "pg-failover", false, "run PostgreSQL as a primary with a synchronous streaming standby, kill -9 the primary and promote the standby once mid-run, and check everything on the new primary")
	fs.BoolVar(&cfg.PgBouncer, "pgbouncer", false, fmt.Sprintf("put PgBouncer in transaction pooling mode (%d server connections) between the tallyds' fault proxies and PostgreSQL, and run them with --database-pooler transaction (migrations, keys and the checker connect directly); not with -old-tallyd-bin or -pg-failover", torture.PgBouncerServerConns))
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the work dir (logs, stopped PostgreSQL data) after the run")
	fs.BoolVar(&cfg.Verbose, "verbose", false, "print every fault as it is injected")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "tally-torture: unexpected arguments %v\n", fs.Args())
		return 2
	}
	seedSet := false
	fs.Visit(func(f *flag.Flag) { seedSet = seedSet || f.Name == "seed" })
	if !seedSet {
		cfg.Seed = time.Now().UnixNano() % 1_000_000_000
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := torture.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tally-torture: run failed (seed %d): %v\n", cfg.Seed, err)
		return 2
	}
	rep.PrintSummary(os.Stdout)
	if jsonOut != "" {
		if err := rep.WriteJSON(jsonOut); err != nil {
			fmt.Fprintf(os.Stderr, "tally-torture: write %s: %v\n", jsonOut, err)
			return 2
		}
		fmt.Printf("report written to %s\n", jsonOut)
	}
	if rep.TempDir != "" {
		fmt.Printf("work dir kept: %s\n", rep.TempDir)
	}
	if !rep.Pass {
		return 1
	}
	if len(rep.FaultsMissing) > 0 && cfg.Duration >= torture.DefaultDuration {
		fmt.Fprintf(os.Stderr, "tally-torture: a %s run must inject every fault kind; never injected: %v\n", cfg.Duration, rep.FaultsMissing)
		return 1
	}
	return 0
}
