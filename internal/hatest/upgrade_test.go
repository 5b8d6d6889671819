package hatest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/torture"
)

// Bounds of the rolling-upgrade test.
const (
	upgradeTestTimeout = 5 * time.Minute
	// upgradeWorkload is how long the torture workload runs while the
	// three tallyds are replaced one at a time.
	upgradeWorkload = 12 * time.Second
	upgradeTallyds  = 3
)

// The previous release (the latest v* tag reachable from HEAD's parent, so
// that a release commit is tested against the release before it) and this
// build serve one database side by side: the database is migrated by this
// build, three tallyds start on the previous release and are replaced one
// at a time (SIGTERM, drain, start the new binary) under the torture
// workload, whose checker must then find every invariant holding.
func TestRollingUpgradeFromPreviousRelease(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), upgradeTestTimeout)
	defer cancel()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	repo, err := torture.FindRepo(wd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("SKIPPED: no git on PATH, so the previous release cannot be built from its tag")
	}
	tagOut, err := exec.CommandContext(ctx, "git", "-C", repo, "describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD^").Output()
	if err != nil {
		t.Skipf("SKIPPED: no v* release tag reachable from HEAD in %s (a shallow or tagless clone?): %v; "+
			"the rolling-upgrade test needs the previous release's source", repo, err)
	}
	tag := strings.TrimSpace(string(tagOut))
	dir := t.TempDir()

	// The previous release's source, from the tag, built like this one.
	src := filepath.Join(dir, "src-"+tag)
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	archive := exec.CommandContext(ctx, "git", "-C", repo, "archive", "--format=tar", "-o", filepath.Join(dir, "src.tar"), tag)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", tag, err, out)
	}
	if out, err := exec.CommandContext(ctx, "tar", "-xf", filepath.Join(dir, "src.tar"), "-C", src).CombinedOutput(); err != nil {
		t.Fatalf("untar: %v\n%s", err, out)
	}
	oldBin, newBin := filepath.Join(dir, "tallyd-"+tag), filepath.Join(dir, "tallyd-new")
	build(t, ctx, src, oldBin)
	build(t, ctx, repo, newBin)

	var out bytes.Buffer
	rep, err := torture.Run(ctx, torture.Config{Duration: upgradeWorkload, Seed: 8, Tallyds: upgradeTallyds, Clients: 6,
		Accounts: 16, TallydBin: newBin, OldTallydBin: oldBin, Out: &out})
	if err != nil {
		t.Fatalf("torture run: %v\n%s", err, out.String())
	}
	rep.PrintSummary(&out)
	t.Logf("rolling upgrade %s -> this build:\n%s", tag, out.String())
	if got := rep.Faults[torture.FaultRollingUpgrade]; got != upgradeTallyds {
		t.Errorf("%d of %d tallyds upgraded", got, upgradeTallyds)
	}
	if !rep.Pass {
		t.Fatalf("torture checker failed during the rolling upgrade from %s (see the summary above)", tag)
	}
}

func build(t *testing.T, ctx context.Context, dir, out string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/tallyd")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build in %s: %v\n%s", dir, err, b)
	}
}
