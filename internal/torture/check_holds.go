package torture

import (
	"fmt"
	"sort"
)

// The invariants of holds, refunds and batches (issue 6).

func (c *checker) checkHeld() {
	open := map[string]int64{}
	for _, h := range c.db.Holds {
		if h.Status == HoldOpen {
			open[h.Account] += h.Amount
		}
		if a, ok := c.db.Accounts[h.Account]; !ok {
			c.fail(InvHeldMatchesHolds, "hold %s is on account %s which does not exist", h.ID, h.Account)
		} else if a.Currency != h.Currency {
			c.fail(InvHeldMatchesHolds, "hold %s is in %s on account %s in %s", h.ID, h.Currency, a.ID, a.Currency)
		}
	}
	c.checked(InvHeldMatchesHolds, len(c.db.Accounts))
	held, accounts := int64(0), 0
	for _, id := range sortedKeys(c.db.Accounts) {
		a := c.db.Accounts[id]
		switch {
		case a.Held < 0:
			c.fail(InvHeldMatchesHolds, "account %s has held %d", id, a.Held)
		case a.Held != open[id]:
			c.fail(InvHeldMatchesHolds, "account %s has held %d but its holds stored as open sum to %d", id, a.Held, open[id])
		case a.Held > 0 && a.Floor != 1:
			c.fail(InvHeldMatchesHolds, "account %s without a floor holds %d", id, a.Held)
		}
		if a.Held > 0 {
			held += a.Held
			accounts++
		}
	}
	c.results[InvHeldMatchesHolds].Note = fmt.Sprintf("%d held at the end on %d accounts", held, accounts)
}

func (c *checker) checkHolds() {
	byStatus := map[int16]int{}
	c.checked(InvHoldsOneFinalAction, len(c.db.Holds))
	for i := range c.db.Holds {
		h := &c.db.Holds[i]
		byStatus[h.Status]++
		if h.Status < HoldOpen || h.Status > HoldExpired {
			c.fail(InvHoldsOneFinalAction, "hold %s has status %d", h.ID, h.Status)
		}
		if h.Amount <= 0 || h.CapturedAmount < 0 || h.CapturedAmount > h.Amount {
			c.fail(InvHoldsOneFinalAction, "hold %s of %d has captured_amount %d", h.ID, h.Amount, h.CapturedAmount)
		}
		caps := c.capturesByHold[h.ID]
		if h.Status != HoldCaptured {
			if len(caps) > 0 || h.CapturedAmount != 0 || h.CaptureTransferID != "" {
				c.fail(InvHoldsOneFinalAction, "hold %s has status %d but %d capture transfers, captured_amount %d, capture_transfer_id %q",
					h.ID, h.Status, len(caps), h.CapturedAmount, h.CaptureTransferID)
			}
			continue
		}
		if len(caps) != 1 {
			c.fail(InvHoldsOneFinalAction, "captured hold %s has %d capture transfers", h.ID, len(caps))
			continue
		}
		t := caps[0]
		revenue := h.Revenue
		if revenue == "" {
			revenue = c.sysAccounts[h.Currency+"/revenue"]
		}
		if t.ID != h.CaptureTransferID || t.Kind != KindCharge.transferKind() || t.Amount != h.CapturedAmount || t.Amount <= 0 ||
			t.Debit != h.Account || c.logical(t.Credit) != revenue {
			c.fail(InvHoldsOneFinalAction, "captured hold %s (%d of %d from %s to %s, by %s) has capture transfer %s: kind %d, %d from %s to %s",
				h.ID, h.CapturedAmount, h.Amount, h.Account, revenue, h.CaptureTransferID, t.ID, t.Kind, t.Amount, t.Debit, t.Credit)
		}
	}
	for hold, ts := range c.capturesByHold {
		if _, ok := c.holdsByID[hold]; !ok {
			c.fail(InvHoldsOneFinalAction, "transfer %s captures hold %s which does not exist", ts[0].ID, hold)
		}
	}
	// From the history: one hold, at most one acknowledged final action.
	finals := map[string][]*Op{}
	for _, o := range c.h.Ops {
		if o.Outcome == OutcomeAcked && (o.Kind == KindCapture || o.Kind == KindRelease) {
			finals[o.HoldID] = append(finals[o.HoldID], o)
		}
	}
	multi := 0
	for _, hold := range sortedKeys(finals) {
		os := finals[hold]
		c.checked(InvHoldsOneFinalAction, 1)
		for _, o := range os[1:] {
			if o.Key != os[0].Key {
				multi++
				c.fail(InvHoldsOneFinalAction, "hold %s: two final actions acknowledged: %s key %s and %s key %s",
					hold, os[0].Kind, os[0].Key, o.Kind, o.Key)
				break
			}
		}
	}
	c.results[InvHoldsOneFinalAction].Note = fmt.Sprintf("holds: %d open, %d captured, %d released, %d expired",
		byStatus[HoldOpen], byStatus[HoldCaptured], byStatus[HoldReleased], byStatus[HoldExpired])
}

