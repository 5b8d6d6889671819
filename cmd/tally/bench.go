package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/bench"
)

// benchCmd runs `tally bench`: a load generator against a running tallyd.
func benchCmd(args []string, out io.Writer) error {
	var cfg bench.Config
	fs := flag.NewFlagSet("tally bench", flag.ContinueOnError)
	fs.StringVar(&cfg.Addr, "addr", client.AddrDefault, "tallyd gRPC address, or several separated by commas (replicas: connections go to each in turn)")
	fs.StringVar(&cfg.APIKey, "api-key", "", "API key")
	fs.StringVar(&cfg.Scenario, "scenario", "charge-uniform", "one of "+strings.Join(bench.Scenarios, ", "))
	fs.IntVar(&cfg.Clients, "clients", bench.ClientsDefault, "concurrent clients (each runs one call at a time)")
	fs.IntVar(&cfg.Conns, "conns", bench.ConnsDefault, "gRPC connections the clients share")
	fs.DurationVar(&cfg.Duration, "duration", bench.DurationDefault, "measured time")
	fs.DurationVar(&cfg.Warmup, "warmup", bench.WarmupDefault, "unmeasured load before the measured time")
	fs.IntVar(&cfg.Accounts, "accounts", bench.AccountsDefault, "accounts of the uniform scenarios")
	fs.IntVar(&cfg.SetupClients, "setup-clients", bench.SetupClientsDefault, "concurrency of account setup")
	fs.StringVar(&cfg.Currency, "currency", bench.CurrencyDefault, "currency of the bench accounts")
	fs.StringVar(&cfg.Seed, "seed", "", "names the bench accounts; the same seed reuses them (default: fresh accounts)")
	fs.StringVar(&cfg.Consistency, "consistency", "", "balance reads: cached (default) or strong")
	serverPIDs := fs.String("server-pid", "", "tallyd's pid (or several, comma-separated), to read peak RSS and CPU time from /proc")
	fs.StringVar(&cfg.ServerHTTP, "server-http", "", "tallyd's --http-addr (or several, comma-separated), to read batch statistics")
	fs.StringVar(&cfg.DatabaseURL, "database-url", "", "the bench database (PostgreSQL URL), to read commits/s, sequential scans and PostgreSQL's CPU time per op")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("tally bench: unexpected argument %q", fs.Arg(0))
	}
	for _, p := range strings.Split(*serverPIDs, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		pid, err := strconv.Atoi(p)
		if err != nil || pid <= 0 {
			return fmt.Errorf("tally bench: --server-pid: bad pid %q", p)
		}
		cfg.ServerPIDs = append(cfg.ServerPIDs, pid)
	}
	if !*quiet {
		cfg.Log = func(format string, a ...any) { fmt.Fprintf(os.Stderr, "tally bench: "+format+"\n", a...) }
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := bench.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if *jsonOut {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	bench.Print(out, res)
	return nil
}

// benchUsageCmd runs `tally bench-usage`: SummarizeUsage timed against a
// tallyd whose rollups bench/usage.sql filled (bench/usage.sh does both).
func benchUsageCmd(args []string, out io.Writer) error {
	var cfg bench.UsageConfig
	fs := flag.NewFlagSet("tally bench-usage", flag.ContinueOnError)
	fs.StringVar(&cfg.Addr, "addr", client.AddrDefault, "tallyd gRPC address")
	fs.StringVar(&cfg.APIKey, "api-key", "", "API key")
	fs.StringVar(&cfg.From, "from", "", "first day queried (YYYY-MM-DD)")
	fs.StringVar(&cfg.To, "to", "", "day the range ends before (YYYY-MM-DD)")
	fs.StringVar(&cfg.ExternalRef, "external-ref", "", "external_ref of the narrow query (none: skipped)")
	fs.StringVar(&cfg.AccountID, "account", "", "account of the narrow query (none: skipped)")
	fs.IntVar(&cfg.Repeats, "repeats", bench.UsageRepeatsDefault, "timed calls per query, after one untimed first call")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if cfg.From == "" || cfg.To == "" {
		return fmt.Errorf("tally bench-usage: --from and --to are required")
	}
	cfg.Log = func(format string, a ...any) { fmt.Fprintf(os.Stderr, "tally bench-usage: "+format+"\n", a...) }
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := bench.RunUsage(ctx, cfg)
	if err != nil {
		return err
	}
	if *jsonOut {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	bench.PrintUsage(out, res)
	return nil
}
