// Command pgbouncer runs a private PgBouncer in front of a PostgreSQL
// server for bench/compare.sh (VIA=pgbouncer), until it is sent SIGTERM or
// SIGINT. It prints one JSON line, {"addr":"127.0.0.1:PORT"}, once
// PgBouncer accepts connections. It needs Debian's pgbouncer; run as root,
// PgBouncer itself runs as the postgres OS user (internal/localsvc).
//
//	go run ./bench/pgbouncer --target 127.0.0.1:5432 --pool-mode transaction --pool-size 20
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tallyledger/tally/internal/localsvc"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "pgbouncer: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("pgbouncer", flag.ContinueOnError)
	target := fs.String("target", "127.0.0.1:5432", "host:port of the PostgreSQL server")
	mode := fs.String("pool-mode", "transaction", "PgBouncer pool_mode: transaction, session or statement")
	size := fs.Int("pool-size", 20, "default_pool_size: server connections per database and user")
	clients := fs.Int("max-client-conn", 400, "max_client_conn: client connections accepted")
	dir := fs.String("dir", "", "directory for pgbouncer.ini and its log (default: a temporary one, removed)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	b, err := localsvc.StartPgBouncer(sctx, localsvc.PgBouncerOptions{Dir: *dir, Target: *target, PoolMode: *mode,
		DefaultPoolSize: *size, MaxClientConn: *clients, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	cancel()
	if err != nil {
		return err
	}
	defer b.Close()
	if err := json.NewEncoder(os.Stdout).Encode(map[string]string{"addr": b.Addr(), "log": b.LogPath()}); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}
