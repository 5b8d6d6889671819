package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/bench"
)

type benchOpts struct {
	cfg        bench.Config
	serverPIDs string
	json       bool
	quiet      bool
}

// Validate parses --server-pid.
func (o *benchOpts) Validate() error {
	o.cfg.ServerPIDs = nil
	for _, p := range strings.Split(o.serverPIDs, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		pid, err := strconv.Atoi(p)
		if err != nil || pid <= 0 {
			return fmt.Errorf("--server-pid: bad pid %q", p)
		}
		o.cfg.ServerPIDs = append(o.cfg.ServerPIDs, pid)
	}
	return nil
}

// newBenchCmd is `tally bench`: a load generator against a running tallyd.
func (a *app) newBenchCmd() *cobra.Command {
	o := &benchOpts{}
	cmd := &cobra.Command{Use: "bench", Short: "Load-test a running tallyd (throughput, latency, batch sizes)", Args: cobra.NoArgs,
		RunE: a.runE(o), Example: "  tally bench --addr 127.0.0.1:7070 --scenario charge-uniform --clients 32 --duration 20s"}
	f, cfg := cmd.Flags(), &o.cfg
	f.StringVar(&cfg.Addr, "addr", client.AddrDefault, "tallyd gRPC address, or several separated by commas (replicas: connections go to each in turn)")
	f.StringVar(&cfg.APIKey, "api-key", "", "API key")
	enumFlag(cmd, &cfg.Scenario, "scenario", "charge-uniform", bench.Scenarios, "workload")
	f.IntVar(&cfg.Clients, "clients", bench.ClientsDefault, "concurrent clients (each runs one call at a time)")
	f.IntVar(&cfg.Conns, "conns", bench.ConnsDefault, "gRPC connections the clients share")
	f.DurationVar(&cfg.Duration, "duration", bench.DurationDefault, "measured time")
	f.DurationVar(&cfg.Warmup, "warmup", bench.WarmupDefault, "unmeasured load before the measured time")
	f.IntVar(&cfg.Accounts, "accounts", bench.AccountsDefault, "accounts of the uniform scenarios")
	f.IntVar(&cfg.SetupClients, "setup-clients", bench.SetupClientsDefault, "concurrency of account setup")
	f.StringVar(&cfg.Currency, "currency", bench.CurrencyDefault, "currency of the bench accounts")
	f.StringVar(&cfg.Seed, "seed", "", "names the bench accounts; the same seed reuses them (default: fresh accounts)")
	enumFlag(cmd, &cfg.Consistency, "consistency", "", []string{"cached", "strong"}, "balance reads (default cached)")
	f.StringVar(&o.serverPIDs, "server-pid", "", "tallyd's pid (or several, comma-separated), to read peak RSS and CPU time from /proc")
	f.StringVar(&cfg.ServerHTTP, "server-http", "", "tallyd's --http-addr (or several, comma-separated), to read batch statistics")
	f.StringVar(&cfg.DatabaseURL, "database-url", "", "the bench database (PostgreSQL URL), to read commits/s, sequential scans and PostgreSQL's CPU time per op")
	f.BoolVar(&o.json, "json", false, "print the result as JSON")
	f.BoolVar(&o.quiet, "quiet", false, "no progress lines on stderr")
	return cmd
}

func (o *benchOpts) run(a *app) error {
	if !o.quiet {
		o.cfg.Log = func(format string, args ...any) { fmt.Fprintf(a.errOut, "tally bench: "+format+"\n", args...) }
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := bench.Run(ctx, o.cfg)
	if err != nil {
		return err
	}
	if o.json {
		enc := json.NewEncoder(a.out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	bench.Print(a.out, res)
	return nil
}

type benchUsageOpts struct {
	cfg  bench.UsageConfig
	json bool
}

// Validate has nothing to check: cobra enforces --from and --to.
func (o *benchUsageOpts) Validate() error { return nil }

// newBenchUsageCmd is `tally bench-usage`: SummarizeUsage timed against a
// tallyd whose rollups bench/usage.sql filled (bench/usage.sh does both).
func (a *app) newBenchUsageCmd() *cobra.Command {
	o := &benchUsageOpts{}
	cmd := &cobra.Command{Use: "bench-usage", Short: "Time SummarizeUsage against filled rollups (bench/usage.sh)", Args: cobra.NoArgs,
		RunE: a.runE(o)}
	f, cfg := cmd.Flags(), &o.cfg
	f.StringVar(&cfg.Addr, "addr", client.AddrDefault, "tallyd gRPC address")
	f.StringVar(&cfg.APIKey, "api-key", "", "API key")
	f.StringVar(&cfg.From, "from", "", "first day queried (YYYY-MM-DD)")
	f.StringVar(&cfg.To, "to", "", "day the range ends before (YYYY-MM-DD)")
	f.StringVar(&cfg.ExternalRef, "external-ref", "", "external_ref of the narrow query (none: skipped)")
	f.StringVar(&cfg.AccountID, "account", "", "account of the narrow query (none: skipped)")
	f.IntVar(&cfg.Repeats, "repeats", bench.UsageRepeatsDefault, "timed calls per query, after one untimed first call")
	f.BoolVar(&o.json, "json", false, "print the result as JSON")
	require(cmd, "from", "to")
	return cmd
}

func (o *benchUsageOpts) run(a *app) error {
	o.cfg.Log = func(format string, args ...any) { fmt.Fprintf(a.errOut, "tally bench-usage: "+format+"\n", args...) }
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := bench.RunUsage(ctx, o.cfg)
	if err != nil {
		return err
	}
	if o.json {
		enc := json.NewEncoder(a.out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	bench.PrintUsage(a.out, res)
	return nil
}
