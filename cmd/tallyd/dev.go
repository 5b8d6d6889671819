package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/tallyledger/tally/internal/flagenv"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/store"
)

// runDev starts a private, throwaway PostgreSQL (and Redis when redis-server
// is installed), migrates it and serves, so a newcomer needs nothing but the
// PostgreSQL server binaries. Everything it started stops on Ctrl-C.
func runDev(ctx context.Context, args []string) error {
	var c serveConfig
	fs := flag.NewFlagSet("tallyd dev", flag.ContinueOnError)
	c.register(fs, false)
	noRedis := fs.Bool("no-redis", false, "do not start a private Redis (run without a cache)")
	dataDir := fs.String("data-dir", "", "folder for the private servers' data, kept on exit and reused (default: a new temp folder, removed on exit)")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	c.logFormat = "text"
	log := newLogger(c.logLevel, c.logFormat)

	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	pg, err := localsvc.StartPostgres(startCtx, localsvc.PostgresOptions{Dir: *dataDir, Logger: log})
	if err != nil {
		return fmt.Errorf("start private PostgreSQL: %w", err)
	}
	if *dataDir == "" {
		defer pg.Close() // throwaway: stop and remove the data
	} else {
		defer pg.Stop("fast") // keep the data for the next run
	}
	c.databaseURL = pg.URL("postgres")
	if err := store.Migrate(startCtx, c.databaseURL); err != nil {
		return err
	}
	if _, err := exec.LookPath("redis-server"); err == nil && !*noRedis {
		rd, err := localsvc.StartRedis(startCtx, localsvc.RedisOptions{Dir: *dataDir, Logger: log})
		if err != nil {
			return fmt.Errorf("start private Redis: %w", err)
		}
		defer rd.Close() // a cache: nothing in it is worth keeping
		c.redisURL = rd.URL()
	} else if !*noRedis {
		log.Info("redis-server not found on PATH: running without a balance cache")
	}
	return serve(ctx, c, log, func(grpcAddr, httpAddr string) {
		fmt.Fprintf(os.Stderr, `
Tally dev server is up (Ctrl-C stops it and removes its data).

  gRPC:      %s      (grpcurl -plaintext %s list)
  health:    http://%s/healthz
  database:  %s
  cache:     %s

Try:
  export TALLY_ADDR=%s
  go run ./cmd/tally account create --currency USD
  go run ./cmd/tally credit  --account <id> --amount 1000 --key topup-1
  go run ./cmd/tally charge  --account <id> --amount 250  --key order-1
  go run ./cmd/tally charge  --account <id> --amount 250  --key order-1   # replayed, charged once

`, grpcAddr, grpcAddr, httpAddr, c.databaseURL, orNone(c.redisURL), grpcAddr)
	})
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
