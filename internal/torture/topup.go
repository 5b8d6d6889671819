package torture

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/stripetest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Auto top-up in the torture run: a Stripe-compatible test server in this
// process is every tallyd's provider, a few USD customers get rules and
// are charged below their thresholds by the ordinary workload, and the
// nemesis adds provider faults and a read-only Redis.

// Fault kinds of auto top-up and the read-only Redis.
const (
	FaultProvider500   = "provider_500_after_record"
	FaultProviderHang  = "provider_hang_after_record"
	FaultProviderDrop  = "provider_drop_after_record"
	FaultProviderSlow  = "provider_slow"
	FaultRedisReadOnly = "redis_readonly"
)

func init() {
	FaultKinds = append(FaultKinds, FaultProvider500, FaultProviderHang, FaultProviderDrop, FaultProviderSlow, FaultRedisReadOnly)
}

// topUpSettleMax bounds the wait for every top-up to finish after healing.
const topUpSettleMax = 90 * time.Second

// topUpSpec is one torture account's rule.
type topUpSpec struct {
	threshold, target, amountMax, perDayMax int64
	paymentMethod                           string
}

// topUpSpecs: two accounts that top up (the first one's per-day cap binds
// after three top-ups of 500: the last is cut to what the day has left)
// and one whose card is declined (its rule is disabled after the first
// top-up).
var topUpSpecs = []topUpSpec{
	{threshold: 300, target: 800, amountMax: 500, perDayMax: 1200, paymentMethod: "pm_card_visa"},
	{threshold: 300, target: 800, amountMax: 500, perDayMax: 5000, paymentMethod: "pm_card_visa"},
	{threshold: 300, target: 800, amountMax: 500, perDayMax: 5000, paymentMethod: "pm_card_chargeDeclined"},
}

// startStripe starts the provider and returns the tallyd flags that use it.
func (r *runner) startStripe() ([]string, error) {
	srv, err := stripetest.Start("")
	if err != nil {
		return nil, err
	}
	srv.SlowDelay = 1500 * time.Millisecond
	r.stripe = srv
	return []string{"--topup-provider", "stripe", "--stripe-api-key", "sk_test_torture", "--stripe-api-url", srv.URL,
		"--stripe-timeout", "1s", "--topup-retry-backoff", "100ms", "--topup-retry-backoff-max", "1s",
		"--topup-job-timeout", "5s", "--topup-rescue-after", "8s", "--topup-attempts-max", "25"}, nil
}

// fundTopUps creates the accounts with rules, funds them (above their
// thresholds) and sets the rules. They join the USD customers the
// workload charges, and the small-balance ones it charges most.
func (r *runner) fundTopUps(ctx context.Context, p *pools) ([]AccountSpec, error) {
	cl := r.tds[0].cl
	var out []AccountSpec
	for i, ts := range topUpSpecs {
		spec := AccountSpec{Currency: "USD", Type: "CUSTOMER", Floor: "NON_NEGATIVE", Role: "topup"}
		a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "USD", ExternalRef: "torture-topup",
			Metadata: map[string]string{"role": "topup"}})
		if err != nil {
			return nil, fmt.Errorf("create top-up account: %w", err)
		}
		spec.ID = a.GetAccountId()
		r.hist.AddAccount(spec)
		p.all = append(p.all, spec)
		p.byID[spec.ID] = spec
		p.customers["USD"] = append(p.customers["USD"], spec)
		p.small["USD"] = append(p.small["USD"], spec)
		if _, err := cl.SetAutoTopUp(ctx, &tallyv1.SetAutoTopUpRequest{AccountId: spec.ID, Enabled: true,
			Threshold: ts.threshold, TargetBalance: ts.target, AmountMax: ts.amountMax, PerDayMax: ts.perDayMax,
			ProviderCustomerId: "cus_torture_" + strconv.Itoa(i), PaymentMethodId: ts.paymentMethod}); err != nil {
			return nil, fmt.Errorf("set auto top-up: %w", err)
		}
		out = append(out, spec)
	}
	return out, nil
}

// injectTopUpFault arms a provider fault for the next create requests (or
// makes Redis read-only), holds it and heals it.
func (r *runner) injectTopUpFault(stop context.Context, rng *rand.Rand, kind string) (string, error) {
	if kind == FaultRedisReadOnly {
		return r.redisReadOnly(stop, rng)
	}
	if r.stripe == nil {
		return "no provider in this run", nil
	}
	f := map[string]stripetest.Fault{FaultProvider500: stripetest.Fault500AfterRecord,
		FaultProviderHang: stripetest.FaultHangAfterRecord, FaultProviderDrop: stripetest.FaultDropAfterRecord,
		FaultProviderSlow: stripetest.FaultSlow}[kind]
	d := randDur(rng, 2*time.Second, 5*time.Second)
	r.stripe.SetFault(f)
	hold(stop, d)
	r.stripe.SetFault(stripetest.FaultNone)
	return fmt.Sprintf("every PaymentIntent create %s for %s", f, d), nil
}

// redisReadOnly turns Redis into a replica of a master that does not
// exist (reads answer, writes fail with READONLY), then back.
func (r *runner) redisReadOnly(stop context.Context, rng *rand.Rand) (string, error) {
	port, err := localsvc.FreePort()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(stop), 5*time.Second)
	defer cancel()
	if err := r.rdb.Do(ctx, "REPLICAOF", "127.0.0.1", strconv.Itoa(port)).Err(); err != nil {
		return "", fmt.Errorf("REPLICAOF: %w", err)
	}
	d := randDur(rng, time.Second, 3*time.Second)
	hold(stop, d)
	ctx2, cancel2 := context.WithTimeout(context.WithoutCancel(stop), 5*time.Second)
	defer cancel2()
	if err := r.rdb.Do(ctx2, "REPLICAOF", "NO", "ONE").Err(); err != nil {
		return "", fmt.Errorf("REPLICAOF NO ONE: %w", err)
	}
	return fmt.Sprintf("redis read-only (REPLICAOF a missing master) for %s", d), nil
}

// settleTopUps waits, after healing, until no top-up is PENDING (each one
// is looked up and finished by its retries), so the check sees final
// states.
func (r *runner) settleTopUps(ctx context.Context) {
	if r.stripe == nil {
		return
	}
	deadline := time.Now().Add(topUpSettleMax)
	for {
		var pending int
		conn, err := pgx.Connect(ctx, r.dbURL)
		if err == nil {
			err = conn.QueryRow(ctx, `SELECT count(*) FROM topups WHERE status = 1`).Scan(&pending)
			conn.Close(context.WithoutCancel(ctx))
		}
		if err == nil && pending == 0 {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			r.printf("  %d top-ups still PENDING after %s (err %v)\n", pending, topUpSettleMax, err)
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// payments returns what the provider recorded, for the checker.
func (r *runner) payments() []PaymentRow {
	if r.stripe == nil {
		return nil
	}
	var out []PaymentRow
	for _, p := range r.stripe.PaymentIntents() {
		out = append(out, PaymentRow{ID: p.ID, TopUpID: p.Metadata["tally_topup_id"], Status: p.Status, Amount: p.Amount})
	}
	return out
}
