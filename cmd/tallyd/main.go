// Command tallyd is the Tally ledger server.
//
//	tallyd serve    run the gRPC service against PostgreSQL (and Redis)
//	tallyd migrate  apply the embedded schema migrations
//	tallyd dev      start a private PostgreSQL and Redis, migrate, and serve
//	tallyd keys     create, list and revoke API keys
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func usage() {
	fmt.Fprint(os.Stderr, `usage: tallyd <command> [flags]

commands:
  serve     run the gRPC service (needs --database-url)
  migrate   apply the embedded migrations to --database-url (PostgreSQL itself, not PgBouncer)
  dev       start a private throwaway PostgreSQL (and Redis, when installed) and serve
  keys      create, list and revoke API keys (tallyd keys -h)
  healthcheck  exit 0 when a local tallyd's /readyz answers 200 (for container health checks)

Run "tallyd <command> -h" for the flags of a command. Every flag --name can
also be set with the environment variable TALLY_NAME.
`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "serve":
		err = runServe(ctx, os.Args[2:])
	case "migrate":
		err = runMigrate(ctx, os.Args[2:])
	case "dev":
		err = runDev(ctx, os.Args[2:])
	case "keys":
		err = runKeys(ctx, os.Args[2:])
	case "healthcheck":
		err = runHealthcheck(ctx, os.Args[2:])
	case "-h", "--help", "help":
		usage()
		return
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		slog.Error("tallyd failed", "err", err)
		os.Exit(1)
	}
}
