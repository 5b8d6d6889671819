package api_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func newEnv(t *testing.T) *tallytest.Env {
	t.Helper()
	return tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL()})
}

// newCurrency returns a currency code no other test uses, so per-currency
// sums can be checked while tests run in parallel.
func newCurrency() string { return "T" + strings.ToUpper(tallytest.RandomSuffix()[:10]) }

func createAccount(t *testing.T, env *tallytest.Env, currency string, mods ...func(*tallyv1.CreateAccountRequest)) *tallyv1.Account {
	t.Helper()
	req := &tallyv1.CreateAccountRequest{Currency: currency}
	for _, m := range mods {
		m(req)
	}
	a, err := env.Client.CreateAccount(ctxT(t), req)
	if err != nil {
		t.Fatalf("CreateAccount: %v", err)
	}
	return a
}

func credit(t *testing.T, env *tallytest.Env, acct string, amount int64) *tallyv1.TransferResult {
	t.Helper()
	r, err := env.Client.Credit(ctxT(t), &tallyv1.CreditRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatalf("Credit: %v", err)
	}
	return r
}

func strongBalance(t *testing.T, env *tallytest.Env, acct string) *tallyv1.Balance {
	t.Helper()
	b, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	if err != nil {
		t.Fatalf("GetBalance: %v", err)
	}
	return b
}

// wantErr asserts a status code and ErrorInfo reason.
func wantErr(t *testing.T, err error, code codes.Code, reason string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
	info, ok := api.ErrorInfo(err)
	if !ok {
		t.Fatalf("error %v has no ErrorInfo", err)
	}
	if reason != "" && info.GetReason() != reason {
		t.Fatalf("got reason %q, want %q (%v)", info.GetReason(), reason, err)
	}
	if info.GetDomain() != api.ErrorDomain {
		t.Fatalf("got domain %q", info.GetDomain())
	}
}

func replayedErr(err error) bool {
	info, ok := api.ErrorInfo(err)
	return ok && info.GetMetadata()["replayed"] == "true"
}
