package main

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/store"
)

var dbURL string

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main() // tallyExec: this process is tally
	}
	os.Exit(testdb.Main(m, testdb.Options{Migrate: store.Migrate, TemplateName: "tally_template_" + store.MigrationsFingerprint()},
		func(db *testdb.DB) { dbURL = db.URL() }))
}

// cli runs the tally command against env and returns what it printed.
func cli(t *testing.T, env *tallytest.Env, args ...string) string {
	t.Helper()
	var out bytes.Buffer
	args = append(args[:len(args):len(args)], "--addr", env.Addr, "--api-key", env.AdminKey)
	if err := run(args, &out); err != nil {
		t.Fatalf("tally %s: %s", strings.Join(args[:2], " "), describe(err))
	}
	return out.String()
}

func cliErr(t *testing.T, env *tallytest.Env, args ...string) string {
	t.Helper()
	args = append(args[:len(args):len(args)], "--addr", env.Addr, "--api-key", env.AdminKey)
	err := run(args, &bytes.Buffer{})
	if err == nil {
		t.Fatalf("tally %s succeeded, want an error", strings.Join(args[:2], " "))
	}
	return describe(err)
}

var uuidRe = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)

func firstID(t *testing.T, s string) string {
	t.Helper()
	id := uuidRe.FindString(s)
	if id == "" {
		t.Fatalf("no id in %q", s)
	}
	return id
}

// mustContain checks for each sub in s, with runs of spaces and tabs (the
// table padding) compared as one space.
func mustContain(t *testing.T, s string, subs ...string) {
	t.Helper()
	ws := regexp.MustCompile(`[ \t]+`)
	norm := ws.ReplaceAllString(s, " ")
	for _, sub := range subs {
		if !strings.Contains(norm, ws.ReplaceAllString(sub, " ")) {
			t.Fatalf("output lacks %q:\n%s", sub, s)
		}
	}
}

// The CLI covers holds, captures, releases, refunds, batches, account
// lifecycle and history, against a real server.
func TestCLINewOperations(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL()})
	acct := strings.TrimSpace(cli(t, env, "account", "create", "--currency", "CLI", "--quiet"))
	cli(t, env, "credit", "--account", acct, "--amount", "1000", "--key", "cli-topup")
	start := time.Now().UTC().Format(time.RFC3339Nano)
	time.Sleep(10 * time.Millisecond)

	out := cli(t, env, "hold", "create", "--account", acct, "--amount", "300", "--key", "cli-hold-1", "--expires-in", "10m")
	mustContain(t, out, "OPEN", "held 300", "available 700")
	h := firstID(t, out)
	out = cli(t, env, "hold", "capture", "--hold", h, "--amount", "120", "--key", "cli-cap-1")
	mustContain(t, out, "CAPTURED", "capture charge", "balance 880, held 0, available 880")
	mustContain(t, cliErr(t, env, "hold", "release", "--hold", h, "--key", "cli-rel-1"), "HOLD_FINALIZED")
	out = cli(t, env, "hold", "create", "--account", acct, "--amount", "50", "--key", "cli-hold-2")
	h2 := firstID(t, out)
	mustContain(t, cli(t, env, "hold", "release", "--hold", h2, "--key", "cli-rel-2"), "RELEASED")
	mustContain(t, cli(t, env, "hold", "get", "--hold", h2), "RELEASED")

	out = cli(t, env, "charge", "--account", acct, "--amount", "100", "--key", "cli-charge-1")
	ch := firstID(t, out)
	mustContain(t, cli(t, env, "refund", "--transfer", ch, "--amount", "40", "--key", "cli-refund-1", "--reason", "goodwill"), "REFUND")
	mustContain(t, cli(t, env, "transfer", "get", "--id", ch), "40 CLI\n")
	mustContain(t, cliErr(t, env, "refund", "--transfer", ch, "--amount", "61", "--key", "cli-refund-2"), "REFUND_EXCEEDS_CHARGE")

	ops := `{"charge":{"accountId":"` + acct + `","amount":"5","idempotencyKey":"cli-b1"}}
{"charge":{"accountId":"` + acct + `","amount":"999999","idempotencyKey":"cli-b2"}}
`
	f := t.TempDir() + "/ops.jsonl"
	if err := os.WriteFile(f, []byte(ops), 0o600); err != nil {
		t.Fatal(err)
	}
	mustContain(t, cli(t, env, "batch", "--file", f, "--mode", "atomic", "--key", "cli-batch-1"), "applied false, failed item 1", "NOT_APPLIED", "INSUFFICIENT_FUNDS")
	mustContain(t, cli(t, env, "batch", "--file", f, "--mode", "independent", "--key", "cli-batch-2"), "applied true", "0\tOK\tCHARGE")
	mustContain(t, cli(t, env, "batch", "--file", f, "--mode", "independent", "--key", "cli-batch-2"), "replayed true")

	mustContain(t, cli(t, env, "account", "update", "--account", acct, "--low-balance-threshold", "500", "--replace-meta", "--meta", "plan=pro", "--json"), `"plan"`, `"pro"`, `"lowBalanceThreshold"`)
	mustContain(t, cli(t, env, "charge", "--account", acct, "--amount", "400", "--key", "cli-charge-2"), "\ttrue\n")
	mustContain(t, cli(t, env, "account", "freeze", "--account", acct), "FROZEN")
	mustContain(t, cliErr(t, env, "charge", "--account", acct, "--amount", "1", "--key", "cli-charge-3"), "ACCOUNT_NOT_ACTIVE")
	mustContain(t, cli(t, env, "account", "unfreeze", "--account", acct), "ACTIVE")
	mustContain(t, cliErr(t, env, "account", "close", "--account", acct), "ACCOUNT_NOT_EMPTY")

	// 1000 - 120 - 100 + 40 - 5 - 400 = 415.
	mustContain(t, cli(t, env, "balance", "--account", acct, "--strong"), "\t415\t0\t415\t")
	mustContain(t, cli(t, env, "balance", "--account", acct, "--at", start), "\t1000\t0\t1000\t", "false")
	mustContain(t, cli(t, env, "balances", "--account", acct, "--at", start), "\t1000\t")
	out = cli(t, env, "entries", "--account", acct, "--kind", "refund")
	mustContain(t, out, "REFUND\t40\t")
	if strings.Contains(out, "CHARGE") {
		t.Fatalf("--kind refund listed other kinds:\n%s", out)
	}
}

