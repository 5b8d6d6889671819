package api_test

// Auto top-up (issue 13) through the real gRPC server, real PostgreSQL,
// real Redis and the Stripe-compatible test server (internal/stripetest).

import (
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc/codes"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/stripetest"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/topup"
)

func startStripe(t *testing.T) *stripetest.Server {
	t.Helper()
	s, err := stripetest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// topupOptions runs the workers against srv with short retries and a 1 s
// provider timeout (a hang becomes an unknown outcome quickly).
func topupOptions(srv *stripetest.Server) func(*tallytest.Options) {
	return topupOptionsTimeout(srv, time.Second)
}

func topupOptionsTimeout(srv *stripetest.Server, timeout time.Duration) func(*tallytest.Options) {
	return func(o *tallytest.Options) {
		o.TopUp = ledger.TopUpConfig{Provider: "stripe", AttemptsMax: 8}
		o.TopUpWorker = &topup.Config{
			Provider:     topup.NewStripe(topup.StripeConfig{APIKey: "sk_test_tally", URL: srv.URL, Timeout: timeout}),
			RetryBackoff: 50 * time.Millisecond, RetryBackoffMax: 500 * time.Millisecond,
			JobTimeout: 10 * time.Second, RescueAfter: 20 * time.Second,
		}
	}
}

type ruleSpec struct {
	threshold, target, amountMax, perDayMax int64
	paymentMethod                           string
}

func setRule(t *testing.T, env *tallytest.Env, acct string, r ruleSpec) *tallyv1.AutoTopUp {
	t.Helper()
	if r.paymentMethod == "" {
		r.paymentMethod = "pm_card_visa"
	}
	got, err := env.Raw.SetAutoTopUp(ctxT(t), &tallyv1.SetAutoTopUpRequest{
		AccountId: acct, Enabled: true, Threshold: r.threshold, TargetBalance: r.target, AmountMax: r.amountMax,
		PerDayMax: r.perDayMax, ProviderCustomerId: "cus_" + acct[:8], PaymentMethodId: r.paymentMethod,
	})
	if err != nil {
		t.Fatalf("SetAutoTopUp: %v", err)
	}
	return got
}

func listTopUps(t *testing.T, env *tallytest.Env, acct string) []*tallyv1.TopUp {
	t.Helper()
	r, err := env.Raw.ListTopUps(ctxT(t), &tallyv1.ListTopUpsRequest{AccountId: acct, PageSize: 100})
	if err != nil {
		t.Fatalf("ListTopUps: %v", err)
	}
	return r.GetTopups()
}

// waitTopUp waits until acct has n top-ups and none is PENDING.
func waitTopUp(t *testing.T, env *tallytest.Env, acct string, n int, limit time.Duration) []*tallyv1.TopUp {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		xs := listTopUps(t, env, acct)
		pending := false
		for _, x := range xs {
			pending = pending || x.GetStatus() == tallyv1.TopUpStatus_TOP_UP_STATUS_PENDING
		}
		if len(xs) == n && !pending {
			return xs
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %d top-ups (pending %v), want %d finished: %v", limit, len(xs), pending, n, xs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func chargeOK(t *testing.T, env *tallytest.Env, acct string, amount int64) *tallyv1.TransferResult {
	t.Helper()
	r, err := env.Client.Charge(ctxT(t), &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatalf("Charge %d: %v", amount, err)
	}
	return r
}

// topUpCredits counts the CREDIT transfers posted for a top-up.
func topUpCredits(t *testing.T, env *tallytest.Env, topupID string) (n, amount int64) {
	t.Helper()
	err := env.Store.Pool().QueryRow(ctxT(t), `SELECT count(*), coalesce(sum(amount), 0) FROM transfers
		WHERE kind = 2 AND scope = $1 AND idempotency_key = 'topup:' || $2`, ledger.TopUpScope, topupID).Scan(&n, &amount)
	if err != nil {
		t.Fatal(err)
	}
	return n, amount
}

// paidOnce asserts exactly one PaymentIntent for the top-up (succeeded)
// and exactly one CREDIT of its amount.
func paidOnce(t *testing.T, env *tallytest.Env, srv *stripetest.Server, x *tallyv1.TopUp) {
	t.Helper()
	var all, ok int
	for _, p := range srv.PaymentIntents() {
		if p.Metadata["tally_topup_id"] == x.GetTopupId() {
			all++
			if p.Status == "succeeded" {
				ok++
			}
			if p.Amount != x.GetAmount() || p.Currency != "usd" || !p.Confirm || !p.OffSession ||
				p.IdempotencyKey != "tally-topup-"+x.GetTopupId() || p.PaymentMethod == "" || p.Customer == "" {
				t.Errorf("PaymentIntent %+v does not match top-up %v", p, x)
			}
		}
	}
	if all != 1 || ok != 1 {
		t.Fatalf("top-up %s: %d PaymentIntents (%d succeeded), want exactly 1", x.GetTopupId(), all, ok)
	}
	if n, amt := topUpCredits(t, env, x.GetTopupId()); n != 1 || amt != x.GetAmount() {
		t.Fatalf("top-up %s: %d credits of %d, want 1 of %d", x.GetTopupId(), n, amt, x.GetAmount())
	}
	if x.GetStatus() != tallyv1.TopUpStatus_TOP_UP_STATUS_SUCCEEDED || x.GetCreditTransferId() == "" ||
		x.GetProviderPaymentId() == "" {
		t.Fatalf("top-up %v, want SUCCEEDED with its payment and credit", x)
	}
}

func TestAutoTopUpNeedsAProvider(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	acct := createAccount(t, env, "USD").GetAccountId()
	_, err := env.Raw.SetAutoTopUp(ctxT(t), &tallyv1.SetAutoTopUpRequest{AccountId: acct, Enabled: true, Threshold: 1,
		TargetBalance: 2, AmountMax: 1, PerDayMax: 1, ProviderCustomerId: "cus_1", PaymentMethodId: "pm_1"})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonTopUpProviderNotConfigured)
}

func TestAutoTopUpRuleValidationAndAudit(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t, func(o *tallytest.Options) { o.TopUp.Provider = "stripe" })
	acct := createAccount(t, env, "USD").GetAccountId()
	good := func() *tallyv1.SetAutoTopUpRequest {
		return &tallyv1.SetAutoTopUpRequest{AccountId: acct, Enabled: true, Threshold: 100, TargetBalance: 1000,
			AmountMax: 900, PerDayMax: 5000, ProviderCustomerId: "cus_1", PaymentMethodId: "pm_card_visa"}
	}
	for _, c := range []struct {
		field string
		mod   func(*tallyv1.SetAutoTopUpRequest)
	}{
		{"threshold", func(r *tallyv1.SetAutoTopUpRequest) { r.Threshold = 1000 }},
		{"threshold", func(r *tallyv1.SetAutoTopUpRequest) { r.Threshold = 2000 }},
		{"amount_max", func(r *tallyv1.SetAutoTopUpRequest) { r.AmountMax = 0 }},
		{"amount_max", func(r *tallyv1.SetAutoTopUpRequest) { r.AmountMax = -5 }},
		{"per_day_max", func(r *tallyv1.SetAutoTopUpRequest) { r.PerDayMax = 0 }},
		{"target_balance", func(r *tallyv1.SetAutoTopUpRequest) { r.TargetBalance = 1 << 62 }},
		{"provider_customer_id", func(r *tallyv1.SetAutoTopUpRequest) { r.ProviderCustomerId = "" }},
		{"payment_method_id", func(r *tallyv1.SetAutoTopUpRequest) { r.PaymentMethodId = "pm with space" }},
		{"account_id", func(r *tallyv1.SetAutoTopUpRequest) { r.AccountId = "nope" }},
	} {
		r := good()
		c.mod(r)
		_, err := env.Raw.SetAutoTopUp(ctxT(t), r)
		wantErr(t, err, codes.InvalidArgument, ledger.ReasonInvalidArgument)
		if info, _ := api.ErrorInfo(err); info.GetMetadata()["field"] != c.field {
			t.Errorf("%+v: field %q, want %q", r, info.GetMetadata()["field"], c.field)
		}
	}
	// Only floored CUSTOMER accounts in a card currency.
	rev, err := env.Ledger.SystemAccount(ctxT(t), "USD", ledger.AccountTypeRevenue)
	if err != nil {
		t.Fatal(err)
	}
	r := good()
	r.AccountId = rev.String()
	_, err = env.Raw.SetAutoTopUp(ctxT(t), r)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountTypeMismatch)
	noFloor := createAccount(t, env, "USD", func(c *tallyv1.CreateAccountRequest) { c.Floor = tallyv1.Floor_FLOOR_NONE })
	r = good()
	r.AccountId = noFloor.GetAccountId()
	_, err = env.Raw.SetAutoTopUp(ctxT(t), r)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonTopUpNeedsFloor)
	r = good()
	r.AccountId = createAccount(t, env, newCurrency()).GetAccountId()
	_, err = env.Raw.SetAutoTopUp(ctxT(t), r)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonCurrencyMismatch)
	_, err = env.Raw.GetAutoTopUp(ctxT(t), &tallyv1.GetAutoTopUpRequest{AccountId: acct})
	wantErr(t, err, codes.NotFound, ledger.ReasonTopUpRuleNotFound)

	// Support sets a rule; the change is recorded with who made it.
	sup := env.NewKey(t, auth.RoleSupport, "")
	sc := env.Dial(t, sup.Key.String())
	set, err := sc.Raw().SetAutoTopUp(ctxT(t), good())
	if err != nil {
		t.Fatal(err)
	}
	got, err := env.Raw.GetAutoTopUp(ctxT(t), &tallyv1.GetAutoTopUpRequest{AccountId: acct})
	if err != nil || got.GetThreshold() != 100 || got.GetTargetBalance() != 1000 || !got.GetEnabled() ||
		got.GetAmountMax() != 900 || got.GetPerDayMax() != 5000 || got.GetPaymentMethodId() != "pm_card_visa" ||
		got.GetUpdatedAt().AsTime().IsZero() || set.GetAccountId() != acct {
		t.Fatalf("GetAutoTopUp = %v, %v", got, err)
	}
	var by, key, after string
	if err := env.Store.Pool().QueryRow(ctxT(t), `SELECT created_by_client::text, created_by_key, after::text
		FROM account_changes WHERE account_id = $1 AND action = 'auto_topup'`, acct).Scan(&by, &key, &after); err != nil {
		t.Fatal(err)
	}
	if by != sup.ClientID.String() || key != sup.Key.ID {
		t.Fatalf("account change by %s/%s, want %s/%s", by, key, sup.ClientID, sup.Key.ID)
	}
	t.Logf("account change: %s", after)
}

