package torture

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/tallyledger/tally/internal/stripetest"
	"github.com/tallyledger/tally/ledger"
	"github.com/tallyledger/tally/store"
	"github.com/tallyledger/tally/topup"
)

// topUpFixture is a scratch database with real top-ups: account a topped
// up twice (paid and credited through the real workers and the
// Stripe-compatible test server), account b declined once.
type topUpFixture struct {
	conn     *pgx.Conn
	hist     *History
	payments []PaymentRow
	// first and second are a's top-ups; declined is b's.
	first, second, declined string
	openingCredit           string // a's opening CREDIT transfer
}

func newTopUpFixture(t *testing.T) *topUpFixture {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	dbURL := scratchDB(t, ctx)
	st, err := store.Open(ctx, store.Config{URL: dbURL})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	srv, err := stripetest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	l := ledger.New(ledger.Config{Store: st, TopUp: ledger.TopUpConfig{Provider: "stripe"}})
	defer l.Close()
	svc, err := topup.Start(ctx, topup.Config{Ledger: l, Store: st, RetryBackoff: 50 * time.Millisecond,
		Provider: topup.NewStripe(topup.StripeConfig{APIKey: "sk_test_checker", URL: srv.URL, Timeout: time.Second}),
		Logger:   slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = svc.Stop(context.Background()) }()

	f := &topUpFixture{hist: NewHistory()}
	op := func(kind OpKind, acct string, amount int64) *Op {
		o := &Op{Kind: kind, Key: uuid.Must(uuid.NewV7()).String(), Account: acct, Amount: amount, Start: time.Now(), Attempts: 1, Tallyds: 1}
		r := ledger.MoveRequest{AccountID: uuid.MustParse(acct), Amount: amount, IdempotencyKey: o.Key}
		var res ledger.TransferResult
		if kind == KindCredit {
			res, err = l.Credit(ctx, r)
		} else {
			res, err = l.Charge(ctx, r)
		}
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		o.End, o.Outcome, o.FinalCode, o.TransferID = time.Now(), OutcomeAcked, "OK", res.Transfer.ID.String()
		o.BalanceVersion, o.BalanceAfter = res.Balance.Version, res.Balance.Balance
		f.hist.AddOp(o)
		return o
	}
	account := func(pm string) string {
		a, err := l.CreateAccount(ctx, ledger.CreateAccountRequest{Currency: "USD"})
		if err != nil {
			t.Fatal(err)
		}
		f.hist.AddAccount(AccountSpec{ID: a.ID.String(), Currency: "USD", Type: "CUSTOMER", Floor: "NON_NEGATIVE", Role: "topup"})
		if _, err := l.SetAutoTopUp(ctx, ledger.SetAutoTopUpRequest{Rule: ledger.AutoTopUp{AccountID: a.ID, Enabled: true,
			Threshold: 300, TargetBalance: 800, AmountMax: 500, PerDayMax: 5000, ProviderCustomerID: "cus_fixture",
			PaymentMethodID: pm}}); err != nil {
			t.Fatal(err)
		}
		return a.ID.String()
	}
	settle := func(acct string, n int) []ledger.TopUp {
		deadline := time.Now().Add(60 * time.Second)
		for {
			xs, _, err := l.ListTopUps(ctx, uuid.MustParse(acct), 10, "")
			if err != nil {
				t.Fatal(err)
			}
			if len(xs) == n && xs[0].Status != ledger.TopUpPending {
				return xs
			}
			if time.Now().After(deadline) {
				t.Fatalf("top-ups of %s did not settle: %+v", acct, xs)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	a := account("pm_card_visa")
	f.openingCredit = op(KindCredit, a, 600).TransferID
	op(KindCharge, a, 400) // 200 < 300: a top-up of 600, capped at 500
	f.first = settle(a, 1)[0].ID.String()
	op(KindCharge, a, 600) // 100 < 300: another of 500
	f.second = settle(a, 2)[0].ID.String()
	b := account("pm_card_chargeDeclined")
	op(KindCredit, b, 600)
	op(KindCharge, b, 400)
	f.declined = settle(b, 1)[0].ID.String()
	for _, p := range srv.PaymentIntents() {
		f.payments = append(f.payments, PaymentRow{ID: p.ID, TopUpID: p.Metadata["tally_topup_id"], Status: p.Status, Amount: p.Amount})
	}
	if f.conn, err = pgx.Connect(context.Background(), dbURL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.conn.Close(context.Background()) })
	return f
}

// check damages a copy of the fixture and returns the top-up invariants'
// results.
func (f *topUpFixture) check(t *testing.T, sql []string, editPayments func([]PaymentRow) []PaymentRow) map[string]InvariantResult {
	t.Helper()
	ctx := context.Background()
	tx, err := f.conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // the damage is thrown away
	if _, err := tx.Exec(ctx, "SET LOCAL session_replication_role = replica"); err != nil {
		t.Fatal(err)
	}
	for _, s := range sql {
		if _, err := tx.Exec(ctx, s); err != nil {
			t.Fatalf("damage %q: %v", s, err)
		}
	}
	db, err := LoadDBState(ctx, tx)
	if err != nil {
		t.Fatal(err)
	}
	db.Payments = slices.Clone(f.payments)
	if editPayments != nil {
		db.Payments = editPayments(db.Payments)
	}
	out := map[string]InvariantResult{}
	for _, r := range Check(cloneHistory(f.hist), db, nil, checkOpts) {
		out[r.Name] = r
	}
	return out
}

var topUpInvariants = []string{InvTopUpOnePayment, InvTopUpCreditedOnce, InvTopUpOneInFlight, InvTopUpDayCap, InvTopUpCrossingDebit}

// Each top-up invariant passes on real top-ups and fails on a history
// damaged in the way it guards against.
func TestCheckerTopUps(t *testing.T) {
	f := newTopUpFixture(t)
	clean := f.check(t, nil, nil)
	for _, name := range topUpInvariants {
		if r := clean[name]; !r.Pass || r.Checked == 0 {
			t.Fatalf("clean top-ups: %s pass %v checked %d: %v", name, r.Pass, r.Checked, r.Examples)
		}
	}
	// The invariants that top-up credits (sent by no client) could trip.
	for _, name := range []string{InvNoUnsentTransfers, InvBalanceMatchesHistory, InvKeysAtMostOnce, InvVersionsConsistent} {
		if r := clean[name]; !r.Pass {
			t.Fatalf("clean top-ups fail %s: %v", name, r.Examples)
		}
	}
	secondPayment := func(ps []PaymentRow) []PaymentRow {
		return append(ps, PaymentRow{ID: "pi_second", TopUpID: f.first, Status: "succeeded", Amount: 500})
	}
	cases := []struct {
		name     string
		sql      []string
		payments func([]PaymentRow) []PaymentRow
		want     string
	}{
		{name: "a second succeeded payment for one top-up", payments: secondPayment, want: InvTopUpOnePayment},
		{name: "a succeeded payment for a top-up never recorded", want: InvTopUpOnePayment,
			payments: func(ps []PaymentRow) []PaymentRow {
				return append(ps, PaymentRow{ID: "pi_orphan", TopUpID: uuid.Must(uuid.NewV7()).String(), Status: "succeeded", Amount: 5})
			}},
		{name: "a paid top-up's credit lost", want: InvTopUpCreditedOnce, sql: []string{
			fmt.Sprintf(`DELETE FROM entries WHERE transfer_id = (SELECT credit_transfer_id FROM topups WHERE topup_id = '%s')`, f.first),
			fmt.Sprintf(`DELETE FROM transfers WHERE idempotency_key = 'topup:%s'`, f.first)}},
		{name: "a paid top-up credited twice", want: InvTopUpCreditedOnce, sql: []string{
			"ALTER TABLE transfers DROP CONSTRAINT transfers_scope_key_unique",
			fmt.Sprintf(`INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
				amount, currency, description, metadata, created_at, debit_account_type, credit_account_type)
				SELECT gen_random_uuid(), scope, idempotency_key, kind, debit_account_id, credit_account_id, amount, currency,
				description, metadata, created_at, debit_account_type, credit_account_type FROM transfers WHERE idempotency_key = 'topup:%s'`, f.first)}},
		{name: "a declined top-up credited anyway", want: InvTopUpCreditedOnce, sql: []string{
			fmt.Sprintf(`INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
				amount, currency, description, metadata, created_at, debit_account_type, credit_account_type)
				SELECT gen_random_uuid(), scope, 'topup:%s', kind, debit_account_id, credit_account_id, amount, currency,
				description, metadata, created_at, debit_account_type, credit_account_type FROM transfers WHERE idempotency_key = 'topup:%s'`, f.declined, f.first)}},
		{name: "a payment the provider took but no top-up credited", want: InvTopUpCreditedOnce,
			sql: []string{fmt.Sprintf(`UPDATE topups SET status = 1, finished_at = NULL WHERE topup_id = '%s'`, f.second)}},
		{name: "two top-ups of one account in flight at once", want: InvTopUpOneInFlight,
			sql: []string{fmt.Sprintf(`UPDATE topups SET created_at = (SELECT created_at FROM topups WHERE topup_id = '%s')
				WHERE topup_id = '%s'`, f.first, f.second)}},
		{name: "the day's top-ups above per_day_max", want: InvTopUpDayCap,
			sql: []string{`UPDATE topup_rules SET per_day_max = 600`}},
		{name: "a top-up above amount_max", want: InvTopUpDayCap,
			sql: []string{fmt.Sprintf(`UPDATE topups SET amount = 501 WHERE topup_id = '%s'`, f.first)}},
		{name: "a top-up started by a credit", want: InvTopUpCrossingDebit,
			sql: []string{fmt.Sprintf(`UPDATE topups SET trigger_transfer_id = '%s' WHERE topup_id = '%s'`, f.openingCredit, f.first)}},
		{name: "a top-up started with available above the threshold", want: InvTopUpCrossingDebit,
			sql: []string{`UPDATE topup_rules SET threshold = 50`}},
		{name: "a top-up started by nothing", want: InvTopUpCrossingDebit,
			sql: []string{"ALTER TABLE topups DROP CONSTRAINT topups_has_trigger",
				fmt.Sprintf(`UPDATE topups SET trigger_transfer_id = NULL WHERE topup_id = '%s'`, f.first)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := f.check(t, c.sql, c.payments)
			if r := got[c.want]; r.Pass {
				t.Fatalf("%s passed on a damaged history", c.want)
			} else {
				t.Logf("%s: %v", c.want, r.Examples)
			}
		})
	}
}
