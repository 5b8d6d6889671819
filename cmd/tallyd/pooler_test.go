package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/flagenv"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// --database-pooler takes none (the default) or transaction, from the
// command line or $TALLY_DATABASE_POOLER, and refuses anything else with
// the list of values.
func TestDatabasePoolerFlag(t *testing.T) {
	parse := func(args ...string) (string, error) {
		var c serveConfig
		fs := newFlagSet(&c)
		fs.SetOutput(io.Discard)
		err := flagenv.Parse(fs, args)
		return c.databasePooler.get(), err
	}
	if got, err := parse(); err != nil || got != store.PoolerNone {
		t.Fatalf("default: %q %v, want none", got, err)
	}
	if got, err := parse("--database-pooler", "transaction"); err != nil || got != store.PoolerTransaction {
		t.Fatalf("--database-pooler transaction: %q %v", got, err)
	}
	if got, err := parse("--database-pooler=none"); err != nil || got != store.PoolerNone {
		t.Fatalf("--database-pooler=none: %q %v", got, err)
	}
	for _, bad := range []string{"session", "pgbouncer", "", "Transaction"} {
		if _, err := parse("--database-pooler", bad); err == nil || !strings.Contains(err.Error(), "want one of none, transaction") {
			t.Fatalf("--database-pooler %q: %v, want a refusal listing none, transaction", bad, err)
		}
	}
	t.Setenv("TALLY_DATABASE_POOLER", "transaction")
	if got, err := parse(); err != nil || got != store.PoolerTransaction {
		t.Fatalf("$TALLY_DATABASE_POOLER=transaction: %q %v", got, err)
	}
	if got, err := parse("--database-pooler", "none"); err != nil || got != store.PoolerNone {
		t.Fatalf("the flag must win over the environment: %q %v", got, err)
	}
	t.Setenv("TALLY_DATABASE_POOLER", "statement")
	if _, err := parse(); err == nil || !strings.Contains(err.Error(), "$TALLY_DATABASE_POOLER") || !strings.Contains(err.Error(), "none, transaction") {
		t.Fatalf("$TALLY_DATABASE_POOLER=statement: %v", err)
	}
}

// startPgBouncer runs a transaction-mode PgBouncer in front of the server
// of url and returns url's database through it.
func startPgBouncer(t *testing.T, dbURL string) string {
	_, via := tallytest.StartPgBouncer(t, dbURL, 2, nil)
	return via
}

// lockedBuffer is a log sink for a server's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Through PgBouncer: serve with --database-pooler transaction serves (and
// warns that the server has no statement_timeout of its own); with none it
// fails at once naming the flag, instead of waiting for a database that
// will never accept it; --migrate and `tallyd migrate` refuse the pooler.
func TestServeBehindPgBouncer(t *testing.T) {
	direct := newDB(t)
	via := startPgBouncer(t, direct)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	c := baseConfig(via)
	c.insecureNoAuth = true
	start := time.Now()
	err := serve(ctx, c, quietLog(), nil)
	if err == nil || !strings.Contains(err.Error(), "--database-pooler transaction") || !strings.Contains(err.Error(), "unsupported startup parameter") {
		t.Fatalf("serve through PgBouncer with --database-pooler none: %v, want a refusal naming the flag", err)
	}
	if d := time.Since(start); d > c.startupTimeout/2 {
		t.Fatalf("the refusal took %v: it must not wait for --startup-timeout", d)
	}

	c = baseConfig(via)
	c.insecureNoAuth = true
	c.migrate = true
	_ = c.databasePooler.Set(store.PoolerTransaction)
	if err := serve(ctx, c, quietLog(), nil); err == nil || !strings.Contains(err.Error(), "tallyd migrate --database-url") {
		t.Fatalf("--migrate with --database-pooler transaction: %v", err)
	}
	if err := runMigrate(ctx, []string{"--database-url", via}); !errors.Is(err, store.ErrPoolerNotDirect) {
		t.Fatalf("tallyd migrate through PgBouncer: %v, want ErrPoolerNotDirect", err)
	}

	c.migrate = false
	var logs lockedBuffer
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	done := make(chan error, 1)
	go func() {
		done <- serve(sctx, c, slog.New(slog.NewJSONHandler(&logs, nil)), func(grpcAddr, _ string) {
			defer scancel()
			cl, err := client.New(client.Config{Addr: grpcAddr, Policy: client.Policy{RetryAttemptsMax: 1}})
			if err != nil {
				t.Errorf("client: %v", err)
				return
			}
			defer cl.Close()
			a, err := cl.CreateAccount(sctx, &tallyv1.CreateAccountRequest{Currency: "USD"})
			if err == nil {
				_, err = cl.Credit(sctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
			}
			if err != nil {
				t.Errorf("call through PgBouncer: %v", err)
			}
		})
	}()
	if err := <-done; err != nil {
		t.Fatalf("serve with --database-pooler transaction: %v", err)
	}
	out := logs.String()
	if !strings.Contains(out, `"database_pooler":"transaction"`) {
		t.Fatalf("the serving log line does not name the pooler:\n%s", out)
	}
	// The shared test server has no statement_timeout of its own.
	if !strings.Contains(out, "ALTER ROLE") {
		t.Fatalf("no warning about the server's missing statement_timeout:\n%s", out)
	}
}
