package torture

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Lifecycle actions and the answers the workload expects of them.
const (
	ActionFreeze   = "freeze"
	ActionUnfreeze = "unfreeze"
	ActionUpdate   = "update"
	ActionClose    = "close"

	reasonNotActive       = "ACCOUNT_NOT_ACTIVE"
	reasonClosed          = "ACCOUNT_CLOSED"
	reasonCreditLimitUsed = "CREDIT_LIMIT_IN_USE"
	reasonNotEmpty        = "ACCOUNT_NOT_EMPTY"
)

// Bounds of the lifecycle client.
const (
	// lifecycleGapMin/Max space its calls.
	lifecycleGapMin = 150 * time.Millisecond
	lifecycleGapMax = 700 * time.Millisecond
	// frozenMin/Max bound how long a customer stays frozen.
	frozenMin = 80 * time.Millisecond
	frozenMax = 400 * time.Millisecond
)

// lifecycleCall sends one lifecycle request to a definite answer (the same
// request on every round, through every tallyd in turn, like an op: it has
// no key, and resending it is safe) and records it.
func (r *runner) lifecycleCall(ctx context.Context, rng *rand.Rand, action, account string, expect []string,
	fn func(ctx context.Context, c *client.Client) (*tallyv1.Account, error)) LifecycleCall {
	var status string
	ex := r.execute(ctx, rng, fmt.Sprintf("%s account %s", action, account), false,
		func(ctx context.Context, c *client.Client) (*opResult, error) {
			a, err := fn(ctx, c)
			if err != nil {
				return nil, err
			}
			status = a.GetStatus().String()
			return &opResult{version: a.GetVersion()}, nil
		})
	lc := LifecycleCall{Action: action, Account: account, Start: ex.start, End: ex.end, Attempts: ex.attempts, Expect: expect}
	if f := ex.final; f != nil {
		lc.Definite, lc.Code, lc.Reason = true, f.code, f.reason
		if f.outcome == OutcomeAcked {
			lc.Status = status
		}
	} else {
		lc.Code, lc.Reason = ex.last.code, ex.last.reason
	}
	r.hist.AddLifecycle(lc)
	return lc
}

func (r *runner) freeze(ctx context.Context, rng *rand.Rand, id string, expect ...string) LifecycleCall {
	return r.lifecycleCall(ctx, rng, ActionFreeze, id, expect, func(ctx context.Context, c *client.Client) (*tallyv1.Account, error) {
		return c.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: id})
	})
}

func (r *runner) unfreeze(ctx context.Context, rng *rand.Rand, id string) LifecycleCall {
	return r.lifecycleCall(ctx, rng, ActionUnfreeze, id, []string{"OK"}, func(ctx context.Context, c *client.Client) (*tallyv1.Account, error) {
		return c.UnfreezeAccount(ctx, &tallyv1.UnfreezeAccountRequest{AccountId: id})
	})
}

func (r *runner) update(ctx context.Context, rng *rand.Rand, req *tallyv1.UpdateAccountRequest, expect ...string) LifecycleCall {
	return r.lifecycleCall(ctx, rng, ActionUpdate, req.GetAccountId(), expect, func(ctx context.Context, c *client.Client) (*tallyv1.Account, error) {
		return c.UpdateAccount(ctx, req)
	})
}

func (r *runner) closeAccount(ctx context.Context, rng *rand.Rand, id string, expect ...string) LifecycleCall {
	return r.lifecycleCall(ctx, rng, ActionClose, id, expect, func(ctx context.Context, c *client.Client) (*tallyv1.Account, error) {
		return c.CloseAccount(ctx, &tallyv1.CloseAccountRequest{AccountId: id})
	})
}

