package api_test

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// usageTotals is a hand-computed expectation of one group.
type usageTotals struct{ charged, refunded, charges, refunds int64 }

// sumRows adds up the rows of currency cur by the key f returns (rows of
// other tests' currencies are ignored: they share the database).
func sumRows(resp *tallyv1.SummarizeUsageResponse, cur string, f func(*tallyv1.UsageRow) string) map[string]usageTotals {
	out := map[string]usageTotals{}
	for _, r := range resp.GetRows() {
		if r.GetCurrency() != cur {
			continue
		}
		if r.GetNet() != r.GetCharged()-r.GetRefunded() {
			panic(fmt.Sprintf("row %v: net is not charged - refunded", r))
		}
		k := f(r)
		t := out[k]
		t.charged += r.GetCharged()
		t.refunded += r.GetRefunded()
		t.charges += r.GetCharges()
		t.refunds += r.GetRefunds()
		out[k] = t
	}
	return out
}

func wantTotals(t *testing.T, what string, got, want map[string]usageTotals) {
	t.Helper()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s:\n got %v\nwant %v", what, got, want)
	}
}

func dim(key string) func(*tallyv1.UsageRow) string {
	return func(r *tallyv1.UsageRow) string {
		v, ok := r.GetDimensions()[key]
		if !ok {
			return "<untracked>"
		}
		return v
	}
}

