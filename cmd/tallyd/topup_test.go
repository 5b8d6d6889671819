package main_test

import (
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/stripetest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// tallyd is killed with -9 after the provider recorded the payment and
// before tallyd learned of it (so before the credit). After a restart the
// job is rescued, looks the payment up, and posts the credit once: one
// PaymentIntent, one CREDIT.
func TestKill9BetweenPaymentAndCredit(t *testing.T) {
	srv, err := stripetest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	grpcAddr, httpAddr := addrs(t)
	flags := []string{"--topup-provider", "stripe", "--stripe-api-key", "sk_test_kill9", "--stripe-api-url", srv.URL,
		"--stripe-timeout", "2s", "--topup-job-timeout", "3s", "--topup-rescue-after", "4s",
		"--topup-retry-backoff", "100ms", "--topup-retry-backoff-max", "1s"}
	p := serve(t, dbURL, grpcAddr, httpAddr, flags...)
	p.waitReady(30 * time.Second)
	var killed atomic.Bool
	srv.OnRecord = func(stripetest.PaymentIntent) {
		if killed.CompareAndSwap(false, true) {
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
		}
	}
	srv.InjectFaults(stripetest.FaultHangAfterRecord) // tallyd is dead; answer nothing
	cl := newClient(t, grpcAddr, adminKey, client.Policy{CallTimeout: 3 * time.Second, RetryAttemptsMax: 20,
		BackoffBase: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond})
	ctx := ctxT(t)
	a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "USD"})
	if err != nil {
		t.Fatal(err)
	}
	acct := a.GetAccountId()
	if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: acct, Amount: 1000, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Raw().SetAutoTopUp(ctx, &tallyv1.SetAutoTopUpRequest{AccountId: acct, Enabled: true, Threshold: 500,
		TargetBalance: 1000, AmountMax: 1000, PerDayMax: 10_000, ProviderCustomerId: "cus_kill9", PaymentMethodId: "pm_card_visa"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: 700, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !killed.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the payment was never made")
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.wait(10 * time.Second)
	env := openStore(t, dbURL)
	var status int16
	var topupID string
	if err := env.Store.Pool().QueryRow(ctx, `SELECT topup_id::text, status FROM topups WHERE account_id = $1`, acct).Scan(&topupID, &status); err != nil || status != 1 {
		t.Fatalf("after the kill: top-up %s status %d (%v), want PENDING", topupID, status, err)
	}
	start := time.Now()
	p = serve(t, dbURL, grpcAddr, httpAddr, flags...)
	p.waitReady(30 * time.Second)
	cl = newClient(t, grpcAddr, adminKey, client.Policy{CallTimeout: 3 * time.Second, RetryAttemptsMax: 20})
	deadline = time.Now().Add(150 * time.Second)
	for {
		r, err := cl.Raw().ListTopUps(ctxT(t), &tallyv1.ListTopUpsRequest{AccountId: acct})
		if err == nil && len(r.GetTopups()) == 1 && r.GetTopups()[0].GetStatus() == tallyv1.TopUpStatus_TOP_UP_STATUS_SUCCEEDED {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("top-up not credited %v after the restart: %v %v", time.Since(start), r, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("credited %v after the restart", time.Since(start).Round(time.Millisecond))
	var credits int
	if err := env.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM transfers WHERE scope = $1 AND idempotency_key = 'topup:' || $2`,
		ledger.TopUpScope, topupID).Scan(&credits); err != nil || credits != 1 {
		t.Fatalf("%d credits (%v), want 1", credits, err)
	}
	if n := len(srv.PaymentIntents()); n != 1 || len(srv.Succeeded(topupID)) != 1 {
		t.Fatalf("%d PaymentIntents, want 1 succeeded for the top-up", n)
	}
	b, err := cl.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	if err != nil || b.GetBalance() != 1000 {
		t.Fatalf("balance %d (%v), want 300 + 700", b.GetBalance(), err)
	}
	p.stop()
}