// lifecycle is one more client, which changes accounts while the others
// move money: it freezes customers for a moment (their debits and holds are
// refused ACCOUNT_NOT_ACTIVE meanwhile) and always unfreezes them again,
// raises and lowers credit limits (lowering below what is in use is refused
// CREDIT_LIMIT_IN_USE), sets and clears low-balance thresholds, and closes
// the dedicated accounts no other client uses, then checks a closed account
// refuses everything. Every call is retried as is (none has a key).
func (r *runner) lifecycle(stop, hard context.Context) {
	rng := rand.New(rand.NewPCG(uint64(r.cfg.Seed), 0x6c6966656379636c))
	p := r.pools
	hold(stop, randDur(rng, lifecycleGapMin, lifecycleGapMax))
	if stop.Err() == nil {
		r.closeDedicated(hard, rng)
	}
	for stop.Err() == nil {
		hold(stop, randDur(rng, lifecycleGapMin, lifecycleGapMax))
		if stop.Err() != nil {
			return
		}
		cur := p.currencies[rng.IntN(len(p.currencies))]
		switch x := rng.Float64(); {
		case x < 0.45: // a short freeze
			a := p.customers[cur][rng.IntN(len(p.customers[cur]))]
			if rng.IntN(2) == 0 {
				a = p.hot[cur][rng.IntN(len(p.hot[cur]))]
			}
			f := r.freeze(hard, rng, a.ID, "OK")
			if f.Code == "OK" && rng.Float64() < 0.2 {
				r.freeze(hard, rng, a.ID, "OK") // freezing a frozen account changes nothing
			}
			time.Sleep(randDur(rng, frozenMin, frozenMax))
			// Unfreeze whatever the freeze's answer was (it may have been
			// applied without the answer arriving), until it is done.
			for hard.Err() == nil {
				if u := r.unfreeze(hard, rng, a.ID); u.Code == "OK" {
					break
				}
			}
		case x < 0.85: // credit limit up or down
			a := p.small[cur][rng.IntN(len(p.small[cur]))]
			// Half raise it, half try to lower it to (nearly) nothing:
			// refused CREDIT_LIMIT_IN_USE while the account is below.
			limit := []int64{50, 100, 200}[rng.IntN(3)]
			if rng.IntN(2) == 0 {
				limit = []int64{0, 10}[rng.IntN(2)]
			}
			r.update(hard, rng, &tallyv1.UpdateAccountRequest{AccountId: a.ID, CreditLimit: &limit}, "OK", reasonCreditLimitUsed)
		default: // low-balance threshold
			a := p.customers[cur][rng.IntN(len(p.customers[cur]))]
			req := &tallyv1.UpdateAccountRequest{AccountId: a.ID}
			if rng.IntN(3) == 0 {
				req.ClearLowBalanceThreshold = true
			} else {
				t := rng.Int64N(500)
				if a.Role == "hot" {
					t = 999_000_000 + rng.Int64N(2_000_000)
				}
				req.LowBalanceThreshold = &t
			}
			r.update(hard, rng, req, "OK")
		}
	}
}

// closeDedicated closes the accounts made for it: one empty from the start;
// one that is first credited (closing it is refused ACCOUNT_NOT_EMPTY),
// then emptied by a charge and closed. A closed account then refuses a
// charge, a credit and a hold (ACCOUNT_NOT_ACTIVE or ACCOUNT_CLOSED), a
// freeze and an update (ACCOUNT_CLOSED); closing it again succeeds.
func (r *runner) closeDedicated(ctx context.Context, rng *rand.Rand) {
	for i, a := range r.pools.closable {
		if i%2 == 1 {
			cr := &Op{Client: -2, Key: client.NewIdempotencyKey(), Kind: KindCredit, Account: a.ID, Amount: 10}
			r.execOp(ctx, rng, cr, false, singleCall(&tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Credit{Credit: &tallyv1.CreditRequest{
				AccountId: a.ID, Amount: 10, IdempotencyKey: cr.Key, Description: "torture: fill before close"}}}))
			if cr.Outcome != OutcomeAcked {
				continue
			}
			r.closeAccount(ctx, rng, a.ID, reasonNotEmpty)
			ch := &Op{Client: -2, Key: client.NewIdempotencyKey(), Kind: KindCharge, Account: a.ID, Amount: 10}
			r.execOp(ctx, rng, ch, false, singleCall(&tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{
				AccountId: a.ID, Amount: 10, IdempotencyKey: ch.Key, Description: "torture: empty before close"}}}))
			if ch.Outcome != OutcomeAcked {
				continue
			}
		}
		if c := r.closeAccount(ctx, rng, a.ID, "OK"); c.Code != "OK" {
			continue
		}
		// Probes: every one must be refused.
		refused := []string{reasonNotActive, reasonClosed}
		for _, bo := range []*tallyv1.BatchOperation{
			{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{AccountId: a.ID, Amount: 1, Description: "torture: probe"}}},
			{Op: &tallyv1.BatchOperation_Credit{Credit: &tallyv1.CreditRequest{AccountId: a.ID, Amount: 1, Description: "torture: probe"}}},
			{Op: &tallyv1.BatchOperation_Hold{Hold: &tallyv1.HoldRequest{AccountId: a.ID, Amount: 1, ExpiresInSeconds: 60, Description: "torture: probe"}}},
		} {
			o := &Op{Client: -2, Key: client.NewIdempotencyKey(), Account: a.ID, Amount: 1}
			switch x := bo.GetOp().(type) {
			case *tallyv1.BatchOperation_Charge:
				o.Kind, x.Charge.IdempotencyKey = KindCharge, o.Key
			case *tallyv1.BatchOperation_Credit:
				o.Kind, x.Credit.IdempotencyKey = KindCredit, o.Key
			case *tallyv1.BatchOperation_Hold:
				o.Kind, o.ExpiresIn, x.Hold.IdempotencyKey = KindHold, 60, o.Key
			}
			r.execOp(ctx, rng, o, false, singleCall(bo))
			r.hist.AddLifecycle(LifecycleCall{Action: "probe " + string(o.Kind), Account: a.ID, Start: o.Start, End: o.End,
				Attempts: o.Attempts, Definite: o.Outcome != OutcomeUnknown, Code: o.FinalCode, Reason: o.FinalReason, Expect: refused})
		}
		r.freeze(ctx, rng, a.ID, reasonClosed)
		limit := int64(5)
		r.update(ctx, rng, &tallyv1.UpdateAccountRequest{AccountId: a.ID, CreditLimit: &limit}, reasonClosed)
		r.closeAccount(ctx, rng, a.ID, "OK")
	}
}
