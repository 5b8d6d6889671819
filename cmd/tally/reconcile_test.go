package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/torture"
)

// tally reconcile passes on a healthy database, then names each planted
// fault (a tampered balance, a missing entry, a stale cache value, a
// mismatch against an external CSV) and exits non-zero. It runs after the
// other tests of the package: the faults stay in its database.
func TestCLIReconcile(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL()})
	mk := func(funds int64) string {
		a := strings.TrimSpace(cli(t, env, "account", "create", "--currency", "REC", "--quiet"))
		cli(t, env, "credit", "--account", a, "--amount", "1000")
		cli(t, env, "charge", "--account", a, "--amount", "1000")
		cli(t, env, "credit", "--account", a, "--amount", strconv.FormatInt(funds, 10))
		return a
	}
	tampered, missing, cached, external := mk(100), mk(200), mk(300), mk(400)
	cli(t, env, "hold", "create", "--account", external, "--amount", "50")
	cli(t, env, "balance", "--account", cached) // fills the cache

	out := cli(t, env, "reconcile")
	mustContain(t, out, "OK:")

	ctx := context.Background()
	db := env.Store.Pool()
	mustExec := func(sql string, args ...any) {
		t.Helper()
		if _, err := db.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	mustExec(`UPDATE accounts SET balance = balance + 1 WHERE account_id = $1`, tampered)
	mustExec(`ALTER TABLE entries DISABLE TRIGGER entries_append_only`)
	mustExec(`DELETE FROM entries WHERE account_id = $1 AND sequence = 2`, missing)
	mustExec(`ALTER TABLE entries ENABLE TRIGGER entries_append_only`)
	var version int64
	if err := db.QueryRow(ctx, `SELECT version FROM accounts WHERE account_id = $1`, cached).Scan(&version); err != nil {
		t.Fatal(err)
	}
	stale := torture.CacheValue(version, 999, 0, 999, "REC", time.Now())
	if err := env.Cache.Client().Set(ctx, env.KeyPrefix+cached, stale, 30*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	csvPath := t.TempDir() + "/provider.csv"
	if err := os.WriteFile(csvPath, []byte("account_id,expected_balance\n"+external+",401\n"+tampered+",101\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	var buf bytes.Buffer
	err := run([]string{"reconcile", "--external", csvPath, "--json", "--addr", env.Addr, "--api-key", env.AdminKey}, &buf)
	if !errors.Is(err, errFindings) {
		t.Fatalf("reconcile with planted faults: %v, want errFindings (non-zero exit)", err)
	}
	var res struct {
		OK       bool      `json:"ok"`
		Findings []finding `json:"findings"`
	}
	if err := json.Unmarshal(buf.Bytes(), &res); err != nil {
		t.Fatalf("%v: %s", err, buf.String())
	}
	has := func(check, acct string) bool {
		for _, f := range res.Findings {
			if f.Check == check && (acct == "" || f.AccountID == acct) {
				return true
			}
		}
		return false
	}
	for _, w := range []struct{ check, acct string }{
		{"balance_vs_entries", tampered},
		{"currency_sum", ""},
		{"entry_sequence", missing},
		{"balance_vs_entries", missing},
		{"transfer_entries", ""},
		{"cache_mismatch", cached},
		{"external_balance", external},
	} {
		if !has(w.check, w.acct) {
			t.Errorf("finding %s for %q missing: %+v", w.check, w.acct, res.Findings)
		}
	}
	if has("external_balance", tampered) {
		t.Errorf("the tampered account's external balance (101) matches; no external finding expected")
	}
	if res.OK {
		t.Error("ok = true with findings")
	}
	// --repair-cache deletes the stale value; the next run no longer finds it.
	out = cliErr(t, env, "reconcile", "--repair-cache")
	mustContain(t, out, "reconciliation found problems")
	if v, err := env.Cache.Client().Get(ctx, env.KeyPrefix+cached).Result(); err == nil && v == stale {
		t.Fatal("--repair-cache left the stale value")
	}
	buf.Reset()
	_ = run([]string{"reconcile", "--json", "--account", cached, "--addr", env.Addr, "--api-key", env.AdminKey}, &buf)
	if strings.Contains(buf.String(), "cache_mismatch") {
		t.Fatalf("cache mismatch after repair: %s", buf.String())
	}
}
