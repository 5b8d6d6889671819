package console_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/console"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

var dbURL string

func TestMain(m *testing.M) {
	os.Exit(testdb.Main(m, tallytest.DBOptions(), func(db *testdb.DB) { dbURL = db.URL() }))
}

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// site is a running Tally with its console.
type site struct {
	// charge is the customer's refunded charge.
	charge string
	env    *tallytest.Env
	srv    *httptest.Server
	logs   *syncBuffer
}

// startSite starts Tally (auth cache TTL ttl) and a console in front of it.
func startSite(t *testing.T, ttl time.Duration) *site {
	t.Helper()
	logs := &syncBuffer{}
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL(), AuthCacheTTL: ttl, LogWriter: logs})
	conn, err := grpc.NewClient(env.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c := console.New(console.Config{Conn: conn, Verify: env.Verifier.Verify, Logger: log})
	srv := httptest.NewServer(c.Handler())
	t.Cleanup(srv.Close)
	return &site{env: env, srv: srv, logs: logs}
}

// customer makes a USD customer with an external_ref and some activity.
func (s *site) customer(t *testing.T) (id, ref string) {
	t.Helper()
	ctx := context.Background()
	ref = "console-" + tallytest.RandomSuffix()
	a, err := s.env.Client.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "USD", ExternalRef: ref})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 12345,
		IdempotencyKey: client.NewIdempotencyKey(), Description: "welcome credit"}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		ch, err := s.env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: int64(199 + i),
			IdempotencyKey: client.NewIdempotencyKey(), Description: "api calls"})
		if err != nil {
			t.Fatal(err)
		}
		s.charge = ch.GetTransfer().GetTransferId()
	}
	if _, err := s.env.Client.Refund(ctx, &tallyv1.RefundRequest{TransferId: s.charge, Amount: 101,
		IdempotencyKey: client.NewIdempotencyKey(), Reason: "duplicate call"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: a.GetAccountId(), Amount: 500,
		IdempotencyKey: client.NewIdempotencyKey(), Description: "card auth"}); err != nil {
		t.Fatal(err)
	}
	return a.GetAccountId(), ref
}

// httpClient is a cookie-keeping HTTP client that does not follow redirects.
type httpClient struct {
	t   *testing.T
	c   *http.Client
	url string
}

func (s *site) client(t *testing.T) *httpClient {
	jar, _ := cookiejar.New(nil)
	return &httpClient{t: t, url: s.srv.URL, c: &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}}
}

