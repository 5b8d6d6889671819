package store_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/store"
)

var dbURL string

func TestMain(m *testing.M) {
	os.Exit(testdb.Main(m, tallytest.DBOptions(), func(db *testdb.DB) { dbURL = db.URL() }))
}

func open(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), store.Config{URL: dbURL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st
}

func TestMigrateIsIdempotentAndSchemaIsCurrent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if err := store.Migrate(ctx, dbURL); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
	cur, latest, err := store.SchemaStatus(ctx, dbURL)
	if err != nil || cur != latest || latest < 1 {
		t.Fatalf("schema %d/%d %v", cur, latest, err)
	}
	if err := store.CheckSchema(ctx, dbURL); err != nil {
		t.Fatal(err)
	}
}

// The database enforces every invariant the ledger checks in code, so a bug
// in the service fails a transaction instead of committing a broken state.
func TestConstraintsBackTheInvariants(t *testing.T) {
	t.Parallel()
	st := open(t)
	ctx := context.Background()
	pool := st.Pool()
	acct := func() uuid.UUID {
		id := uuid.Must(uuid.NewV7())
		if _, _, err := st.CreateAccount(ctx, store.Account{ID: id, Currency: "CHK", Type: 1, Floor: 1, Status: 1}); err != nil {
			t.Fatal(err)
		}
		return id
	}
	a, b := acct(), acct()
	cases := []struct {
		name       string
		sql        string
		args       []any
		constraint string
	}{
		{"floor", `UPDATE accounts SET balance = -1 WHERE account_id = $1`, []any{a}, "accounts_balance_floor"},
		{"currency format", `UPDATE accounts SET currency = 'usd' WHERE account_id = $1`, []any{a}, "accounts_currency_format"},
		{"credit limit", `UPDATE accounts SET credit_limit = -5, floor = 2 WHERE account_id = $1`, []any{a}, "accounts_credit_limit_range"},
		{"available overflow", `UPDATE accounts SET credit_limit = 10, balance = 9223372036854775800 WHERE account_id = $1`, []any{a}, "accounts_available_range"},
		{"amount positive", `INSERT INTO transfers (transfer_id, idempotency_key, kind, debit_account_id, credit_account_id, amount, currency, created_at, debit_account_type, credit_account_type)
			VALUES (gen_random_uuid(), 'k1', 3, $1, $2, 0, 'CHK', now(), 1, 1)`, []any{a, b}, "transfers_amount_positive"},
		{"distinct accounts", `INSERT INTO transfers (transfer_id, idempotency_key, kind, debit_account_id, credit_account_id, amount, currency, created_at, debit_account_type, credit_account_type)
			VALUES (gen_random_uuid(), 'k2', 3, $1, $1, 5, 'CHK', now(), 1, 1)`, []any{a}, "transfers_distinct_accounts"},
		{"types recorded", `INSERT INTO transfers (transfer_id, idempotency_key, kind, debit_account_id, credit_account_id, amount, currency, created_at)
			VALUES (gen_random_uuid(), 'k4', 3, $1, $2, 5, 'CHK', now())`, []any{a, b}, "transfers_account_types_recorded"},
		{"key has one outcome", `INSERT INTO idempotency_keys (idempotency_key, fingerprint, kind, account_id) VALUES ('k3', '\x00', 1, $1)`, []any{a}, "idempotency_keys_one_outcome"},
	}
	for _, c := range cases {
		_, err := pool.Exec(ctx, c.sql, c.args...)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if got := constraintOf(err); got != c.constraint {
			t.Errorf("%s: rejected by %q (%v), want %q", c.name, got, err, c.constraint)
		}
	}
}

func constraintOf(err error) string {
	var se *store.Error
	if errors.As(store.TranslateForTest(err), &se) {
		return se.Constraint
	}
	return ""
}

