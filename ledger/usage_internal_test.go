package ledger

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// usageRollup sums a batch per row before the upsert, buckets by UTC day
// (a charge late on Oct 31 in New York is Nov 1 UTC), and counts a refund on
// its own day under its charge's dimensions and revenue account.
func TestUsageRollupSumsPerRowByUTCDay(t *testing.T) {
	cust, rev := uuid.New(), uuid.New()
	ny := time.FixedZone("NY", -4*3600)
	oct31 := time.Date(2026, 10, 31, 12, 0, 0, 0, time.UTC)
	nov1 := time.Date(2026, 10, 31, 21, 0, 0, 0, ny) // 01:00 UTC on Nov 1
	charge := store.Transfer{ID: uuid.New(), Kind: int16(KindCharge), DebitAccountID: cust, CreditAccountID: rev,
		Amount: 100, Currency: "USD", CreatedAt: oct31, Metadata: map[string]string{"product": "api", "team": "x"}}
	wk := &work{charges: map[uuid.UUID]store.Transfer{charge.ID: charge}}
	wk.w.Transfers = []store.Transfer{
		charge,
		{Kind: int16(KindCharge), DebitAccountID: cust, CreditAccountID: rev, Amount: 5, Currency: "USD", CreatedAt: oct31,
			Metadata: map[string]string{"team": "x", "product": "api"}},
		{Kind: int16(KindCharge), DebitAccountID: cust, CreditAccountID: rev, Amount: 7, Currency: "USD", CreatedAt: nov1,
			Metadata: map[string]string{"product": "api"}},
		{Kind: int16(KindRefund), DebitAccountID: rev, CreditAccountID: cust, Amount: 30, Currency: "USD", CreatedAt: nov1,
			RefundOf: charge.ID},
		{Kind: int16(KindCredit), DebitAccountID: uuid.New(), CreditAccountID: cust, Amount: 1000, Currency: "USD", CreatedAt: nov1},
	}
	wk.usageRollup([]string{"product", "team"}, 4)
	if wk.w.UsageSetID != 4 {
		t.Fatalf("set id %d", wk.w.UsageSetID)
	}
	want := []store.UsageAdd{
		{AccountID: cust, RevenueAccountID: rev, Day: "2026-10-31", Dims: [3]string{"api", "x"}, Currency: "USD", Charged: 105, Charges: 2},
		{AccountID: cust, RevenueAccountID: rev, Day: "2026-11-01", Dims: [3]string{"api"}, Currency: "USD", Charged: 7, Charges: 1},
		{AccountID: cust, RevenueAccountID: rev, Day: "2026-11-01", Dims: [3]string{"api", "x"}, Currency: "USD", Refunded: 30, Refunds: 1},
	}
	if len(wk.w.Usage) != len(want) || len(wk.w.UsageTotals) != len(want) {
		t.Fatalf("rows %+v / totals %+v", wk.w.Usage, wk.w.UsageTotals)
	}
	for i, w := range want {
		if wk.w.Usage[i] != w {
			t.Fatalf("row %d: %+v, want %+v", i, wk.w.Usage[i], w)
		}
		w.AccountID = uuid.Nil
		if wk.w.UsageTotals[i] != w {
			t.Fatalf("total %d: %+v, want %+v", i, wk.w.UsageTotals[i], w)
		}
	}
}

func TestValidateUsageDimensions(t *testing.T) {
	for _, ok := range [][]string{nil, {"product"}, {"product", "team", "sku"}} {
		if err := ValidateUsageDimensions(ok); err != nil {
			t.Errorf("%v: %v", ok, err)
		}
	}
	for _, bad := range [][]string{{"a", "b", "c", "d"}, {""}, {"a", "a"}, {"month"}, {"account"}} {
		if err := ValidateUsageDimensions(bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	if d := usageDims([]string{"k"}, map[string]string{"k": string(make([]byte, 600))}); len(d[0]) != UsageDimensionValueBytesMax {
		t.Errorf("dimension value not cut: %d bytes", len(d[0]))
	}
}
