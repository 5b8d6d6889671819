package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/flagenv"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/stripetest"
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
	if c.console.addr == "" && !c.insecureNoAuth {
		c.console.addr = devConsoleAddr
	}
	consoleURL := "(off)"
	c.consoleStarted = func(url string) { consoleURL = url }

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
	apiKey := ""
	if !c.insecureNoAuth {
		if apiKey, err = devAdminKey(startCtx, c.databaseURL); err != nil {
			return err
		}
	}
	stripeNote := ""
	if c.topup.Provider == "stripe" && c.stripe.APIKey == "" {
		// No key: a local Stripe-compatible test server, so auto top-up can
		// be tried without an account. It charges nothing real.
		srv, err := stripetest.Start("")
		if err != nil {
			return fmt.Errorf("start the Stripe-compatible test server: %w", err)
		}
		defer srv.Close()
		c.stripe.APIKey, c.stripe.URL = "sk_test_tally_dev", srv.URL
		stripeNote = srv.URL + " (the Stripe-compatible TEST server of internal/stripetest: --topup-provider stripe without --stripe-api-key; nothing real is charged)"
		log.Info("auto top-up uses the Stripe-compatible test server (no --stripe-api-key given)", "url", srv.URL)
	} else if c.topup.Provider != "" {
		stripeNote = c.stripe.URL
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
		keyLine := "  export TALLY_API_KEY=" + apiKey
		if apiKey == "" {
			keyLine = "  (no authentication: --insecure-no-auth)"
		}
		fmt.Fprintf(os.Stderr, `
Tally dev server is up (Ctrl-C stops it and removes its data).

  gRPC:      %s      (grpcurl -plaintext %s list)
  health:    http://%s/healthz
  metrics:   http://%s/metrics
  console:   %s   (sign in with the API key below)
  database:  %s
  cache:     %s
  top-up:    %s
  API key:   an admin key was made for this run (TALLY_API_KEY below)

Try, in another terminal:
  export TALLY_ADDR=%s
%s
  go run ./cmd/tally account create --currency USD
  go run ./cmd/tally credit  --account <id> --amount 1000 --key topup-1
  go run ./cmd/tally charge  --account <id> --amount 250  --key order-1
  go run ./cmd/tally charge  --account <id> --amount 250  --key order-1   # replayed, charged once

`, grpcAddr, grpcAddr, httpAddr, httpAddr, consoleURL, c.databaseURL, orNone(c.redisURL), orNone(stripeNote), grpcAddr, keyLine)
		// Also on stdout alone, for scripts: eval "$(tallyd dev | head -1)".
		fmt.Fprintf(os.Stdout, "%s\n", strings.TrimSpace(keyLine))
	})
}

// devConsoleAddr is where `tallyd dev` serves the support console unless
// --console-addr says otherwise.
const devConsoleAddr = "127.0.0.1:7072"

// devAdminKey makes an admin key for this dev run: a new key of the client
// "dev-admin", created on first use (a kept --data-dir reuses it).
func devAdminKey(ctx context.Context, url string) (string, error) {
	st, err := store.Open(ctx, store.Config{URL: url, PoolConnsMax: 2})
	if err != nil {
		return "", err
	}
	defer st.Close()
	clientName := "dev-admin"
	if _, err := st.GetClientByName(ctx, clientName); errors.Is(err, store.ErrNotFound) {
		clientName = ""
	} else if err != nil {
		return "", err
	}
	c, err := auth.CreateKey(ctx, st, "dev-admin", auth.RoleAdmin, clientName)
	if err != nil {
		return "", err
	}
	return c.Key.String(), nil
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