// Charges (plain, via a second revenue account, in a SubmitBatch, and a
// capture) and refunds through the real server; SummarizeUsage grouped by a
// metadata key and by month, by external_ref and by account matches totals
// computed by hand from the test's own calls.
func TestSummarizeUsageMatchesHandComputedTotals(t *testing.T) {
	t.Parallel()
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, UsageDimensions: []string{"product", "team"}})
	ctx := ctxT(t)
	cur := newCurrency()
	ref := "usage-" + tallytest.RandomSuffix()
	a := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.ExternalRef = ref })
	b := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.ExternalRef = ref + "-other" })
	c := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.ExternalRef = ref })
	rev2 := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.Type = tallyv1.AccountType_ACCOUNT_TYPE_REVENUE })
	for _, x := range []*tallyv1.Account{a, b, c} {
		credit(t, env, x.GetAccountId(), 100_000)
	}
	charge := func(acct string, amount int64, rev string, meta map[string]string) string {
		t.Helper()
		r, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, RevenueAccountId: rev,
			IdempotencyKey: client.NewIdempotencyKey(), Metadata: meta})
		if err != nil {
			t.Fatalf("Charge: %v", err)
		}
		return r.GetTransfer().GetTransferId()
	}
	refund := func(id string, amount int64) {
		t.Helper()
		if _, err := env.Client.Refund(ctx, &tallyv1.RefundRequest{TransferId: id, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
			t.Fatalf("Refund: %v", err)
		}
	}
	charge(a.GetAccountId(), 100, "", map[string]string{"product": "api", "team": "x"})
	apiY := charge(a.GetAccountId(), 250, "", map[string]string{"product": "api", "team": "y", "other": "ignored"})
	charge(a.GetAccountId(), 40, rev2.GetAccountId(), map[string]string{"product": "storage", "team": "x"})
	charge(a.GetAccountId(), 7, "", nil)
	refund(apiY, 50)

	batch, err := env.Client.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(),
		Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT, Operations: []*tallyv1.BatchOperation{
			{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{AccountId: b.GetAccountId(), Amount: 1000,
				IdempotencyKey: client.NewIdempotencyKey(), Metadata: map[string]string{"product": "api"}}}},
			{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{AccountId: b.GetAccountId(), Amount: 300,
				IdempotencyKey: client.NewIdempotencyKey(), Metadata: map[string]string{"product": "storage"}}}},
		}})
	if err != nil {
		t.Fatalf("SubmitBatch: %v", err)
	}
	refund(batch.GetResults()[1].GetTransfer().GetTransfer().GetTransferId(), 100)

	hold, err := env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: c.GetAccountId(), Amount: 500,
		IdempotencyKey: client.NewIdempotencyKey(), Metadata: map[string]string{"product": "storage", "team": "y"}})
	if err != nil {
		t.Fatalf("Hold: %v", err)
	}
	if _, err := env.Client.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: hold.GetHold().GetHoldId(), Amount: 200,
		IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("CaptureHold: %v", err)
	}
	// Neither a credit nor a transfer is usage.
	if _, err := env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a.GetAccountId(), CreditAccountId: b.GetAccountId(),
		Amount: 9, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("Transfer: %v", err)
	}

	// A charge of last month: charges cannot be back-dated through the API,
	// so this plants the rows its batch would have written.
	now := time.Now().UTC()
	month := now.Format("2006-01")
	lastMonthDay := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, 0, -3)
	lastMonth := lastMonthDay.Format("2006-01")
	var revDefault string
	if err := env.Store.Pool().QueryRow(ctx, `SELECT account_id FROM accounts WHERE currency = $1 AND system_role = 'revenue'`, cur).Scan(&revDefault); err != nil {
		t.Fatal(err)
	}
	if _, err := env.Store.Pool().Exec(ctx, `
		WITH s AS (SELECT set_id FROM usage_dimension_sets WHERE keys = '{product,team}'),
		d AS (INSERT INTO usage_daily (account_id, day, revenue_account_id, set_id, dim1, dim2, currency, charged, charges)
		      SELECT $1, $2, $3, set_id, 'api', 'x', $4, 1000, 1 FROM s)
		INSERT INTO usage_daily_totals (revenue_account_id, day, set_id, dim1, dim2, currency, charged, charges)
		SELECT $3, $2, set_id, 'api', 'x', $4, 1000, 1 FROM s`,
		a.GetAccountId(), lastMonthDay, revDefault, cur); err != nil {
		t.Fatalf("plant last month: %v", err)
	}

	from := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -1, 0).Format(time.DateOnly)
	to := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, 1, 0).Format(time.DateOnly)
	summarize := func(r *tallyv1.SummarizeUsageRequest) *tallyv1.SummarizeUsageResponse {
		t.Helper()
		if r.FromDay == "" {
			r.FromDay, r.ToDay = from, to
		}
		resp, err := env.Client.SummarizeUsage(ctx, r)
		if err != nil {
			t.Fatalf("SummarizeUsage(%v): %v", r, err)
		}
		return resp
	}

	// All accounts, by product and month: the Done-when.
	resp := summarize(&tallyv1.SummarizeUsageRequest{GroupBy: []string{"product", "month"}})
	if fmt.Sprint(resp.GetDimensions()) != "[product team]" {
		t.Fatalf("dimensions %v", resp.GetDimensions())
	}
	wantTotals(t, "all accounts by product and month", sumRows(resp, cur, func(r *tallyv1.UsageRow) string {
		return dim("product")(r) + "/" + r.GetPeriod()
	}), map[string]usageTotals{
		"api/" + lastMonth: {charged: 1000, charges: 1},
		"api/" + month:     {charged: 100 + 250 + 1000, refunded: 50, charges: 3, refunds: 1},
		"storage/" + month: {charged: 40 + 300 + 200, refunded: 100, charges: 3, refunds: 1},
		"/" + month:        {charged: 7, charges: 1},
	})

	// One external_ref (accounts a and c), by team.
	resp = summarize(&tallyv1.SummarizeUsageRequest{ExternalRef: ref, GroupBy: []string{"team"}})
	wantTotals(t, "external_ref by team", sumRows(resp, cur, dim("team")), map[string]usageTotals{
		"x": {charged: 1000 + 100 + 40, charges: 3},
		"y": {charged: 250 + 200, refunded: 50, charges: 2, refunds: 1},
		"":  {charged: 7, charges: 1},
	})

	// One account by revenue account, this month only.
	resp = summarize(&tallyv1.SummarizeUsageRequest{AccountId: a.GetAccountId(), GroupBy: []string{"revenue_account"},
		FromDay: time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).Format(time.DateOnly), ToDay: to})
	wantTotals(t, "account a by revenue account", sumRows(resp, cur, func(r *tallyv1.UsageRow) string { return r.GetRevenueAccountId() }),
		map[string]usageTotals{
			revDefault:          {charged: 100 + 250 + 7, refunded: 50, charges: 3, refunds: 1},
			rev2.GetAccountId(): {charged: 40, charges: 1},
		})

	// By account and day: every row a day of this range, and the same
	// grand total.
	resp = summarize(&tallyv1.SummarizeUsageRequest{GroupBy: []string{"account", "day"}})
	byAccount := sumRows(resp, cur, func(r *tallyv1.UsageRow) string {
		if _, err := time.Parse(time.DateOnly, r.GetPeriod()); err != nil {
			t.Fatalf("period %q: %v", r.GetPeriod(), err)
		}
		return r.GetAccountId()
	})
	wantTotals(t, "by account", byAccount, map[string]usageTotals{
		a.GetAccountId(): {charged: 1000 + 100 + 250 + 40 + 7, refunded: 50, charges: 5, refunds: 1},
		b.GetAccountId(): {charged: 1300, refunded: 100, charges: 2, refunds: 1},
		c.GetAccountId(): {charged: 200, charges: 1},
	})

	// A second tallyd configured with other dimensions (and another slot
	// order) writes under its own dimension set; rows written before it
	// show "sku" as untracked, and product still adds up across both.
	env2 := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, UsageDimensions: []string{"sku", "product"}})
	if _, err := env2.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 5,
		IdempotencyKey: client.NewIdempotencyKey(), Metadata: map[string]string{"product": "api", "sku": "s1", "team": "x"}}); err != nil {
		t.Fatalf("Charge via env2: %v", err)
	}
	resp = summarize(&tallyv1.SummarizeUsageRequest{AccountId: a.GetAccountId(), GroupBy: []string{"product", "sku", "team"}})
	wantTotals(t, "after a dimension change", sumRows(resp, cur, func(r *tallyv1.UsageRow) string {
		return dim("product")(r) + "/" + dim("sku")(r) + "/" + dim("team")(r)
	}), map[string]usageTotals{
		"api/<untracked>/x":     {charged: 1000 + 100, charges: 2},
		"api/<untracked>/y":     {charged: 250, refunded: 50, charges: 1, refunds: 1},
		"storage/<untracked>/x": {charged: 40, charges: 1},
		"/<untracked>/":         {charged: 7, charges: 1},
		"api/s1/<untracked>":    {charged: 5, charges: 1},
	})
	env.CheckBooks(t)
}