func (b *httpClient) do(req *http.Request) (*http.Response, string) {
	b.t.Helper()
	res, err := b.c.Do(req)
	if err != nil {
		b.t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return res, string(body)
}

func (b *httpClient) get(path string) (*http.Response, string) {
	req, _ := http.NewRequest("GET", b.url+path, nil)
	return b.do(req)
}

func (b *httpClient) post(path string, form url.Values) (*http.Response, string) {
	req, _ := http.NewRequest("POST", b.url+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return b.do(req)
}

var csrfRe = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// signIn signs in with key and returns the session's CSRF token.
func (b *httpClient) signIn(key string) string {
	b.t.Helper()
	_, page := b.get("/signin")
	m := csrfRe.FindStringSubmatch(page)
	if m == nil {
		b.t.Fatalf("no csrf on the sign-in page:\n%s", page)
	}
	res, _ := b.post("/signin", url.Values{"csrf": {m[1]}, "api_key": {key}})
	if res.StatusCode != http.StatusSeeOther || res.Header.Get("Location") != "/" {
		b.t.Fatalf("sign-in: %d %s", res.StatusCode, res.Header.Get("Location"))
	}
	_, home := b.get("/")
	m = csrfRe.FindStringSubmatch(home)
	if m == nil {
		b.t.Fatalf("no csrf on the home page:\n%s", home)
	}
	return m[1]
}

func newKey(t *testing.T, env *tallytest.Env, role auth.Role) string {
	return env.NewKey(t, role, "").Key.String()
}

// TestConsoleSecurity checks the console's security properties over plain
// HTTP: headers, cookies, redirects, CSRF, the role table, revocation, and
// that no key reaches a log or a URL.
func TestConsoleSecurity(t *testing.T) {
	s := startSite(t, 300*time.Millisecond)
	acct, ref := s.customer(t)

	anon := s.client(t)
	res, _ := anon.get("/accounts/" + acct)
	if res.StatusCode != http.StatusSeeOther || res.Header.Get("Location") != "/signin" {
		t.Fatalf("unauthenticated page: %d %q", res.StatusCode, res.Header.Get("Location"))
	}
	for name, want := range map[string]string{"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"} {
		if got := res.Header.Get(name); got != want {
			t.Fatalf("%s: %q", name, got)
		}
	}
	if csp := res.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || strings.Contains(csp, "unsafe") {
		t.Fatalf("CSP %q", csp)
	}
	// A sign-in POST without the form's token is refused.
	if res, _ := anon.post("/signin", url.Values{"api_key": {s.env.AdminKey}}); res.StatusCode != http.StatusForbidden {
		t.Fatalf("sign-in without csrf: %d", res.StatusCode)
	}
	// A charger's key cannot use the console.
	charger := s.client(t)
	_, page := charger.get("/signin")
	tok := csrfRe.FindStringSubmatch(page)[1]
	if res, _ := charger.post("/signin", url.Values{"csrf": {tok}, "api_key": {newKey(t, s.env, auth.RoleCharger)}}); res.StatusCode != http.StatusForbidden {
		t.Fatalf("charger sign-in: %d", res.StatusCode)
	}

	// The session cookie.
	supportKey := newKey(t, s.env, auth.RoleSupport)
	sup := s.client(t)
	_, page = sup.get("/signin")
	tok = csrfRe.FindStringSubmatch(page)[1]
	res, _ = sup.post("/signin", url.Values{"csrf": {tok}, "api_key": {supportKey}})
	var ck *http.Cookie
	for _, c := range res.Cookies() {
		if c.Name == "tally_console" {
			ck = c
		}
	}
	if ck == nil || !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode || len(ck.Value) < 40 || strings.Contains(ck.Value, supportKey) {
		t.Fatalf("session cookie %+v", ck)
	}
	_, home := sup.get("/")
	csrf := csrfRe.FindStringSubmatch(home)[1]

	// A POST without the CSRF token is refused, and changes nothing.
	if res, body := sup.post("/accounts/"+acct+"/status", url.Values{"action": {"freeze"}, "reason": {"x"}, "confirm": {"yes"}}); res.StatusCode != http.StatusForbidden || !strings.Contains(body, "did not come from the console") {
		t.Fatalf("POST without csrf: %d", res.StatusCode)
	}
	// Freeze needs a reason and a confirmation.
	if res, _ := sup.post("/accounts/"+acct+"/status", url.Values{"csrf": {csrf}, "action": {"freeze"}}); res.StatusCode != http.StatusBadRequest {
		t.Fatalf("freeze without reason: %d", res.StatusCode)
	}
	res, body := sup.post("/accounts/"+acct+"/status", url.Values{"csrf": {csrf}, "action": {"freeze"}, "reason": {"chargeback"}})
	if res.StatusCode != http.StatusOK || !strings.Contains(body, "Yes, freeze") {
		t.Fatalf("freeze step 1: %d\n%s", res.StatusCode, body)
	}
	assertStatus(t, s.env, acct, tallyv1.AccountStatus_ACCOUNT_STATUS_ACTIVE)

	// A viewer sees no freeze control, and a hand-made POST is refused.
	viewer := s.client(t)
	vcsrf := viewer.signIn(newKey(t, s.env, auth.RoleViewer))
	_, vpage := viewer.get("/accounts/" + acct)
	if strings.Contains(vpage, "status-change") || !strings.Contains(vpage, "118.46 USD") || !strings.Contains(vpage, "card auth") {
		t.Fatalf("viewer's account page:\n%s", vpage)
	}
	if res, _ := viewer.post("/accounts/"+acct+"/status", url.Values{"csrf": {vcsrf}, "action": {"freeze"}, "reason": {"forged"}, "confirm": {"yes"}}); res.StatusCode != http.StatusForbidden {
		t.Fatalf("viewer's forged POST: %d", res.StatusCode)
	}
	assertStatus(t, s.env, acct, tallyv1.AccountStatus_ACCOUNT_STATUS_ACTIVE)

	// The refunded charge's page lists its refund.
	if _, tpage := viewer.get("/transfers/" + s.charge); !strings.Contains(tpage, "Refunds of this charge") || !strings.Contains(tpage, "1.01 USD") {
		t.Fatalf("charge page:\n%s", tpage)
	}

	// Search by external_ref opens the account.
	if res, _ := viewer.get("/search?q=" + url.QueryEscape(ref)); res.Header.Get("Location") != "/accounts/"+acct {
		t.Fatalf("search: %d %q", res.StatusCode, res.Header.Get("Location"))
	}
	if res, _ := viewer.get("/search?q=" + strings.Repeat("x", console.SearchBytesMaxDefault+1)); res.StatusCode != http.StatusBadRequest {
		t.Fatalf("long search: %d", res.StatusCode)
	}

	// Revoking the key ends its session within the auth cache TTL.
	k, _ := auth.KeyIDOf(supportKey)
	if _, err := s.env.Store.RevokeAPIKey(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		res, _ := sup.get("/accounts/" + acct)
		if res.StatusCode == http.StatusSeeOther && strings.HasPrefix(res.Header.Get("Location"), "/signin") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("revoked key's session still works: %d", res.StatusCode)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if res, _ := sup.get("/"); res.StatusCode != http.StatusSeeOther {
		t.Fatalf("session after revocation: %d", res.StatusCode)
	}

	// No key, not even its secret, in any log line.
	logs := s.logs.String()
	for _, key := range []string{supportKey, s.env.AdminKey} {
		if secret := key[strings.LastIndex(key, "_")+1:]; strings.Contains(logs, secret) {
			t.Fatalf("a key's secret is in the logs")
		}
	}
}

func assertStatus(t *testing.T, env *tallytest.Env, acct string, want tallyv1.AccountStatus) {
	t.Helper()
	a, err := env.Client.GetAccount(context.Background(), &tallyv1.GetAccountRequest{AccountId: acct})
	if err != nil {
		t.Fatal(err)
	}
	if a.GetStatus() != want {
		t.Fatalf("status %v, want %v", a.GetStatus(), want)
	}
}
