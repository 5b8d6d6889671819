package store_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/store"
)

// planCapture records every statement the store sends (single queries and
// each query of a pipelined batch), with its arguments, labelled by the
// store call that sent it.
type planCapture struct {
	mu    sync.Mutex
	label string
	seen  map[string]bool
	stmts []capturedStmt
}

type capturedStmt struct {
	label, sql string
	args       []any
}

func (c *planCapture) record(sql string, args []any) {
	head := strings.ToUpper(strings.TrimSpace(sql))
	if !strings.HasPrefix(head, "SELECT") && !strings.HasPrefix(head, "INSERT") &&
		!strings.HasPrefix(head, "UPDATE") && !strings.HasPrefix(head, "WITH") && !strings.HasPrefix(head, "DELETE") {
		return // begin, commit, rollback
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.label == "" || c.seen[sql] {
		return
	}
	c.seen[sql] = true
	c.stmts = append(c.stmts, capturedStmt{label: c.label, sql: sql, args: args})
}

func (c *planCapture) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	c.record(d.SQL, d.Args)
	return ctx
}
func (c *planCapture) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (c *planCapture) TraceBatchStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceBatchStartData) context.Context {
	for _, q := range d.Batch.QueuedQueries {
		c.record(q.SQL, q.Arguments)
	}
	return ctx
}
func (c *planCapture) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (c *planCapture) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// planCheckedTables are the tables whose rows grow with traffic: no
// write-path or read-path statement may scan them sequentially.
var planCheckedTables = map[string]bool{
	"accounts": true, "idempotency_keys": true, "transfers": true, "entries": true, "holds": true,
	"charge_refunds": true, "events": true, "usage_daily": true, "usage_daily_totals": true,
}

// seqScans returns the relations of plan (EXPLAIN FORMAT JSON output) that
// are read by a Seq Scan node.
func seqScans(t *testing.T, plan []byte) []string {
	t.Helper()
	var doc []struct {
		Plan map[string]any `json:"Plan"`
	}
	if err := json.Unmarshal(plan, &doc); err != nil || len(doc) != 1 {
		t.Fatalf("EXPLAIN output: %v %s", err, plan)
	}
	var out []string
	var walk func(n map[string]any)
	walk = func(n map[string]any) {
		if n["Node Type"] == "Seq Scan" {
			rel, _ := n["Relation Name"].(string)
			out = append(out, rel)
		}
		kids, _ := n["Plans"].([]any)
		for _, k := range kids {
			if m, ok := k.(map[string]any); ok {
				walk(m)
			}
		}
	}
	walk(doc[0].Plan)
	return out
}

// oneLinePlan renders a plan's node tree compactly for failure messages.
func oneLinePlan(plan []byte) string {
	var doc []struct {
		Plan map[string]any `json:"Plan"`
	}
	if json.Unmarshal(plan, &doc) != nil || len(doc) != 1 {
		return string(plan)
	}
	var b strings.Builder
	var walk func(n map[string]any)
	walk = func(n map[string]any) {
		b.WriteString(fmt.Sprint(n["Node Type"]))
		if r, ok := n["Relation Name"]; ok {
			b.WriteString(" " + fmt.Sprint(r))
		}
		if r, ok := n["Index Name"]; ok {
			b.WriteString(" using " + fmt.Sprint(r))
		}
		kids, _ := n["Plans"].([]any)
		if len(kids) > 0 {
			b.WriteString(" (")
			for i, k := range kids {
				if i > 0 {
					b.WriteString(", ")
				}
				if m, ok := k.(map[string]any); ok {
					walk(m)
				}
			}
			b.WriteString(")")
		}
	}
	walk(doc[0].Plan)
	return b.String()
}

func planID(prefix string, i int) uuid.UUID {
	return uuid.MustParse(fmt.Sprintf("%s%07x-0000-0000-0000-000000000000", prefix, i))
}

var errPlanRollback = errors.New("plan check: roll back")

