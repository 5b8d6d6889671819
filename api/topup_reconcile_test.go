package api_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/stripetest"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// reconcileChecks runs Reconcile with the provider comparison and returns
// the findings' checks.
func reconcileChecks(t *testing.T, env *tallytest.Env) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	now := time.Now()
	err := env.Client.Reconcile(ctxT(t), &tallyv1.ReconcileRequest{Provider: true,
		ProviderFrom: timestamppb.New(now.Add(-time.Hour)), ProviderTo: timestamppb.New(now.Add(time.Minute))},
		func(m *tallyv1.ReconcileResponse) error {
			if f := m.GetFinding(); f != nil {
				out[f.GetCheck()] = append(out[f.GetCheck()], f.GetDetail())
			}
			return nil
		})
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	return out
}

// createIntent makes a PaymentIntent at the test server directly (not
// through tallyd), naming topupID.
func createIntent(t *testing.T, srv *stripetest.Server, topupID, key string) {
	t.Helper()
	form := url.Values{"amount": {"500"}, "currency": {"usd"}, "customer": {"cus_x"}, "payment_method": {"pm_card_visa"},
		"confirm": {"true"}, "off_session": {"true"}, "metadata[tally_topup_id]": {topupID}}
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/payment_intents", strings.NewReader(form.Encode()))
	req.Header.Set("Authorization", "Bearer sk_test_x")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("create PaymentIntent: %v %v", resp, err)
	}
	resp.Body.Close()
}

// Reconciliation ties top-ups to their credits and to the provider's
// payments: clean books pass, and each damage is named. Its own database,
// so the damage touches no other test.
func TestReconcileTopUps(t *testing.T) {
	t.Parallel()
	db, err := testdb.New(context.Background(), tallytest.DBOptions())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	srv := startStripe(t)
	o := tallytest.Options{DatabaseURL: db.URL(), ClientPolicy: noRetry}
	topupOptions(srv)(&o)
	env := tallytest.Start(t, o)
	acct := createAccount(t, env, "USD").GetAccountId()
	credit(t, env, acct, 1000)
	setRule(t, env, acct, ruleSpec{threshold: 500, target: 1000, amountMax: 1000, perDayMax: 10_000})
	chargeOK(t, env, acct, 600)
	x := waitTopUp(t, env, acct, 1, 30*time.Second)[0]
	if got := reconcileChecks(t, env); len(got) != 0 {
		t.Fatalf("findings on clean books: %v", got)
	}
	// The feed has the top-up's two states, PENDING then SUCCEEDED, in
	// the order they committed.
	var states []tallyv1.TopUpStatus
	if _, err := env.Client.Export(ctxT(t), "", false, func(e *tallyv1.ExportTransfersResponse) error {
		if tu := e.GetTopup(); tu != nil && tu.GetTopupId() == x.GetTopupId() {
			states = append(states, tu.GetStatus())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(states) != 2 || states[0] != tallyv1.TopUpStatus_TOP_UP_STATUS_PENDING || states[1] != tallyv1.TopUpStatus_TOP_UP_STATUS_SUCCEEDED {
		t.Fatalf("feed top-up events %v, want PENDING then SUCCEEDED", states)
	}

	// A top-up credit that no top-up names.
	orphanKey := "topup:" + uuid.Must(uuid.NewV7()).String()
	if _, err := env.Ledger.Credit(ctxT(t), ledger.MoveRequest{Scope: ledger.TopUpScope, AccountID: uuid.MustParse(acct),
		Amount: 5, IdempotencyKey: orphanKey}); err != nil {
		t.Fatal(err)
	}
	// A payment for a top-up that does not exist, and a second payment for
	// the real one.
	createIntent(t, srv, uuid.Must(uuid.NewV7()).String(), client.NewIdempotencyKey())
	createIntent(t, srv, x.GetTopupId(), client.NewIdempotencyKey())
	got := reconcileChecks(t, env)
	for _, c := range []string{ledger.CheckTopUpCreditOrphan, ledger.CheckProviderPaymentWithoutTopUp, ledger.CheckProviderPaymentDuplicate} {
		if len(got[c]) == 0 {
			t.Errorf("no %s finding: %v", c, got)
		}
	}
	// The top-up's recorded payment and credit no longer match.
	if _, err := env.Store.Pool().Exec(ctxT(t), `UPDATE topups SET provider_payment_id = 'pi_forged',
		credit_transfer_id = (SELECT transfer_id FROM transfers WHERE scope = $2 AND idempotency_key = $3)
		WHERE topup_id = $1`, x.GetTopupId(), ledger.TopUpScope, orphanKey); err != nil {
		t.Fatal(err)
	}
	got = reconcileChecks(t, env)
	for _, c := range []string{ledger.CheckTopUpCredited, ledger.CheckTopUpWithoutPayment} {
		if len(got[c]) == 0 {
			t.Errorf("no %s finding: %v", c, got)
		}
	}
	t.Logf("findings: %v", got)
}