// A burst of 50 concurrent charges takes the account across its threshold
// (and further below it): exactly one top-up starts, of target - available
// at the crossing batch, and it is paid and credited once.
func TestAutoTopUpBurstStartsExactlyOne(t *testing.T) {
	t.Parallel()
	srv := startStripe(t)
	srv.SlowDelay = 3 * time.Second
	srv.SetFault(stripetest.FaultSlow) // keeps the top-up in flight through the burst
	env := newAuthEnv(t, topupOptionsTimeout(srv, 10*time.Second))
	acct := createAccount(t, env, "USD").GetAccountId()
	credit(t, env, acct, 1000)
	setRule(t, env, acct, ruleSpec{threshold: 500, target: 1000, amountMax: 1000, perDayMax: 10_000})
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			chargeOK(t, env, acct, 11)
		}()
	}
	wg.Wait()
	burst := time.Since(start)
	if burst > 2*time.Second {
		t.Logf("the burst took %v, longer than the provider's delay allows for this test", burst)
	}
	xs := listTopUps(t, env, acct)
	if len(xs) != 1 {
		t.Fatalf("%d top-ups after the burst, want 1: %v", len(xs), xs)
	}
	x := waitTopUp(t, env, acct, 1, 30*time.Second)[0]
	paidOnce(t, env, srv, x)
	var availAtTrigger int64
	if err := env.Store.Pool().QueryRow(ctxT(t), `SELECT e.balance_after FROM entries e
		WHERE e.transfer_id = $1 AND e.account_id = $2`, x.GetTriggerTransferId(), acct).Scan(&availAtTrigger); err != nil {
		t.Fatal(err)
	}
	// The crossing batch may have held several charges; the trigger is its
	// last debit, so target - its balance_after is the amount.
	if want := 1000 - availAtTrigger; x.GetAmount() != want {
		t.Fatalf("top-up of %d, want target 1000 - available %d = %d", x.GetAmount(), availAtTrigger, want)
	}
	if b := strongBalance(t, env, acct); b.GetBalance() != 1000-50*11+x.GetAmount() {
		t.Fatalf("balance %d, want %d", b.GetBalance(), 1000-50*11+x.GetAmount())
	}
	env.CheckBooks(t)
}

