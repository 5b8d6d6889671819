package main

import (
	"context"
	"encoding/csv"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/internal/statement"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// statementFixture makes a USD customer with a credit, many charges and a
// refund, and returns its id, external ref and the period around them.
func statementFixture(t *testing.T, env *tallytest.Env, charges int) (acct, ref, from, to string) {
	t.Helper()
	ref = "cli-stmt-" + tallytest.RandomSuffix()
	from = time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	acct = strings.TrimSpace(cli(t, env, "account", "create", "--currency", "USD", "--external-ref", ref, "--quiet"))
	cli(t, env, "credit", "--account", acct, "--amount", "123456", "--description", "top-up")
	var last string
	for i := 0; i < charges; i++ {
		last = firstID(t, cli(t, env, "charge", "--account", acct, "--amount", "1"+strings.Repeat("7", i%3+1), "--description", "order "+string(rune('a'+i%26))))
	}
	cli(t, env, "refund", "--transfer", last, "--amount", "5")
	to = time.Now().UTC().Format(time.RFC3339Nano)
	return acct, ref, from, to
}

// rpcStatement reads the whole statement through the RPC.
func rpcStatement(t *testing.T, env *tallytest.Env, acct, from, to string) *statement.Full {
	t.Helper()
	f, _ := time.Parse(time.RFC3339Nano, from)
	tt, _ := time.Parse(time.RFC3339Nano, to)
	full, err := statement.Collect(context.Background(), func(ctx context.Context, tok string) (*tallyv1.Statement, error) {
		return env.Raw.GetStatement(ctx, &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(f), To: timestamppb.New(tt), PageToken: tok, PageSize: 7})
	})
	if err != nil {
		t.Fatal(err)
	}
	return full
}

// tally statement --format csv is GetStatement's lines, row for row.
func TestCLIStatementCSV(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	acct, ref, from, to := statementFixture(t, env, 12)
	out := cli(t, env, "statement", "--external-ref", ref, "--from", from, "--to", to, "--format", "csv", "--page-size", "5")
	rows, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	want := rpcStatement(t, env, acct, from, to)
	if len(rows) != len(want.GetLines())+1 || len(want.GetLines()) != 14 {
		t.Fatalf("%d csv rows, %d lines", len(rows), len(want.GetLines()))
	}
	for i, l := range want.GetLines() {
		if got, w := strings.Join(rows[i+1], ","), strings.Join(statement.CSVRow("USD", l), ","); got != w {
			t.Fatalf("row %d: %s, want %s", i, got, w)
		}
	}
	text := cli(t, env, "statement", "--account", acct, "--from", from, "--to", to)
	mustContain(t, text, "Opening 0.00 USD", "Closing "+statement.Money(want.GetClosingBalance(), "USD"), "order a", "Total charge")
	if e := cliErr(t, env, "statement", "--account", acct, "--from", from, "--format", "xml"); !strings.Contains(e, "table, csv, pdf, json") {
		t.Fatalf("--format xml: %s", e)
	}
}

// tally statement --format pdf, read back with pdftotext, shows the
// account, period, currency units, every line, the totals and page numbers.
func TestCLIStatementPDFRoundTrip(t *testing.T) {
	if _, err := exec.LookPath("pdftotext"); err != nil {
		t.Skip("SKIPPED LOUDLY: pdftotext (Debian poppler-utils) is not installed; .ci/run installs it: apt-get install -y poppler-utils")
	}
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	acct, ref, from, to := statementFixture(t, env, 70)
	file := filepath.Join(t.TempDir(), "statement.pdf")
	cli(t, env, "statement", "--external-ref", ref, "--from", from, "--to", to, "--format", "pdf", "--output", file)
	text, err := exec.Command("pdftotext", "-layout", file, "-").Output()
	if err != nil {
		t.Fatalf("pdftotext: %v", err)
	}
	got := string(text)
	want := rpcStatement(t, env, acct, from, to)
	mustContain(t, got, acct, ref, "Currency", "USD", "Opening balance", "0.00 USD",
		"Closing balance", statement.Money(want.GetClosingBalance(), "USD"), "Page 1 of", "Totals")
	pages := strings.Count(got, "\f")
	if pages < 2 || !strings.Contains(got, "Page 2 of ") {
		t.Fatalf("want several numbered pages, got %d", pages)
	}
	from0 := want.GetFrom().AsTime().UTC().Format(time.RFC3339)
	mustContain(t, got, from0)
	// Every line: its transfer id and, on the same text line, its amount
	// and running balance in dollars.
	textLines := strings.Split(got, "\n")
	for i, l := range want.GetLines() {
		found := false
		for _, tl := range textLines {
			if strings.Contains(tl, l.GetTransferId()) {
				found = strings.Contains(tl, statement.Units(l.GetAmount(), "USD")) && strings.Contains(tl, statement.Units(l.GetRunningBalance(), "USD"))
				break
			}
		}
		if !found {
			t.Fatalf("line %d (%s %s %s) not in the PDF text", i, l.GetTransferId(), statement.Units(l.GetAmount(), "USD"), statement.Units(l.GetRunningBalance(), "USD"))
		}
	}
	for _, tot := range want.GetTotals() {
		mustContain(t, got, "Total "+statement.Kind(tot.GetKind())+": ")
	}
	if os.Getenv("TALLY_KEEP_PDF") != "" {
		_ = os.WriteFile(os.Getenv("TALLY_KEEP_PDF"), mustRead(t, file), 0o644)
	}
}

func mustRead(t *testing.T, f string) []byte {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
