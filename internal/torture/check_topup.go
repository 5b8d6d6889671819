package torture

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Auto top-up invariants (issue 13).
const (
	InvTopUpOnePayment     = "topup_at_most_one_payment"
	InvTopUpCreditedOnce   = "topup_payment_credited_once"
	InvTopUpOneInFlight    = "topup_one_in_flight"
	InvTopUpDayCap         = "topup_per_day_cap"
	InvTopUpCrossingDebit  = "topup_started_by_crossing_debit"
	topUpScope             = "tally:topup"
	topUpCreditKeyPrefix   = "topup:"
	topUpPending           = 1
	topUpSucceeded         = 2
	topUpFailed            = 3
	paymentStatusSucceeded = "succeeded"
)

var topUpInvariantDescriptions = []struct{ name, desc string }{
	{InvTopUpOnePayment, "the provider holds at most one succeeded PaymentIntent per top-up, and every succeeded one names a top-up Postgres recorded"},
	{InvTopUpCreditedOnce, "every succeeded payment is credited exactly once: its top-up is SUCCEEDED with that payment and exactly one CREDIT (key topup:<id>) of its amount to its account; every top-up credit belongs to such a top-up; a FAILED top-up has neither payment nor credit; none is left PENDING after healing"},
	{InvTopUpOneInFlight, "no two top-ups of one account were ever in flight at once (their [created, finished) intervals never overlap)"},
	{InvTopUpDayCap, "per account and UTC day, top-ups add up to at most the rule's per_day_max, and each is at most amount_max"},
	{InvTopUpCrossingDebit, "every top-up was started by a committed debit (a transfer from the account or a hold on it) that a client sent, after which available was below the rule's threshold"},
}

// TopUpRow is a topups row.
type TopUpRow struct {
	ID, Account, TriggerTransfer, TriggerHold, PaymentID, CreditTransfer string
	Status                                                               int16
	Amount                                                               int64
	Day                                                                  string // YYYY-MM-DD
	CreatedAt                                                            time.Time
	FinishedAt                                                           *time.Time
}

// TopUpRuleRow is a topup_rules row.
type TopUpRuleRow struct {
	Account                                        string
	Threshold, TargetBalance, AmountMax, PerDayMax int64
}

// PaymentRow is one PaymentIntent the provider (the Stripe-compatible test
// server) recorded.
type PaymentRow struct {
	ID, TopUpID, Status string
	Amount              int64
}

// loadTopUps reads the top-ups and rules into s.
func loadTopUps(ctx context.Context, q Querier, s *DBState) error {
	rows, err := q.Query(ctx, `SELECT topup_id::text, account_id::text, coalesce(trigger_transfer_id::text, ''),
		coalesce(trigger_hold_id::text, ''), provider_payment_id, coalesce(credit_transfer_id::text, ''), status, amount,
		day::text, created_at, finished_at FROM topups ORDER BY topup_id`)
	if err != nil {
		return fmt.Errorf("load topups: %w", err)
	}
	for rows.Next() {
		var x TopUpRow
		if err := rows.Scan(&x.ID, &x.Account, &x.TriggerTransfer, &x.TriggerHold, &x.PaymentID, &x.CreditTransfer,
			&x.Status, &x.Amount, &x.Day, &x.CreatedAt, &x.FinishedAt); err != nil {
			rows.Close()
			return fmt.Errorf("load topups: %w", err)
		}
		s.TopUps = append(s.TopUps, x)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load topups: %w", err)
	}
	rows, err = q.Query(ctx, `SELECT account_id::text, threshold, target_balance, amount_max, per_day_max FROM topup_rules`)
	if err != nil {
		return fmt.Errorf("load topup_rules: %w", err)
	}
	s.TopUpRules = map[string]TopUpRuleRow{}
	for rows.Next() {
		var r TopUpRuleRow
		if err := rows.Scan(&r.Account, &r.Threshold, &r.TargetBalance, &r.AmountMax, &r.PerDayMax); err != nil {
			rows.Close()
			return fmt.Errorf("load topup_rules: %w", err)
		}
		s.TopUpRules[r.Account] = r
	}
	rows.Close()
	return rows.Err()
}

// isTopUpCredit reports whether a transfer is a top-up's credit (tallyd
// posts it itself, so no client sent it).
func isTopUpCredit(t *TransferRow) bool {
	return t.Scope == topUpScope && strings.HasPrefix(t.Key, topUpCreditKeyPrefix)
}