// tally export writes the feed and prints the cursor to resume from; a
// resumed export continues exactly after it: no gap, no repeat.
func TestCLIExportResumes(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	acct := strings.TrimSpace(cli(t, env, "account", "create", "--currency", "EXP", "--quiet"))
	cli(t, env, "credit", "--account", acct, "--amount", "100", "--key", "exp-1")
	cli(t, env, "charge", "--account", acct, "--amount", "10", "--key", "exp-2")
	dir := t.TempDir()
	cursorRe := regexp.MustCompile(`resume with: tally export --since (\S+)`)
	// The feed releases a transaction's events once every older transaction
	// on the PostgreSQL cluster has finished; other packages' tests share
	// the cluster, so wait for ours to appear.
	var out string
	var m []string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		out = cli(t, env, "export", "--out", dir+"/1.jsonl")
		if m = cursorRe.FindStringSubmatch(out); m != nil || time.Now().After(deadline) {
			break
		}
	}
	if m == nil {
		t.Fatalf("no cursor in %q", out)
	}
	first, err := os.ReadFile(dir + "/1.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, string(first), `"idempotency_key":"exp-1"`, `"idempotency_key":"exp-2"`)
	cli(t, env, "charge", "--account", acct, "--amount", "7", "--key", "exp-3")
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		out = cli(t, env, "export", "--since", m[1], "--format", "csv", "--out", dir+"/2.csv")
		if !strings.Contains(out, "exported 0 events") || time.Now().After(deadline) {
			break
		}
	}
	mustContain(t, out, "exported 1 events")
	second, err := os.ReadFile(dir + "/2.csv")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(second)), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "cursor,event,") || !strings.Contains(lines[1], ",exp-3,") ||
		strings.Contains(string(second), "exp-2") {
		t.Fatalf("resumed export:\n%s", second)
	}
	// Nothing new: an export from the last cursor is empty and keeps it.
	m2 := cursorRe.FindStringSubmatch(out)
	out = cli(t, env, "export", "--since", m2[1], "--out", dir+"/3.jsonl")
	mustContain(t, out, "exported 0 events", m2[1])
}