// TestNoSeqScansOnHotPaths runs every statement of the write path
// (LockBatchKey, LockBatch, WriteBatch, InsertBatch, account creation) and
// of the read path (balances, balance history, replays, entries, the feed,
// API keys) with batch-sized arguments against a database with 10,000
// accounts and 20,000 transfers, records the SQL through a tracer, and
// EXPLAINs each statement twice: as a generic plan (plan_cache_mode =
// force_generic_plan through PREPARE/EXECUTE, which is what pgx's statement
// cache ends up running) and as a custom plan with the arguments it really
// got. No plan may read a growing table with a Seq Scan: those tables are
// reached through their indexes, whatever the batch size.
func TestNoSeqScansOnHotPaths(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 100,000 rows")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db, err := testdb.New(ctx, tallytest.DBOptions())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })

	capt := &planCapture{seen: map[string]bool{}}
	st, err := store.Open(ctx, store.Config{URL: db.URL(), Tracer: capt})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pool := st.Pool()

	// History: 10,000 USD customer accounts, 20,000 transfers between them
	// with their entries and keys, 5,000 holds (half open), 1,000 refunded
	// charges, system accounts for USD and EUR.
	const nAccounts, nTransfers, nHolds = 10000, 20000, 5000
	load := []string{
		`INSERT INTO accounts (account_id, currency, type, floor, balance, version, last_sequence, created_at)
		 SELECT ('a' || lpad(to_hex(i), 7, '0') || '-0000-0000-0000-000000000000')::uuid, 'USD', 1, 2, 0, 4, 4,
		        now() - interval '30 days'
		 FROM generate_series(0, 9999) i`,
		`INSERT INTO accounts (account_id, currency, type, floor, system_role)
		 VALUES ('c0000000-0000-0000-0000-000000000000', 'USD', 2, 2, 'revenue'),
		        ('c0000001-0000-0000-0000-000000000000', 'USD', 3, 2, 'funding'),
		        ('c0000002-0000-0000-0000-000000000000', 'EUR', 2, 2, 'revenue'),
		        ('c0000003-0000-0000-0000-000000000000', 'EUR', 3, 2, 'funding')`,
		`INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
		                        amount, currency, created_at, debit_account_type, credit_account_type)
		 SELECT ('b' || lpad(to_hex(t), 7, '0') || '-0000-0000-0000-000000000000')::uuid, '', 'plan-' || t, 3,
		        ('a' || lpad(to_hex(t % 10000), 7, '0') || '-0000-0000-0000-000000000000')::uuid,
		        ('a' || lpad(to_hex((t + 1) % 10000), 7, '0') || '-0000-0000-0000-000000000000')::uuid,
		        1, 'USD', now() - interval '20 days' + t * interval '1 second', 1, 1
		 FROM generate_series(0, 19999) t`,
		`INSERT INTO entries (transfer_id, account_id, sequence, amount, balance_after, version_after, created_at)
		 SELECT transfer_id, debit_account_id, 2 * (n / 10000) + 2, -1, 0, 2 * (n / 10000) + 2, created_at
		 FROM (SELECT *, row_number() OVER (ORDER BY transfer_id) - 1 AS n FROM transfers) x
		 UNION ALL
		 SELECT transfer_id, credit_account_id, 2 * (n / 10000) + 1, 1, 1, 2 * (n / 10000) + 1, created_at
		 FROM (SELECT *, row_number() OVER (ORDER BY transfer_id) - 1 AS n FROM transfers) x`,
		`INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, kind, transfer_id, account_id)
		 SELECT '', idempotency_key, '\x00', 3, transfer_id, debit_account_id FROM transfers`,
		`INSERT INTO holds (hold_id, scope, idempotency_key, account_id, amount, currency, status, expires_at,
		                    created_at, finalized_at)
		 SELECT ('d' || lpad(to_hex(h), 7, '0') || '-0000-0000-0000-000000000000')::uuid, '', 'plan-hold-' || h,
		        ('a' || lpad(to_hex(h % 10000), 7, '0') || '-0000-0000-0000-000000000000')::uuid, 1, 'USD',
		        CASE WHEN h % 2 = 0 THEN 1 ELSE 3 END, now() + interval '1 day', now() - interval '1 day',
		        CASE WHEN h % 2 = 0 THEN NULL ELSE now() END
		 FROM generate_series(0, 4999) h`,
		`INSERT INTO charge_refunds (transfer_id, amount, refunded)
		 SELECT transfer_id, 1, 1 FROM transfers ORDER BY transfer_id LIMIT 1000`,
		`INSERT INTO events (kind, subject_id, account_id, payload, created_at)
		 SELECT 'transfer', transfer_id, debit_account_id, '{}', created_at FROM transfers`,
	}
	for _, q := range load {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("load: %v\n%s", err, q)
		}
	}
	for _, tbl := range []string{"accounts", "transfers", "entries", "idempotency_keys", "holds", "charge_refunds", "events"} {
		if _, err := pool.Exec(ctx, "VACUUM ANALYZE "+tbl); err != nil {
			t.Fatal(err)
		}
	}

	// Batch-sized arguments: 256 keys (half of them used before), 256
	// accounts, the revenue and funding accounts of 128 each, 32 holds and
	// 32 charges.
	const n = 256
	acct := func(i int) uuid.UUID { return planID("a", (i*37)%nAccounts) }
	var l store.BatchLock
	for i := range n {
		key := fmt.Sprintf("plan-%d", (i*77)%nTransfers)
		if i%2 == 1 {
			key = fmt.Sprintf("plan-new-%d", i)
		}
		l.Keys = append(l.Keys, store.KeyRef{Scope: "", Key: key})
		l.Accounts = append(l.Accounts, acct(i))
	}
	l.Accounts = append(l.Accounts, planID("c", 0))
	for i := range 32 {
		l.Holds = append(l.Holds, planID("d", (i*151)%nHolds))
		l.Charges = append(l.Charges, planID("b", (i*17)%1000))
	}
	now := time.Now()
	var w store.BatchWrite
	for i := range n {
		tid := uuid.Must(uuid.NewV7())
		w.Transfers = append(w.Transfers, store.Transfer{ID: tid, Key: fmt.Sprintf("plan-new-%d", i), Kind: 1,
			DebitAccountID: acct(i), CreditAccountID: planID("c", 0), Amount: 1, Currency: "USD", CreatedAt: now,
			DebitAccountType: 1, CreditAccountType: 2})
		w.Entries = append(w.Entries,
			store.Entry{TransferID: tid, AccountID: acct(i), Sequence: 5, Amount: -1, VersionAfter: 5, CreatedAt: now},
			store.Entry{TransferID: tid, AccountID: planID("c", 0), Sequence: int64(i + 1), Amount: 1, VersionAfter: int64(i + 1), CreatedAt: now})
		w.Updates = append(w.Updates, store.AccountUpdate{AccountID: acct(i), PrevVersion: 4, Version: 5, LastSequence: 5,
			LastEntryAt: &now, HoldsChanged: i%8 == 0, Status: 1})
		w.Keys = append(w.Keys, store.KeyRecord{Key: fmt.Sprintf("plan-new-%d", i), Fingerprint: []byte{1}, Kind: 1,
			TransferID: uuid.NullUUID{UUID: tid, Valid: true}, AccountID: acct(i)})
		w.Events = append(w.Events, store.EventRow{Kind: store.EventTransfer, SubjectID: tid, AccountID: acct(i), Payload: []byte(`{}`), CreatedAt: now})
		w.Usage = append(w.Usage, store.UsageAdd{AccountID: acct(i), RevenueAccountID: planID("c", 0), Day: "2026-01-01", Currency: "USD", Charged: 1, Charges: 1})
	}
	w.UsageTotals = []store.UsageAdd{{RevenueAccountID: planID("c", 0), Day: "2026-01-01", Currency: "USD", Charged: n, Charges: n}}
	w.UsageSetID = 1
	for i := range 32 {
		hid := uuid.Must(uuid.NewV7())
		w.Holds = append(w.Holds, store.Hold{ID: hid, Key: fmt.Sprintf("plan-hold-new-%d", i), AccountID: acct(i), Amount: 1,
			Currency: "USD", Status: 1, ExpiresAt: now.Add(time.Hour), CreatedAt: now, AccountType: 1})
		w.HoldChanges = append(w.HoldChanges, store.HoldChange{HoldID: planID("d", 2*i), Status: store.HoldReleased, FinalizedAt: now})
		w.Refunds = append(w.Refunds, store.RefundAdd{ChargeID: planID("b", i), ChargeAmount: 1, Amount: 1})
		w.Changes = append(w.Changes, store.AccountChange{AccountID: acct(i), Action: "update", VersionAfter: 5,
			Before: map[string]any{}, After: map[string]any{}, CreatedAt: now})
	}
	ids := make([]uuid.UUID, n)
	for i := range ids {
		ids[i] = acct(i)
	}

	step := func(label string, fn func() error) {
		t.Helper()
		capt.mu.Lock()
		capt.label = label
		capt.mu.Unlock()
		if err := fn(); err != nil && !errors.Is(err, errPlanRollback) && !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("%s: %v", label, err)
		}
		capt.mu.Lock()
		capt.label = ""
		capt.mu.Unlock()
	}
	step("LockBatchKey+ReadFacts+LockBatch+InsertBatch", func() error {
		return st.InTx(ctx, func(tx *store.Tx) error {
			if _, _, err := tx.LockBatchKey(ctx, "", "plan-batch"); err != nil {
				return err
			}
			if _, err := tx.ReadFacts(ctx, l.Accounts, l.Holds, l.Charges); err != nil {
				return err
			}
			if _, err := tx.LockBatch(ctx, l); err != nil {
				return err
			}
			if err := tx.InsertBatch(ctx, store.BatchRecord{Key: "plan-batch", Fingerprint: []byte{1}, Mode: 1, Results: []byte(`[]`)}); err != nil {
				return err
			}
			return errPlanRollback
		})
	})
	step("WriteBatch", func() error {
		// The statements are recorded when the batch is queued; the
		// arguments are realistic in shape only, so the batch may fail.
		_ = st.InTx(ctx, func(tx *store.Tx) error {
			_ = tx.WriteBatch(ctx, w)
			return errPlanRollback
		})
		return nil
	})
	step("GetBalance", func() error { _, err := st.GetBalance(ctx, ids[0]); return err })
	step("GetBalances", func() error { _, err := st.GetBalances(ctx, ids); return err })
	step("BalancesAt", func() error { _, err := st.BalancesAt(ctx, ids, now.Add(-10*24*time.Hour)); return err })
	step("GetAccount", func() error { _, err := st.GetAccount(ctx, ids[0]); return err })
	step("SystemAccountID", func() error { _, err := st.SystemAccountID(ctx, "USD", store.SystemRoleRevenue); return err })
	step("EnsureSystemAccount", func() error {
		_, err := st.EnsureSystemAccount(ctx, "GBP", store.SystemRoleRevenue, 2, 2)
		return err
	})
	step("CreateAccount", func() error {
		_, _, err := st.CreateAccount(ctx, store.Account{ID: ids[0], Currency: "USD", Type: 1, Floor: 2, Status: 1})
		return err
	})
	step("GetKey", func() error { _, err := st.GetKey(ctx, "", "plan-5"); return err })
	step("GetTransfer", func() error { _, err := st.GetTransfer(ctx, planID("b", 5)); return err })
	step("GetEntry", func() error { _, err := st.GetEntry(ctx, planID("b", 5), planID("a", 5)); return err })
	step("GetHold", func() error { _, err := st.GetHold(ctx, planID("d", 5)); return err })
	step("ListEntries", func() error {
		if _, err := st.ListEntries(ctx, store.EntryFilter{AccountID: ids[0], Limit: 100}); err != nil {
			return err
		}
		_, err := st.ListEntries(ctx, store.EntryFilter{AccountID: ids[0], NewestFirst: true, Kinds: []int16{1}, Limit: 100})
		return err
	})
	step("Statement", func() error {
		_, err := st.Statement(ctx, store.StatementQuery{Shards: ids[:2], From: now.Add(-10 * 24 * time.Hour), To: now,
			After: store.StatementPos{Valid: true, At: now.Add(-5 * 24 * time.Hour), Shard: 1, Seq: 3}, Limit: 100})
		return err
	})
	step("ListOpenHolds", func() error {
		if _, _, err := st.ListOpenHolds(ctx, ids[0], time.Time{}, uuid.Nil, 100); err != nil {
			return err
		}
		_, _, err := st.ListOpenHolds(ctx, ids[0], now, planID("d", 5), 100)
		return err
	})
	step("ListRefunds", func() error {
		_, err := st.ListRefunds(ctx, planID("b", 5), now.Add(-time.Hour), planID("b", 6), 100)
		return err
	})
	step("ReadEvents", func() error { _, err := st.ReadEvents(ctx, 0, 0, 100); return err })
	step("GetAPIKey", func() error { _, err := st.GetAPIKey(ctx, "abcdefghijkl"); return err })
	step("ExpiringAccounts", func() error { _, err := st.ExpiringAccounts(ctx, 100); return err })
	step("Shards", func() error { _, err := st.Shards(ctx, planID("c", 0)); return err })
	step("AddShards", func() error { _, err := st.AddShards(ctx, planID("c", 0), 4); return err })

	if len(capt.stmts) < 20 {
		t.Fatalf("recorded only %d statements", len(capt.stmts))
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	c := conn.Conn()
	var failures []string
	for i, s := range capt.stmts {
		// A custom plan, with the arguments the statement really got.
		if _, err := c.Exec(ctx, "SET plan_cache_mode = force_custom_plan"); err != nil {
			t.Fatal(err)
		}
		var custom []byte
		if err := c.QueryRow(ctx, "EXPLAIN (FORMAT JSON) "+s.sql, s.args...).Scan(&custom); err != nil {
			t.Fatalf("%s: EXPLAIN: %v\n%s", s.label, err, s.sql)
		}
		// The generic plan, which does not depend on the values.
		if _, err := c.Exec(ctx, "SET plan_cache_mode = force_generic_plan"); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("plan_check_%d", i)
		sd, err := c.Prepare(ctx, name, s.sql)
		if err != nil {
			t.Fatalf("%s: prepare: %v\n%s", s.label, err, s.sql)
		}
		nulls := make([]string, len(sd.ParamOIDs))
		for j := range nulls {
			nulls[j] = "NULL"
		}
		exec := "EXECUTE " + name
		if len(nulls) > 0 {
			exec += "(" + strings.Join(nulls, ", ") + ")"
		}
		var generic []byte
		if err := c.QueryRow(ctx, "EXPLAIN (FORMAT JSON) "+exec, pgx.QueryExecModeSimpleProtocol).Scan(&generic); err != nil {
			t.Fatalf("%s: EXPLAIN EXECUTE: %v\n%s", s.label, err, s.sql)
		}
		if err := c.Deallocate(ctx, name); err != nil {
			t.Fatal(err)
		}
		for _, p := range []struct {
			mode string
			plan []byte
		}{{"custom", custom}, {"generic", generic}} {
			var bad []string
			for _, rel := range seqScans(t, p.plan) {
				if planCheckedTables[rel] {
					bad = append(bad, rel)
				}
			}
			sort.Strings(bad)
			first := strings.Join(strings.Fields(s.sql), " ")
			if len(first) > 110 {
				first = first[:110] + "..."
			}
			if len(bad) > 0 {
				failures = append(failures, fmt.Sprintf("%s: %s plan scans %v sequentially\n    sql:  %s\n    plan: %s",
					s.label, p.mode, bad, first, oneLinePlan(p.plan)))
			} else if testing.Verbose() {
				t.Logf("ok %s (%s): %s\n    %s", s.label, p.mode, first, oneLinePlan(p.plan))
			}
		}
	}
	if _, err := c.Exec(ctx, "RESET plan_cache_mode"); err != nil {
		t.Fatal(err)
	}
	t.Logf("checked %d statements", len(capt.stmts))
	if len(failures) > 0 {
		t.Errorf("%d plans scan a growing table sequentially:\n%s", len(failures), strings.Join(failures, "\n"))
	}
}