func (c *checker) checkTopUps() {
	if len(c.db.TopUpRules) == 0 && len(c.db.TopUps) == 0 && len(c.db.Payments) == 0 {
		for _, d := range topUpInvariantDescriptions {
			c.results[d.name].Skipped = true
			c.results[d.name].Note = "no auto top-up in this run"
		}
		return
	}
	byID := make(map[string]*TopUpRow, len(c.db.TopUps))
	for i := range c.db.TopUps {
		byID[c.db.TopUps[i].ID] = &c.db.TopUps[i]
	}
	var ok, failed int
	for _, x := range c.db.TopUps {
		switch x.Status {
		case topUpSucceeded:
			ok++
		case topUpFailed:
			failed++
		}
	}
	c.results[InvTopUpCreditedOnce].Note = fmt.Sprintf("%d top-ups (%d succeeded, %d failed) on %d accounts with rules; the provider recorded %d PaymentIntents",
		len(c.db.TopUps), ok, failed, len(c.db.TopUpRules), len(c.db.Payments))
	c.checkTopUpPayments(byID)
	c.checkTopUpCredits(byID)
	c.checkTopUpInFlight()
	c.checkTopUpCaps()
	c.checkTopUpTriggers()
}

// succeededPayments groups the provider's succeeded payments by top-up.
func (c *checker) succeededPayments() map[string][]PaymentRow {
	out := map[string][]PaymentRow{}
	for _, p := range c.db.Payments {
		if p.Status == paymentStatusSucceeded {
			out[p.TopUpID] = append(out[p.TopUpID], p)
		}
	}
	return out
}

func (c *checker) checkTopUpPayments(byID map[string]*TopUpRow) {
	paid := c.succeededPayments()
	c.checked(InvTopUpOnePayment, len(c.db.Payments))
	for _, id := range sortedKeys(paid) {
		ps := paid[id]
		if len(ps) > 1 {
			c.fail(InvTopUpOnePayment, "top-up %s has %d succeeded payments (%s, %s, ...)", id, len(ps), ps[0].ID, ps[1].ID)
		}
		if byID[id] == nil {
			c.fail(InvTopUpOnePayment, "succeeded payment %s names top-up %q, which Postgres never recorded", ps[0].ID, id)
		}
	}
}

func (c *checker) checkTopUpCredits(byID map[string]*TopUpRow) {
	paid := c.succeededPayments()
	credits := map[string][]*TransferRow{}
	for i := range c.db.Transfers {
		t := &c.db.Transfers[i]
		if isTopUpCredit(t) {
			credits[strings.TrimPrefix(t.Key, topUpCreditKeyPrefix)] = append(credits[strings.TrimPrefix(t.Key, topUpCreditKeyPrefix)], t)
		}
	}
	c.checked(InvTopUpCreditedOnce, len(c.db.TopUps)+len(credits))
	for _, x := range c.db.TopUps {
		cs, ps := credits[x.ID], paid[x.ID]
		switch x.Status {
		case topUpSucceeded:
			if len(ps) == 0 || ps[0].ID != x.PaymentID {
				c.fail(InvTopUpCreditedOnce, "top-up %s is SUCCEEDED with payment %q, which the provider does not hold as succeeded", x.ID, x.PaymentID)
			}
			if len(cs) != 1 || cs[0].ID != x.CreditTransfer || cs[0].Amount != x.Amount || cs[0].Credit != x.Account || cs[0].Kind != 2 {
				c.fail(InvTopUpCreditedOnce, "top-up %s of %d to %s has %d credits (%s), want exactly one of its amount, the one it names (%s)",
					x.ID, x.Amount, x.Account, len(cs), creditList(cs), x.CreditTransfer)
			}
		case topUpFailed:
			if len(ps) > 0 || len(cs) > 0 {
				c.fail(InvTopUpCreditedOnce, "FAILED top-up %s has %d succeeded payments and %d credits", x.ID, len(ps), len(cs))
			}
		default:
			c.fail(InvTopUpCreditedOnce, "top-up %s is still PENDING after healing (%d succeeded payments, %d credits)", x.ID, len(ps), len(cs))
		}
	}
	for _, id := range sortedKeys(credits) {
		if x := byID[id]; x == nil || x.Status != topUpSucceeded {
			c.fail(InvTopUpCreditedOnce, "credit %s (key topup:%s) belongs to no SUCCEEDED top-up", credits[id][0].ID, id)
		}
	}
}

func creditList(ts []*TransferRow) string {
	s := make([]string, len(ts))
	for i, t := range ts {
		s[i] = fmt.Sprintf("%s: %d to %s", t.ID, t.Amount, t.Credit)
	}
	return strings.Join(s, "; ")
}

func (c *checker) checkTopUpInFlight() {
	byAcct := map[string][]TopUpRow{}
	for _, x := range c.db.TopUps {
		byAcct[x.Account] = append(byAcct[x.Account], x)
	}
	c.checked(InvTopUpOneInFlight, len(c.db.TopUps))
	for _, acct := range sortedKeys(byAcct) {
		xs := byAcct[acct]
		sort.Slice(xs, func(i, j int) bool { return xs[i].CreatedAt.Before(xs[j].CreatedAt) })
		for i := 1; i < len(xs); i++ {
			prev := xs[i-1]
			if prev.FinishedAt == nil || xs[i].CreatedAt.Before(*prev.FinishedAt) {
				c.fail(InvTopUpOneInFlight, "account %s: top-up %s started at %s while %s (started %s) was still in flight",
					acct, xs[i].ID, xs[i].CreatedAt.Format(time.RFC3339Nano), prev.ID, prev.CreatedAt.Format(time.RFC3339Nano))
			}
		}
	}
}