// The provider records the payment and then answers 500 (stored under the
// key, so a plain retry would get the 500 again), hangs, or drops the
// connection: each ends with exactly one PaymentIntent and one CREDIT,
// because the worker looks the payment up before it retries.
func TestAutoTopUpProviderFaultsAfterRecording(t *testing.T) {
	t.Parallel()
	for _, f := range []stripetest.Fault{stripetest.Fault500AfterRecord, stripetest.FaultHangAfterRecord, stripetest.FaultDropAfterRecord} {
		t.Run(f.String(), func(t *testing.T) {
			t.Parallel()
			srv := startStripe(t)
			srv.InjectFaults(f)
			env := newAuthEnv(t, topupOptions(srv))
			acct := createAccount(t, env, "USD").GetAccountId()
			credit(t, env, acct, 1000)
			setRule(t, env, acct, ruleSpec{threshold: 500, target: 2000, amountMax: 1500, perDayMax: 10_000})
			chargeOK(t, env, acct, 600) // available 400 < 500
			x := waitTopUp(t, env, acct, 1, 30*time.Second)[0]
			if x.GetAmount() != 1500 || x.GetAttempts() < 2 {
				t.Fatalf("top-up %v: want 1500 (capped by amount_max) after at least 2 attempts", x)
			}
			paidOnce(t, env, srv, x)
			if b := strongBalance(t, env, acct); b.GetBalance() != 1900 {
				t.Fatalf("balance %d, want 1900", b.GetBalance())
			}
			env.CheckBooks(t)
		})
	}
}