func (c *checker) checkRefunds() {
	refunds := 0
	for _, t := range c.db.Transfers {
		if t.Kind == KindRefund.transferKind() || t.RefundOf != "" {
			refunds++
		}
	}
	c.checked(InvRefundsWithinCharge, refunds+len(c.db.ChargeRefunds))
	sums := map[string]int64{}
	for i := range c.db.Transfers {
		t := &c.db.Transfers[i]
		isRefund := t.Kind == KindRefund.transferKind()
		if isRefund != (t.RefundOf != "") {
			c.fail(InvRefundsWithinCharge, "transfer %s has kind %d and refund_of %q", t.ID, t.Kind, t.RefundOf)
			continue
		}
		if !isRefund {
			continue
		}
		ch, ok := c.transfersByID[t.RefundOf]
		switch {
		case !ok:
			c.fail(InvRefundsWithinCharge, "refund %s reverses transfer %s which does not exist", t.ID, t.RefundOf)
			continue
		case ch.Kind != KindCharge.transferKind():
			c.fail(InvRefundsWithinCharge, "refund %s reverses transfer %s of kind %d, not a CHARGE", t.ID, ch.ID, ch.Kind)
		case t.Debit != ch.Credit || t.Credit != ch.Debit || t.Currency != ch.Currency:
			c.fail(InvRefundsWithinCharge, "refund %s moves %s %s->%s, but charge %s went %s %s->%s",
				t.ID, t.Currency, t.Debit, t.Credit, ch.ID, ch.Currency, ch.Debit, ch.Credit)
		}
		sums[t.RefundOf] += t.Amount
	}
	charges := map[string]bool{}
	for id := range sums {
		charges[id] = true
	}
	for id := range c.chargeRefunds {
		charges[id] = true
	}
	refunded := int64(0)
	for _, id := range sortedKeys(charges) {
		sum := sums[id]
		refunded += sum
		cr, ok := c.chargeRefunds[id]
		ch, chOK := c.transfersByID[id]
		switch {
		case !ok:
			c.fail(InvRefundsWithinCharge, "charge %s has %d refunded but no charge_refunds row", id, sum)
		case cr.Refunded != sum:
			c.fail(InvRefundsWithinCharge, "charge %s: charge_refunds says %d refunded, its refunds sum to %d", id, cr.Refunded, sum)
		case chOK && cr.Amount != ch.Amount:
			c.fail(InvRefundsWithinCharge, "charge %s of %d: charge_refunds says it was of %d", id, ch.Amount, cr.Amount)
		}
		if !chOK {
			c.fail(InvRefundsWithinCharge, "charge_refunds row for transfer %s which does not exist", id)
		} else if sum > ch.Amount {
			c.fail(InvRefundsWithinCharge, "charge %s of %d was refunded %d", id, ch.Amount, sum)
		}
	}
	c.results[InvRefundsWithinCharge].Note = fmt.Sprintf("%d refunds of %d charges, %d refunded in all", refunds, len(charges), refunded)
}