// Transfers, entries and keys are append-only: UPDATE, DELETE and TRUNCATE fail.
func TestLedgerTablesAreAppendOnly(t *testing.T) {
	t.Parallel()
	st := open(t)
	ctx := context.Background()
	a := uuid.Must(uuid.NewV7())
	b := uuid.Must(uuid.NewV7())
	for _, id := range []uuid.UUID{a, b} {
		if _, _, err := st.CreateAccount(ctx, store.Account{ID: id, Currency: "APP", Type: 1, Floor: 2, Status: 1}); err != nil {
			t.Fatal(err)
		}
	}
	tid := uuid.Must(uuid.NewV7())
	now := time.Now()
	key := "append-" + tid.String()
	posting := func(tid uuid.UUID, key string, seq, prevA, prevB int64, balA, balB int64) store.BatchWrite {
		return store.BatchWrite{
			Transfers: []store.Transfer{{ID: tid, Key: key, Kind: 3, DebitAccountID: a, CreditAccountID: b, Amount: 5, Currency: "APP", CreatedAt: now,
				DebitAccountType: 1, CreditAccountType: 1}},
			Entries: []store.Entry{
				{TransferID: tid, AccountID: a, Sequence: seq, Amount: -5, BalanceAfter: balA, VersionAfter: seq, CreatedAt: now},
				{TransferID: tid, AccountID: b, Sequence: seq, Amount: 5, BalanceAfter: balB, VersionAfter: seq, CreatedAt: now},
			},
			Updates: []store.AccountUpdate{
				{AccountID: a, PrevVersion: prevA, Balance: balA, Version: seq, LastSequence: seq, LastEntryAt: &now, Status: 1},
				{AccountID: b, PrevVersion: prevB, Balance: balB, Version: seq, LastSequence: seq, LastEntryAt: &now, Status: 1},
			},
			Keys: []store.KeyRecord{{Key: key, Fingerprint: []byte{1}, Kind: 3, TransferID: uuid.NullUUID{UUID: tid, Valid: true}, AccountID: a}},
		}
	}
	err := st.InTx(ctx, func(tx *store.Tx) error {
		l, err := tx.LockBatch(ctx, store.BatchLock{Keys: []store.KeyRef{{Key: key}}, Accounts: []uuid.UUID{a, b}})
		if err != nil {
			return err
		}
		if len(l.Accounts) != 2 || len(l.Keys) != 0 {
			t.Fatalf("locked %+v", l)
		}
		return tx.WriteBatch(ctx, posting(tid, key, 1, 0, 0, -5, 5))
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`UPDATE transfers SET amount = 6 WHERE transfer_id = $1`,
		`DELETE FROM transfers WHERE transfer_id = $1`,
		`UPDATE entries SET amount = -6 WHERE transfer_id = $1`,
		`DELETE FROM entries WHERE transfer_id = $1`,
		`DELETE FROM idempotency_keys WHERE transfer_id = $1`,
		`UPDATE idempotency_keys SET error_reason = 'X' WHERE transfer_id = $1`,
	} {
		if _, err := st.Pool().Exec(ctx, q, tid); err == nil {
			t.Errorf("%s: allowed", q)
		}
	}
	for _, table := range []string{"transfers", "entries", "idempotency_keys", "accounts"} {
		if _, err := st.Pool().Exec(ctx, `TRUNCATE `+table+` CASCADE`); err == nil {
			t.Errorf("TRUNCATE %s: allowed", table)
		}
	}
	// Accounts are never deleted (what the dropped foreign keys of entries
	// and transfers also guaranteed; TestConstraintsBackTheInvariants
	// checks that a new transfer records both account types).
	if _, err := st.Pool().Exec(ctx, `DELETE FROM accounts WHERE account_id = $1`, a); err == nil ||
		!strings.Contains(err.Error(), "never deleted") {
		t.Errorf("DELETE FROM accounts: %v, want refused", err)
	}

	// The key is found by the next batch that names it.
	err = st.InTx(ctx, func(tx *store.Tx) error {
		l, err := tx.LockBatch(ctx, store.BatchLock{Keys: []store.KeyRef{{Key: key}, {Key: key}}, Accounts: []uuid.UUID{a}})
		if err != nil {
			return err
		}
		if k, ok := l.Keys[store.KeyRef{Key: key}]; !ok || k.TransferID.UUID != tid {
			t.Fatalf("stored key not found: %+v", l.Keys)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A posting with a stale version guard is refused, not committed.
	t2 := uuid.Must(uuid.NewV7())
	err = st.InTx(ctx, func(tx *store.Tx) error {
		if _, err := tx.LockBatch(ctx, store.BatchLock{Keys: []store.KeyRef{{Key: "stale"}}, Accounts: []uuid.UUID{a, b}}); err != nil {
			return err
		}
		return tx.WriteBatch(ctx, posting(t2, "stale", 2, 0, 1, -10, 10))
	})
	if !errors.Is(err, store.ErrInternal) {
		t.Fatalf("stale-version posting: %v, want ErrInternal", err)
	}
	if got, _ := st.GetAccount(ctx, a); got.Balance != -5 || got.Version != 1 {
		t.Fatalf("account changed by a refused posting: %+v", got)
	}
	if _, err := st.GetTransfer(ctx, t2); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("refused posting's transfer exists: %v", err)
	}
}

func TestErrorsAreTranslated(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	st := open(t)
	if _, err := st.GetAccount(ctx, uuid.Must(uuid.NewV7())); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("missing account: %v", err)
	}
	// Nothing listens on port 1: the error is UNAVAILABLE, not a raw dial error.
	bad, err := store.Open(ctx, store.Config{URL: "postgres://postgres@127.0.0.1:1/x?sslmode=disable", ConnectTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if err := bad.Ping(ctx); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("unreachable database: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := st.GetAccount(cctx, uuid.Must(uuid.NewV7())); !errors.Is(err, store.ErrCanceled) {
		t.Fatalf("canceled: %v", err)
	}
}

// Concurrent first registrations of one dimension set all get its id.
func TestUsageDimensionSetConcurrentFirstUse(t *testing.T) {
	st := open(t)
	keys := []string{"k" + uuid.NewString()[:8], "team"}
	ids := make(chan int16, 8)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id, err := st.UsageDimensionSet(context.Background(), keys)
			ids <- id
			errs <- err
		}()
	}
	wg.Wait()
	close(ids)
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	first := int16(-1)
	for id := range ids {
		if first >= 0 && id != first || id <= 0 {
			t.Fatalf("ids differ or are unset: %d vs %d", id, first)
		}
		first = id
	}
}