// A decline marks the top-up FAILED with the provider's code, disables the
// rule (--topup-failures-max 1) and nothing more is charged, however low
// the account goes; enabling the rule again clears the failure.
func TestAutoTopUpDeclineDisablesRule(t *testing.T) {
	t.Parallel()
	srv := startStripe(t)
	srv.Decline("pm_card_broke", "insufficient_funds")
	env := newAuthEnv(t, topupOptions(srv))
	acct := createAccount(t, env, "USD").GetAccountId()
	credit(t, env, acct, 1000)
	setRule(t, env, acct, ruleSpec{threshold: 500, target: 1000, amountMax: 1000, perDayMax: 10_000, paymentMethod: "pm_card_broke"})
	chargeOK(t, env, acct, 600)
	x := waitTopUp(t, env, acct, 1, 30*time.Second)[0]
	if x.GetStatus() != tallyv1.TopUpStatus_TOP_UP_STATUS_FAILED || x.GetFailureCode() != "insufficient_funds" {
		t.Fatalf("top-up %v, want FAILED insufficient_funds", x)
	}
	rule, err := env.Raw.GetAutoTopUp(ctxT(t), &tallyv1.GetAutoTopUpRequest{AccountId: acct})
	if err != nil || rule.GetDisabledReason() == "" || rule.GetConsecutiveFailures() != 1 {
		t.Fatalf("rule %v (%v), want disabled after 1 failure", rule, err)
	}
	for i := 0; i < 5; i++ {
		chargeOK(t, env, acct, 50)
	}
	time.Sleep(time.Second) // time for a wrongly started job to run
	if xs := listTopUps(t, env, acct); len(xs) != 1 {
		t.Fatalf("%d top-ups after the rule was disabled, want 1", len(xs))
	}
	if n := len(srv.PaymentIntents()); n != 1 {
		t.Fatalf("%d PaymentIntents, want the 1 declined", n)
	}
	if n, _ := topUpCredits(t, env, x.GetTopupId()); n != 0 {
		t.Fatalf("%d credits for a declined top-up", n)
	}
	var changes int
	if err := env.Store.Pool().QueryRow(ctxT(t), `SELECT count(*) FROM account_changes
		WHERE account_id = $1 AND action = 'auto_topup' AND created_by_client IS NULL`, acct).Scan(&changes); err != nil || changes != 1 {
		t.Fatalf("%d account changes by tallyd disabling the rule (%v), want 1", changes, err)
	}
	// Re-enabled with a good card: the next debit below the threshold
	// starts a top-up again.
	setRule(t, env, acct, ruleSpec{threshold: 500, target: 1000, amountMax: 1000, perDayMax: 10_000})
	rule, _ = env.Raw.GetAutoTopUp(ctxT(t), &tallyv1.GetAutoTopUpRequest{AccountId: acct})
	if rule.GetDisabledReason() != "" || rule.GetConsecutiveFailures() != 0 {
		t.Fatalf("re-enabled rule %v", rule)
	}
	chargeOK(t, env, acct, 1)
	waitTopUp(t, env, acct, 2, 30*time.Second)
}

