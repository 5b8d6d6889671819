package console_test

import (
	"context"
	"encoding/csv"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/browser"
	"github.com/chromedp/chromedp"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/statement"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// chromium finds Debian's chromium, or skips the test loudly.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("SKIPPED LOUDLY: no chromium on PATH, so the browser tests did not run. " +
		"Install it (apt-get install -y chromium); .ci/run installs it when missing.")
	return ""
}

// screenshotDir is where the tests save a PNG of each page
// ($TALLY_SCREENSHOT_DIR; default a folder under the system temp dir).
func screenshotDir(t *testing.T) string {
	dir := os.Getenv("TALLY_SCREENSHOT_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "tally-console-screenshots")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// newChrome starts a headless Chromium with the machine's required flags
// and a new, empty profile.
func newChrome(t *testing.T) context.Context {
	t.Helper()
	path := chromium(t)
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(path), chromedp.Flag("headless", true), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true), chromedp.NoFirstRun, chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true), chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 900),
	}
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelA)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, cancelT := context.WithTimeout(ctx, 2*time.Minute)
	t.Cleanup(cancelT)
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// shot saves a full-page PNG of the current page as name.png.
func shot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	f := filepath.Join(screenshotDir(t), name+".png")
	if err := os.WriteFile(f, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot %s", f)
}