func TestMoney(t *testing.T) {
	for _, c := range []struct {
		minor int64
		cur   string
		want  string
	}{
		{1234, "USD", "12.34 USD"}, {-5, "USD", "-0.05 USD"}, {0, "EUR", "0.00 EUR"}, {100, "JPY", "100 JPY"},
		{1001, "KWD", "1.001 KWD"}, {7, "CREDITS", "7 CREDITS"},
		{-9223372036854775808, "USD", "-92233720368547758.08 USD"},
	} {
		if got := money(c.minor, c.cur); got != c.want {
			t.Errorf("money(%d, %s) = %q, want %q", c.minor, c.cur, got, c.want)
		}
	}
}

// tally show: a customer found by external_ref, amounts in currency units,
// latest entries first.
func TestCLIShow(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	acct := strings.TrimSpace(cli(t, env, "account", "create", "--currency", "USD", "--external-ref", "cust-show-1", "--quiet"))
	cli(t, env, "credit", "--account", acct, "--amount", "1234")
	cli(t, env, "charge", "--account", acct, "--amount", "34")
	cli(t, env, "hold", "create", "--account", acct, "--amount", "200")
	out := cli(t, env, "show", "--external-ref", "cust-show-1")
	mustContain(t, out, "Customer cust-show-1", "Balance 12.00 USD", "Held 2.00 USD", "Available 10.00 USD", "Latest 2 entries")
	if strings.Index(out, "CHARGE") > strings.Index(out, "CREDIT") {
		t.Fatalf("entries not newest first:\n%s", out)
	}
	mustContain(t, cli(t, env, "show", "--account", acct, "--json"), `"available":"1000"`)
}

// tally usage groups charges by a metadata key and by month and matches
// totals computed by hand from the charges and the refund made here.
func TestCLIUsage(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, UsageDimensions: []string{"product", "team"}})
	ref := "cli-usage-" + tallytest.RandomSuffix()
	acct := strings.TrimSpace(cli(t, env, "account", "create", "--currency", "USG", "--external-ref", ref, "--quiet"))
	cli(t, env, "credit", "--account", acct, "--amount", "10000", "--key", ref+"-topup")
	cli(t, env, "charge", "--account", acct, "--amount", "300", "--key", ref+"-1", "--meta", "product=api", "--meta", "team=x")
	ch := firstID(t, cli(t, env, "charge", "--account", acct, "--amount", "200", "--key", ref+"-2", "--meta", "product=api"))
	cli(t, env, "charge", "--account", acct, "--amount", "45", "--key", ref+"-3", "--meta", "product=storage")
	cli(t, env, "charge", "--account", acct, "--amount", "5", "--key", ref+"-4")
	cli(t, env, "refund", "--transfer", ch, "--amount", "60", "--key", ref+"-r1")

	now := time.Now().UTC()
	month := now.Format("2006-01")
	from := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -1, 0).Format(time.DateOnly)
	to := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, 1, 0).Format(time.DateOnly)
	out := cli(t, env, "usage", "--from", from, "--to", to, "--external-ref", ref, "--group-by", "product,month")
	// api: 300 + 200 charged, 60 refunded; storage 45; no product 5.
	mustContain(t, out, "tracked dimensions: product, team",
		"CURRENCY product MONTH CHARGED REFUNDED NET CHARGES REFUNDS",
		"USG (none) "+month+" 5 0 5 1 0",
		"USG api "+month+" 500 60 440 2 1",
		"USG storage "+month+" 45 0 45 1 0",
		"USG TOTAL TOTAL 550 60 490 4 1")
	out = cli(t, env, "usage", "--from", from, "--to", to, "--account", acct, "--group-by", "team", "--json")
	mustContain(t, out, `"team": "x"`, `"net": "300"`, `"net": "190"`)
	mustContain(t, cliErr(t, env, "usage", "--from", from, "--to", to, "--group-by", "sku"), "INVALID_ARGUMENT", "not a usage dimension")
}