// Nothing about a top-up is decided from Redis: a low balance planted in
// the cache, a flushed cache, a read-only cache and a dead cache never
// start one while PostgreSQL's balance stays above the threshold; the
// crossing debit still starts exactly one, whatever Redis does.
func TestAutoTopUpNeverFromRedis(t *testing.T) {
	t.Parallel()
	r := privateRedis(t)
	srv := startStripe(t)
	env := newTopUpCacheEnv(t, r.URL(), srv)
	admin := redisAdmin(t, r.Addr())
	acct := createAccount(t, env, "USD").GetAccountId()
	credit(t, env, acct, 10_000)
	setRule(t, env, acct, ruleSpec{threshold: 500, target: 1000, amountMax: 1000, perDayMax: 100_000})
	id := uuid.MustParse(acct)
	none := func(when string) {
		t.Helper()
		time.Sleep(300 * time.Millisecond)
		if xs := listTopUps(t, env, acct); len(xs) != 0 {
			t.Fatalf("%s: %d top-ups started, want none: %v", when, len(xs), xs)
		}
	}

	// A planted low balance, with a version newer than PostgreSQL's.
	b := strongBalance(t, env, acct)
	env.Cache.Put(ctxT(t), cache.Balance{AccountID: id, Currency: "USD", Balance: 5, Available: 5,
		Version: b.GetVersion() + 1000, AsOf: time.Now()})
	if got := cachedRead(t, env, acct); got.GetBalance() != 5 {
		t.Logf("the planted balance was not served (%d); it still must start nothing", got.GetBalance())
	}
	chargeOK(t, env, acct, 100)
	none("planted low balance")

	if err := admin.FlushAll(ctxT(t)).Err(); err != nil {
		t.Fatal(err)
	}
	chargeOK(t, env, acct, 100)
	none("flushed")

	setReadOnly(t, admin, true)
	chargeOK(t, env, acct, 100)
	none("read-only")
	setReadOnly(t, admin, false)

	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	chargeOK(t, env, acct, 100) // Redis is gone
	none("killed")

	// PostgreSQL says 9,600; the debit that takes it to 400 starts one.
	chargeOK(t, env, acct, 9_200)
	x := waitTopUp(t, env, acct, 1, 30*time.Second)[0]
	if x.GetAmount() != 600 {
		t.Fatalf("top-up of %d, want 1000 - 400", x.GetAmount())
	}
	paidOnce(t, env, srv, x)
}

func newTopUpCacheEnv(t *testing.T, redisURL string, srv *stripetest.Server) *tallytest.Env {
	t.Helper()
	o := tallytest.Options{CacheTTL: time.Minute, CacheOpTimeout: 200 * time.Millisecond, ClientPolicy: noRetry}
	topupOptions(srv)(&o)
	return cacheEnv(t, redisURL, o)
}

// ListTopUps pages newest first; its token is bound to the account.
func TestListTopUpsPages(t *testing.T) {
	t.Parallel()
	srv := startStripe(t)
	env := newAuthEnv(t, topupOptions(srv))
	acct := createAccount(t, env, "USD").GetAccountId()
	credit(t, env, acct, 1000)
	setRule(t, env, acct, ruleSpec{threshold: 500, target: 1000, amountMax: 1000, perDayMax: 100_000})
	for i := 1; i <= 3; i++ {
		chargeOK(t, env, acct, 600)
		waitTopUp(t, env, acct, i, 30*time.Second)
	}
	p1, err := env.Raw.ListTopUps(ctxT(t), &tallyv1.ListTopUpsRequest{AccountId: acct, PageSize: 2})
	if err != nil || len(p1.GetTopups()) != 2 || p1.GetNextPageToken() == "" {
		t.Fatalf("page 1: %v %v", p1, err)
	}
	p2, err := env.Raw.ListTopUps(ctxT(t), &tallyv1.ListTopUpsRequest{AccountId: acct, PageSize: 2, PageToken: p1.GetNextPageToken()})
	if err != nil || len(p2.GetTopups()) != 1 || p2.GetNextPageToken() != "" {
		t.Fatalf("page 2: %v %v", p2, err)
	}
	if !p1.GetTopups()[0].GetCreatedAt().AsTime().After(p2.GetTopups()[0].GetCreatedAt().AsTime()) {
		t.Fatalf("not newest first")
	}
	other := createAccount(t, env, "USD").GetAccountId()
	_, err = env.Raw.ListTopUps(ctxT(t), &tallyv1.ListTopUpsRequest{AccountId: other, PageToken: p1.GetNextPageToken()})
	wantErr(t, err, codes.InvalidArgument, ledger.ReasonInvalidArgument)
}