func (c *checker) checkBatches() {
	c.checked(InvBatchesAllOrNothing, len(c.db.Batches)+len(c.h.Batches))
	itemsOf := func(b *Batch) []*Op {
		out := make([]*Op, 0, len(b.ItemKeys))
		for _, k := range b.ItemKeys {
			if o, ok := c.opsByKey[k]; ok {
				out = append(out, o)
			}
		}
		return out
	}
	keys := make([]string, 0, len(c.dbBatchesByKey))
	for k := range c.dbBatchesByKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		rows := c.dbBatchesByKey[key]
		if len(rows) > 1 {
			c.fail(InvBatchesAllOrNothing, "batch key %s has %d rows", key, len(rows))
		}
		row := rows[0]
		b, ok := c.batchesByKey[key]
		if !ok {
			c.fail(InvBatchesAllOrNothing, "batch %s was never sent", key)
			continue
		}
		if row.Mode != modeNumber(b.Mode) {
			c.fail(InvBatchesAllOrNothing, "batch %s sent %s is stored with mode %d", key, b.Mode, row.Mode)
		}
		if b.Mode == BatchIndependent && !row.Applied {
			c.fail(InvBatchesAllOrNothing, "INDEPENDENT batch %s is stored as not applied", key)
		}
		var present, absent []string
		for _, o := range itemsOf(b) {
			switch {
			case row.Applied && b.Mode == BatchAtomic && c.keyApplied(o.Key):
				present = append(present, o.Key)
			case row.Applied && b.Mode == BatchIndependent && len(c.keysByKey[o.Key]) > 0:
				present = append(present, o.Key)
			case row.Applied && o.Outcome == OutcomeUnexpected:
				// An item answered NOT_FOUND or the like records nothing.
			case row.Applied:
				absent = append(absent, o.Key)
			case c.keyLeftAnything(o.Key):
				present = append(present, o.Key)
			}
		}
		switch {
		case row.Applied && len(absent) > 0:
			c.fail(InvBatchesAllOrNothing, "%s batch %s is stored as applied but %d of its %d items left no key (e.g. %s)",
				b.Mode, key, len(absent), len(b.ItemKeys), absent[0])
		case !row.Applied && len(present) > 0:
			c.fail(InvBatchesAllOrNothing, "%s batch %s is stored as not applied but %d of its %d items are in Postgres (e.g. %s)",
				b.Mode, key, len(present), len(b.ItemKeys), present[0])
		}
	}
	applied, notApplied, unknown := 0, 0, 0
	for _, b := range c.h.Batches {
		rows := c.dbBatchesByKey[b.Key]
		if b.Outcome == OutcomeAcked {
			if b.Applied {
				applied++
			} else {
				notApplied++
			}
			switch {
			case len(rows) == 0:
				c.fail(InvBatchesAllOrNothing, "%s batch %s was answered (applied=%t) but is not stored", b.Mode, b.Key, b.Applied)
			case rows[0].Applied != b.Applied:
				c.fail(InvBatchesAllOrNothing, "%s batch %s was answered applied=%t but is stored as applied=%t", b.Mode, b.Key, b.Applied, rows[0].Applied)
			}
			if len(b.ItemKeys) != len(itemsOf(b)) {
				c.fail(InvBatchesAllOrNothing, "batch %s: %d item keys but %d item ops recorded", b.Key, len(b.ItemKeys), len(itemsOf(b)))
			}
			continue
		}
		unknown++
		if len(rows) > 0 {
			continue // checked above
		}
		// The batch row commits with the items: no row, no items.
		for _, o := range itemsOf(b) {
			if c.keyLeftAnything(o.Key) {
				c.fail(InvBatchesAllOrNothing, "%s batch %s (no definite answer) is not stored, but its item %s key %s is", b.Mode, b.Key, o.Kind, o.Key)
				break
			}
		}
	}
	c.results[InvBatchesAllOrNothing].Note = fmt.Sprintf("%d batches sent: %d applied, %d not applied (ATOMIC), %d without a definite answer; %d stored",
		len(c.h.Batches), applied, notApplied, unknown, len(c.db.Batches))
}