func TestSummarizeUsageRejectsBadQueries(t *testing.T) {
	t.Parallel()
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, UsageDimensions: []string{"product"},
		Limits: ledger.Limits{UsageRangeDaysMax: 31}})
	ctx := ctxT(t)
	for _, r := range []*tallyv1.SummarizeUsageRequest{
		{FromDay: "2026-11-01", ToDay: "2026-11-01"},
		{FromDay: "2026-11-01", ToDay: "2027-01-01"},
		{FromDay: "2026-11-01T00:00:00Z", ToDay: "2026-12-01"},
		{FromDay: "2026-11-01", ToDay: "2026-12-01", GroupBy: []string{"day", "month"}},
		{FromDay: "2026-11-01", ToDay: "2026-12-01", GroupBy: []string{"no-such-dimension"}},
		{FromDay: "2026-11-01", ToDay: "2026-12-01", GroupBy: []string{"product", "product"}},
		{FromDay: "2026-11-01", ToDay: "2026-12-01", AccountId: "not-a-uuid"},
		{FromDay: "2026-11-01", ToDay: "2026-12-01", AccountId: "0190f7b8-8f6e-7c4a-9c1e-2d3b4a5c6d7e", ExternalRef: "x"},
	} {
		_, err := env.Client.SummarizeUsage(ctx, r)
		wantErr(t, err, codes.InvalidArgument, "")
	}
}

// The benchmark's shape at test size: the rows are ordered by currency and
// then the group-by fields.
func TestSummarizeUsageOrder(t *testing.T) {
	t.Parallel()
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, UsageDimensions: []string{"product"}})
	ctx := ctxT(t)
	cur := newCurrency()
	a := createAccount(t, env, cur)
	credit(t, env, a.GetAccountId(), 1000)
	for _, p := range []string{"c", "a", "b"} {
		if _, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 1,
			IdempotencyKey: client.NewIdempotencyKey(), Metadata: map[string]string{"product": p}}); err != nil {
			t.Fatal(err)
		}
	}
	today := time.Now().UTC().Truncate(24 * time.Hour)
	resp, err := env.Client.SummarizeUsage(context.Background(), &tallyv1.SummarizeUsageRequest{AccountId: a.GetAccountId(),
		FromDay: today.AddDate(0, 0, -1).Format(time.DateOnly), ToDay: today.AddDate(0, 0, 2).Format(time.DateOnly),
		GroupBy: []string{"product"}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range resp.GetRows() {
		got = append(got, r.GetDimensions()["product"])
	}
	if !sort.StringsAreSorted(got) || len(got) != 3 {
		t.Fatalf("rows %v", got)
	}
}
