package hatest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/torture"
)

// contractStatement matches schema changes that break a running previous
// release: dropping or renaming what it reads or writes, changing a type,
// or a new NOT NULL it does not fill. They belong to a later release's
// "contract" migration, once no previous binary runs (docs/OPERATIONS.md,
// "Rolling upgrades").
var (
	contractRE        = regexp.MustCompile(`(?is)\b(DROP\s+(TABLE|COLUMN|VIEW|FUNCTION|TRIGGER|TYPE)|RENAME\s+(COLUMN|TO)|ALTER\s+COLUMN\s+\S+\s+(SET\s+DATA\s+)?TYPE|SET\s+NOT\s+NULL)\b`)
	addNotNullRE      = regexp.MustCompile(`(?is)\bADD\s+COLUMN\b.*\bNOT\s+NULL\b`)
	defaultClauseRE   = regexp.MustCompile(`(?is)\bDEFAULT\b`)
	contractStatement = contractMatcher{}
)

// contractMatcher finds a contracting change in one SQL statement.
type contractMatcher struct{}

func (contractMatcher) FindString(stmt string) string {
	if m := contractRE.FindString(stmt); m != "" {
		return m
	}
	// A NOT NULL column without a default breaks the old release's INSERTs.
	if m := addNotNullRE.FindString(stmt); m != "" && !defaultClauseRE.MatchString(stmt) {
		return m
	}
	return ""
}

func (c contractMatcher) MatchString(stmt string) bool { return c.FindString(stmt) != "" }

// Every migration added since the previous release (the latest v* tag) is
// expand-only in its Up section, so the previous release keeps working on
// the migrated schema during a rolling upgrade.
func TestMigrationsSinceReleaseAreExpandOnly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wd, _ := os.Getwd()
	repo, err := torture.FindRepo(wd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("SKIPPED: no git on PATH, so the previous release's migrations cannot be listed")
	}
	tagOut, err := exec.CommandContext(ctx, "git", "-C", repo, "describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD^").Output()
	if err != nil {
		t.Skipf("SKIPPED: no v* release tag reachable from HEAD (a shallow or tagless clone?): %v", err)
	}
	tag := strings.TrimSpace(string(tagOut))
	ls, err := exec.CommandContext(ctx, "git", "-C", repo, "ls-tree", "--name-only", tag, "store/migrations/").Output()
	if err != nil {
		t.Fatalf("git ls-tree %s: %v", tag, err)
	}
	released := map[string]bool{}
	for _, f := range strings.Fields(string(ls)) {
		released[filepath.Base(f)] = true
	}
	files, err := filepath.Glob(filepath.Join(repo, "store", "migrations", "*.sql"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no migrations found: %v", err)
	}
	added := 0
	for _, f := range files {
		if released[filepath.Base(f)] {
			continue
		}
		added++
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		up, _, _ := strings.Cut(string(b), "-- +goose Down")
		for _, line := range strings.Split(stripSQLComments(up), ";") {
			if m := contractStatement.FindString(line + ";"); m != "" {
				t.Errorf("%s (added since %s) contracts the schema in its Up section: %q; the previous release may still run against it. "+
					"Ship the expand part now and the contract part in a later release", filepath.Base(f), tag, strings.TrimSpace(m))
			}
		}
	}
	t.Logf("%d migrations released in %s, %d added since", len(released), tag, added)
}

func stripSQLComments(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if i := strings.Index(line, "--"); i >= 0 {
			line = line[:i]
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}

// The pattern itself: what it must catch and what it must let through.
func TestContractStatementPattern(t *testing.T) {
	for _, bad := range []string{
		"ALTER TABLE accounts DROP COLUMN metadata;",
		"DROP TABLE clients;",
		"ALTER TABLE accounts RENAME COLUMN balance TO amount;",
		"ALTER TABLE accounts ALTER COLUMN currency TYPE varchar(3);",
		"ALTER TABLE accounts ALTER COLUMN external_ref SET NOT NULL;",
		"ALTER TABLE accounts ADD COLUMN region text NOT NULL;",
	} {
		if !contractStatement.MatchString(bad) {
			t.Errorf("not caught: %s", bad)
		}
	}
	for _, ok := range []string{
		"ALTER TABLE accounts ADD COLUMN region text;",
		"ALTER TABLE accounts ADD COLUMN region text NOT NULL DEFAULT 'eu';",
		"CREATE INDEX CONCURRENTLY accounts_region ON accounts (region);",
		"CREATE TABLE holds (hold_id uuid PRIMARY KEY, amount bigint NOT NULL);",
	} {
		if contractStatement.MatchString(ok) {
			t.Errorf("wrongly caught: %s", ok)
		}
	}
}
