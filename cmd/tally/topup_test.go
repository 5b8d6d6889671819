package main

import (
	"strings"
	"testing"
	"time"

	"github.com/tallyledger/tally/internal/stripetest"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	"github.com/tallyledger/tally/topup"
)

// tally topup set|get|list against a real server whose workers pay through
// the Stripe-compatible test server.
func TestCLITopUp(t *testing.T) {
	srv, err := stripetest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, TopUp: ledger.TopUpConfig{Provider: "stripe"},
		TopUpWorker: &topup.Config{Provider: topup.NewStripe(topup.StripeConfig{APIKey: "sk_test_cli", URL: srv.URL}),
			RetryBackoff: 50 * time.Millisecond}})
	acct := firstID(t, cli(t, env, "account", "create", "--currency", "USD", "--quiet"))
	cli(t, env, "credit", "--account", acct, "--amount", "1000", "--key", "cli-topup-fund-"+acct)
	out := cli(t, env, "topup", "set", "--account", acct, "--threshold", "500", "--target", "1000", "--amount-max", "800",
		"--per-day-max", "5000", "--customer", "cus_cli", "--payment-method", "pm_card_visa")
	mustContain(t, out, "ENABLED", acct+" true 500 1000 800 5000 cus_cli pm_card_visa 0")
	mustContain(t, cli(t, env, "topup", "get", "--account", acct, "--json"), `"threshold": "500"`)
	mustContain(t, cliErr(t, env, "topup", "set", "--account", acct, "--threshold", "5", "--target", "5", "--amount-max", "1",
		"--per-day-max", "1", "--customer", "c", "--payment-method", "p"), "InvalidArgument INVALID_ARGUMENT")
	cli(t, env, "charge", "--account", acct, "--amount", "600", "--key", "cli-topup-charge-"+acct)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out = cli(t, env, "topup", "list", "--account", acct)
		if strings.Contains(out, "SUCCEEDED") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no SUCCEEDED top-up:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	mustContain(t, out, "SUCCEEDED 600 USD pi_test")
	mustContain(t, cli(t, env, "topup", "list", "--account", acct, "--json"), `"status": "TOP_UP_STATUS_SUCCEEDED"`, `"amount": "600"`)
	// The provider's payments agree with the top-ups.
	mustContain(t, cli(t, env, "reconcile", "--account", acct, "--stripe"), "OK: 1 accounts checked")
}