func (c *checker) checkTopUpCaps() {
	sums := map[string]int64{}
	c.checked(InvTopUpDayCap, len(c.db.TopUps))
	for _, x := range c.db.TopUps {
		r, ok := c.db.TopUpRules[x.Account]
		if !ok {
			c.fail(InvTopUpDayCap, "top-up %s of account %s, which has no rule", x.ID, x.Account)
			continue
		}
		if x.Amount <= 0 || x.Amount > r.AmountMax {
			c.fail(InvTopUpDayCap, "top-up %s of %d, outside 1..amount_max %d", x.ID, x.Amount, r.AmountMax)
		}
		k := x.Account + "/" + x.Day
		sums[k] += x.Amount
	}
	for _, k := range sortedKeys(sums) {
		acct, day, _ := strings.Cut(k, "/")
		if r := c.db.TopUpRules[acct]; sums[k] > r.PerDayMax {
			c.fail(InvTopUpDayCap, "account %s: top-ups of %s add up to %d, above per_day_max %d", acct, day, sums[k], r.PerDayMax)
		}
	}
}

func (c *checker) checkTopUpTriggers() {
	c.checked(InvTopUpCrossingDebit, len(c.db.TopUps))
	for _, x := range c.db.TopUps {
		if why := c.triggerProblem(x); why != "" {
			c.fail(InvTopUpCrossingDebit, "top-up %s of account %s: %s", x.ID, x.Account, why)
		}
	}
}

// triggerProblem says why top-up x was not started by a committed crossing
// debit ("" when it was). The available amount after the trigger is bounded
// below with every hold that may have been open then, so a real crossing is
// never refused.
func (c *checker) triggerProblem(x TopUpRow) string {
	r, ok := c.db.TopUpRules[x.Account]
	if !ok {
		return "no rule"
	}
	acct := c.db.Accounts[x.Account]
	if acct == nil {
		return "no such account"
	}
	var at time.Time
	var balance int64
	switch {
	case x.TriggerTransfer != "":
		t := c.transfersByID[x.TriggerTransfer]
		if t == nil {
			return fmt.Sprintf("trigger transfer %s is not in Postgres", x.TriggerTransfer)
		}
		if t.Debit != x.Account {
			return fmt.Sprintf("trigger transfer %s debits %s, not the account", t.ID, t.Debit)
		}
		if _, sent := c.opsByKey[t.Key]; !sent {
			return fmt.Sprintf("trigger transfer %s (key %s) was sent by no client", t.ID, t.Key)
		}
		e, ok := c.entryOf(t.ID, x.Account)
		if !ok {
			return fmt.Sprintf("trigger transfer %s has no entry on the account", t.ID)
		}
		at, balance = e.CreatedAt, e.BalanceAfter
	case x.TriggerHold != "":
		h := c.holdsByID[x.TriggerHold]
		if h == nil {
			return fmt.Sprintf("trigger hold %s is not in Postgres", x.TriggerHold)
		}
		if h.Account != x.Account {
			return fmt.Sprintf("trigger hold %s is on %s, not the account", h.ID, h.Account)
		}
		if _, sent := c.opsByKey[h.Key]; !sent {
			return fmt.Sprintf("trigger hold %s (key %s) was sent by no client", h.ID, h.Key)
		}
		at, balance = h.CreatedAt, c.lowestBalanceAt(x.Account, h.CreatedAt)
	default:
		return "it names no trigger"
	}
	// available = balance - held + credit_limit; the credit limit may
	// have changed (the lifecycle client updates it), so it is bounded
	// below by 0.
	if low := balance - c.heldAtMost(x.Account, at); low >= r.Threshold {
		return fmt.Sprintf("after its trigger available was at least %d, not below the threshold %d", low, r.Threshold)
	}
	return ""
}

func (c *checker) entryOf(transfer, acct string) (EntryRow, bool) {
	for _, e := range c.entriesByXfer[transfer] {
		if e.Account == acct {
			return e, true
		}
	}
	return EntryRow{}, false
}

// lowestBalanceAt is the lowest balance the account may have had at t: the
// last balance before t, or any balance_after at t (one batch).
func (c *checker) lowestBalanceAt(acct string, t time.Time) int64 {
	var last int64
	low := int64(1) << 62
	for _, e := range c.db.Entries[acct] {
		switch {
		case e.CreatedAt.Before(t):
			last = e.BalanceAfter
		case e.CreatedAt.Equal(t):
			low = min(low, e.BalanceAfter)
		}
	}
	return min(low, last)
}

// heldAtMost sums the holds of acct that may have been open at t.
func (c *checker) heldAtMost(acct string, t time.Time) int64 {
	var n int64
	for _, h := range c.db.Holds {
		if h.Account == acct && !h.CreatedAt.After(t) && (h.FinalizedAt == nil || !h.FinalizedAt.Before(t)) {
			n += h.Amount
		}
	}
	return n
}
