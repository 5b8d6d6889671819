package store_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/store"
)

// startPgBouncer runs a PgBouncer in transaction mode with two server
// connections in front of this package's database server, and returns it
// with the URL of this package's database through it.
func startPgBouncer(t *testing.T, extra map[string]string) (*localsvc.PgBouncer, string) {
	return tallytest.StartPgBouncer(t, dbURL, 2, extra)
}

// Behind a transaction pooler the store sets its timeouts in each
// transaction (PgBouncer refuses them as startup parameters), and they end
// with it: statements outside a transaction see the server's default.
func TestTransactionPoolerSetsTimeoutsPerTransaction(t *testing.T) {
	t.Parallel()
	_, via := startPgBouncer(t, nil)
	ctx := context.Background()
	st, err := store.Open(ctx, store.Config{URL: via, Pooler: store.PoolerTransaction, StatementTimeout: 7 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for name, want := range map[string]string{"statement_timeout": "7s", "idle_in_transaction_session_timeout": "14s", "application_name": store.ApplicationName} {
		got, err := st.SettingInTxForTest(ctx, name)
		if err != nil || got != want {
			t.Fatalf("%s in a transaction = %q (%v), want %q", name, got, err, want)
		}
	}
	direct, err := store.Open(ctx, store.Config{URL: dbURL})
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	want, err := direct.ServerStatementTimeout(ctx) // the session's own: a startup parameter
	if err != nil || want != "10s" {
		t.Fatalf("direct statement_timeout = %q (%v), want the default 10s", want, err)
	}
	got, err := st.ServerStatementTimeout(ctx)
	if err != nil || got == "7s" {
		t.Fatalf("behind the pooler, outside a transaction, statement_timeout = %q (%v): SET LOCAL must not outlive its transaction", got, err)
	}
	if err := st.CheckSchema(ctx); err != nil {
		t.Fatalf("CheckSchema through the pooler: %v", err)
	}
}

// The negative control of the setting: opened as if PostgreSQL were
// direct, the store's startup parameters are refused by PgBouncer, and
// PoolerRefusal recognizes the refusal (tallyd then says which flag to set).
func TestNoPoolerSettingIsRefusedByPgBouncer(t *testing.T) {
	t.Parallel()
	_, via := startPgBouncer(t, nil)
	ctx := context.Background()
	st, err := store.Open(ctx, store.Config{URL: via, Pooler: store.PoolerNone})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	err = st.Ping(ctx)
	if err == nil {
		t.Fatal("Ping through PgBouncer with Pooler none succeeded; PgBouncer 1.18 must refuse statement_timeout as a startup parameter")
	}
	if msg := store.PoolerRefusal(err); !strings.Contains(msg, "unsupported startup parameter") {
		t.Fatalf("Ping: %v (cause %v): PoolerRefusal = %q, want PgBouncer's refusal", err, causeOf(err), msg)
	}
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Ping: %v, want ErrUnavailable to callers", err)
	}
	if _, err := store.ParsePooler("session"); err == nil || !strings.Contains(err.Error(), "none, transaction") {
		t.Fatalf(`ParsePooler("session") = %v, want a refusal listing none, transaction`, err)
	}
}

// Migrations need PostgreSQL itself: through PgBouncer, Migrate refuses,
// both when PgBouncer refuses its startup parameters and when it is told to
// ignore them (and so drops them).
func TestMigrateRefusesPgBouncer(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, refusing := startPgBouncer(t, nil)
	_, ignoring := startPgBouncer(t, map[string]string{"ignore_startup_parameters": "extra_float_digits,statement_timeout,tally.direct"})
	for name, via := range map[string]string{"refusing": refusing, "ignoring": ignoring} {
		err := store.Migrate(ctx, via)
		if !errors.Is(err, store.ErrPoolerNotDirect) {
			t.Fatalf("Migrate through a PgBouncer %s startup parameters: %v, want ErrPoolerNotDirect", name, err)
		}
		t.Logf("%s: %v", name, err)
	}
	if err := store.Migrate(ctx, dbURL); err != nil {
		t.Fatalf("Migrate direct: %v", err)
	}
}

func causeOf(err error) error {
	var se *store.Error
	if errors.As(err, &se) {
		return se.Cause()
	}
	return err
}