func run(t *testing.T, ctx context.Context, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// get runs one action and returns its result.
func get[T any](t *testing.T, ctx context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

// css is a CSS selector.
func css(s string) chromedp.CSS { return chromedp.CSS(s) }

// signInBrowser signs in with key through the form.
func signInBrowser(t *testing.T, ctx context.Context, base, key, shotName string) {
	t.Helper()
	run(t, ctx, "open sign-in", chromedp.Navigate(base+"/signin"), chromedp.WaitVisible(css("#api_key")))
	if shotName != "" {
		shot(t, ctx, shotName)
	}
	run(t, ctx, "sign in", chromedp.SendKeys(css("#api_key"), key), chromedp.Submit(css("#api_key")),
		chromedp.WaitVisible(css("#q")))
}

// TestConsoleInBrowser drives the console in headless Chromium: sign in,
// search a customer by external_ref, the balance equals a STRONG
// GetBalance, the statement's CSV download equals GetStatement, freeze as
// support with a reason and confirmation (recorded in account_changes), a
// viewer sees no freeze control and a hand-made POST is refused, a POST
// without the CSRF token is refused, a revoked key's session stops
// working, and an unauthenticated page redirects to sign-in.
func TestConsoleInBrowser(t *testing.T) {
	ctx := newChrome(t)
	s := startSite(t, 300*time.Millisecond)
	acct, ref := s.customer(t)
	base := s.srv.URL

	// Unauthenticated: redirected to sign-in.
	run(t, ctx, "unauthenticated", chromedp.Navigate(base+"/accounts/"+acct), chromedp.WaitVisible(css("#api_key")))
	if loc := get(t, ctx, "location", chromedp.Location()); !strings.HasSuffix(loc, "/signin") {
		t.Fatalf("unauthenticated page went to %s", loc)
	}

	supportKey := newKey(t, s.env, auth.RoleSupport)
	signInBrowser(t, ctx, base, supportKey, "signin")
	shot(t, ctx, "search")

	// Search by external_ref opens the account page.
	run(t, ctx, "search", chromedp.SendKeys(css("#q"), ref), chromedp.Submit(css("#q")), chromedp.WaitVisible(css("#balance")))
	balance := get(t, ctx, "balance", chromedp.Text(css("#balance")))
	loc := get(t, ctx, "location", chromedp.Location())
	strong, err := s.env.Client.GetBalance(context.Background(), &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	if err != nil {
		t.Fatal(err)
	}
	if want := statement.Money(strong.GetBalance(), "USD"); strings.TrimSpace(balance) != want {
		t.Fatalf("page shows balance %q, STRONG GetBalance %q", balance, want)
	}
	shot(t, ctx, "account")

	// The statement's CSV, downloaded by the browser, equals GetStatement.
	checkCSVDownload(t, ctx, s, acct)

	// Freeze as support: reason, confirmation, then account_changes.
	run(t, ctx, "freeze form", chromedp.Navigate(loc), chromedp.WaitVisible(css("#reason")),
		chromedp.SendKeys(css("#reason"), "suspected card testing"), chromedp.Click(css("#status-submit")),
		chromedp.WaitVisible(css("#confirm")))
	shot(t, ctx, "confirm-freeze")
	run(t, ctx, "confirm", chromedp.Click(css("#confirm")), chromedp.WaitVisible(css("p.notice")))
	if status := get(t, ctx, "status", chromedp.Text(css("#status"))); status != "FROZEN" {
		t.Fatalf("status after freeze: %q", status)
	}
	shot(t, ctx, "account-frozen")
	checkFreezeRecorded(t, s, acct, supportKey)

	// The transfer page: the refunded charge, with its refund.
	run(t, ctx, "transfer", chromedp.Navigate(base+"/transfers/"+s.charge), chromedp.WaitVisible(css("#refunds")))
	shot(t, ctx, "transfer")

	// A POST without the CSRF token is refused.
	run(t, ctx, "back to account", chromedp.Navigate(loc), chromedp.WaitVisible(css("#status")))
	if msg := forgedPost(t, ctx, acct, false); !strings.Contains(msg, "did not come from the console") {
		t.Fatalf("POST without csrf: %q", msg)
	}
	shot(t, ctx, "csrf-refused")
	assertStatus(t, s.env, acct, tallyv1.AccountStatus_ACCOUNT_STATUS_FROZEN)

	// A revoked key's session stops working.
	k, _ := auth.KeyIDOf(supportKey)
	if _, err := s.env.Store.RevokeAPIKey(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond) // twice the auth cache TTL
	run(t, ctx, "after revocation", chromedp.Navigate(loc), chromedp.WaitVisible(css("#api_key")))
	if loc := get(t, ctx, "location", chromedp.Location()); !strings.Contains(loc, "/signin") {
		t.Fatalf("revoked key's session still works: %s", loc)
	}
	shot(t, ctx, "session-ended")

	// A viewer sees no freeze control, and a hand-made POST is refused.
	vctx := newChrome(t)
	signInBrowser(t, vctx, base, newKey(t, s.env, auth.RoleViewer), "")
	run(t, vctx, "viewer account", chromedp.Navigate(base+"/accounts/"+acct), chromedp.WaitVisible(css("#balance")))
	controls := get(t, vctx, "controls", chromedp.Evaluate[int](`document.querySelectorAll('#status-change, #reason, form[action$="/status"]').length`))
	if controls != 0 {
		t.Fatalf("viewer sees %d freeze controls", controls)
	}
	shot(t, vctx, "account-viewer")
	if msg := forgedPost(t, vctx, acct, true); !strings.Contains(msg, "may not") {
		t.Fatalf("viewer's forged POST: %q", msg)
	}
	shot(t, vctx, "viewer-post-refused")
	assertStatus(t, s.env, acct, tallyv1.AccountStatus_ACCOUNT_STATUS_FROZEN)
}

// forgedPost submits a form made by hand in the page (DevTools evaluation
// is not subject to the page's CSP) to unfreeze acct, with or without the
// session's CSRF token, and returns the error the console answers.
func forgedPost(t *testing.T, ctx context.Context, acct string, withCSRF bool) string {
	t.Helper()
	js := `(() => { const f = document.createElement('form'); f.method = 'post'; f.action = '/accounts/` + acct + `/status';
		const add = (n, v) => { const i = document.createElement('input'); i.type = 'hidden'; i.name = n; i.value = v; f.appendChild(i); };
		add('action', 'unfreeze'); add('reason', 'forged'); add('confirm', 'yes');`
	if withCSRF {
		js += `add('csrf', document.querySelector('input[name=csrf]').value);`
	}
	js += `document.body.appendChild(f); f.submit(); return true; })()`
	get(t, ctx, "forged POST", chromedp.Evaluate[bool](js))
	run(t, ctx, "forged POST answer", chromedp.WaitVisible(css("p.error")))
	return get(t, ctx, "error text", chromedp.Text(css("p.error")))
}

// checkCSVDownload downloads the account page's CSV through the browser
// and compares it with GetStatement for the same period.
func checkCSVDownload(t *testing.T, ctx context.Context, s *site, acct string) {
	t.Helper()
	dir := t.TempDir()
	attr := get(t, ctx, "csv link", chromedp.AttributeValue(css("#csv"), "href"))
	u, err := url.Parse(attr.Value)
	if err != nil || !attr.Exists {
		t.Fatalf("csv link %q", attr.Value)
	}
	done := make(chan string, 1)
	if err := chromedp.ListenBrowser(ctx, func(ev any) {
		if e, ok := ev.(*browser.EventDownloadProgress); ok && e.State == browser.DownloadProgressStateCompleted {
			select {
			case done <- e.GUID:
			default:
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	events := true
	if _, err := chromedp.CallBrowser(ctx, browser.SetDownloadBehavior, browser.SetDownloadBehaviorParams{
		Behavior: browser.SetDownloadBehaviorBehaviorAllowAndName, DownloadPath: dir, EventsEnabled: &events}); err != nil {
		t.Fatal(err)
	}
	run(t, ctx, "download", chromedp.Click(css("#csv")))
	var guid string
	select {
	case guid = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the CSV download did not complete")
	}
	f, err := os.Open(filepath.Join(dir, guid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	from, _ := time.Parse(time.RFC3339Nano, u.Query().Get("from"))
	to, _ := time.Parse(time.RFC3339Nano, u.Query().Get("to"))
	full, err := statement.Collect(context.Background(), func(ctx context.Context, tok string) (*tallyv1.Statement, error) {
		return s.env.Raw.GetStatement(ctx, &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(from),
			To: timestamppb.New(to), PageToken: tok})
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(full.GetLines())+1 || len(full.GetLines()) != 5 {
		t.Fatalf("CSV has %d rows, GetStatement %d lines", len(rows), len(full.GetLines()))
	}
	for i, l := range full.GetLines() {
		if got, want := strings.Join(rows[i+1], ","), strings.Join(statement.CSVRow("USD", l), ","); got != want {
			t.Fatalf("CSV row %d: %s, GetStatement %s", i, got, want)
		}
	}
}

// checkFreezeRecorded finds the freeze in account_changes with its reason
// and the support key that made it.
func checkFreezeRecorded(t *testing.T, s *site, acct, key string) {
	t.Helper()
	keyID, _ := auth.KeyIDOf(key)
	var action, reason, by string
	err := s.env.Store.Pool().QueryRow(context.Background(), `SELECT action, reason, coalesce(created_by_key, '')
		FROM account_changes WHERE account_id = $1 ORDER BY change_id DESC LIMIT 1`, acct).Scan(&action, &reason, &by)
	if err != nil {
		t.Fatal(err)
	}
	if action != "freeze" || reason != "suspected card testing" || by != keyID {
		t.Fatalf("account_changes: %s %q by %s, want freeze by %s", action, reason, by, keyID)
	}
}
