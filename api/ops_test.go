package api_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

func hold(t *testing.T, env *tallytest.Env, acct string, amount int64, mods ...func(*tallyv1.HoldRequest)) *tallyv1.HoldResult {
	t.Helper()
	r := &tallyv1.HoldRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()}
	for _, m := range mods {
		m(r)
	}
	res, err := env.Client.Hold(ctxT(t), r)
	if err != nil {
		t.Fatalf("Hold: %v", err)
	}
	return res
}

func charge(env *tallytest.Env, ctx context.Context, acct string, amount int64) (*tallyv1.TransferResult, error) {
	return env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
}

func wantBalance(t *testing.T, b *tallyv1.Balance, balance, held, available int64) {
	t.Helper()
	if b.GetBalance() != balance || b.GetHeld() != held || b.GetAvailable() != available {
		t.Fatalf("balance %d held %d available %d, want %d, %d, %d", b.GetBalance(), b.GetHeld(), b.GetAvailable(), balance, held, available)
	}
}

// A hold lowers available, not balance, and no charge can spend held funds.
func TestChargeCannotSpendHeldFunds(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 100)
	h := hold(t, env, a, 70)
	wantBalance(t, h.GetBalance(), 100, 70, 30)
	if h.GetHold().GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_OPEN {
		t.Fatalf("hold status %v", h.GetHold().GetStatus())
	}
	_, err := charge(env, ctxT(t), a, 31)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonInsufficientFunds)
	// A second hold cannot reserve held funds either.
	_, err = env.Client.Hold(ctxT(t), &tallyv1.HoldRequest{AccountId: a, Amount: 31, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonInsufficientFunds)
	if _, err := charge(env, ctxT(t), a, 30); err != nil {
		t.Fatalf("charge within available: %v", err)
	}
	wantBalance(t, strongBalance(t, env, a), 70, 70, 0)
	// The cached read agrees (it carries held too).
	cb, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a})
	if err != nil {
		t.Fatal(err)
	}
	wantBalance(t, cb, 70, 70, 0)
	// Capture part: the rest is released, balance drops by the capture only.
	c, err := env.Client.CaptureHold(ctxT(t), &tallyv1.CaptureHoldRequest{HoldId: h.GetHold().GetHoldId(), Amount: 50, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	wantBalance(t, c.GetBalance(), 20, 0, 20)
	if c.GetTransfer().GetKind() != tallyv1.TransferKind_TRANSFER_KIND_CHARGE || c.GetTransfer().GetAmount() != 50 ||
		c.GetTransfer().GetHoldId() != h.GetHold().GetHoldId() || c.GetHold().GetCapturedAmount() != 50 ||
		c.GetHold().GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_CAPTURED {
		t.Fatalf("capture result %v", c)
	}
	_, err = env.Client.ReleaseHold(ctxT(t), &tallyv1.ReleaseHoldRequest{HoldId: h.GetHold().GetHoldId(), IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonHoldFinalized)
	// Capturing more than held is refused.
	h2 := hold(t, env, a, 5)
	_, err = env.Client.CaptureHold(ctxT(t), &tallyv1.CaptureHoldRequest{HoldId: h2.GetHold().GetHoldId(), Amount: 6, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonHoldAmountExceeded)
}

// 50 concurrent captures and releases of one hold, each with its own key:
// exactly one applies; the others are HOLD_FINALIZED.
func TestConcurrentFinalActionsApplyOnce(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 1000)
	h := hold(t, env, a, 400).GetHold().GetHoldId()
	const n = 50
	var wg sync.WaitGroup
	errs := make([]error, n)
	captured := make([]bool, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := client.NewIdempotencyKey()
			if i%2 == 0 {
				_, errs[i] = env.Client.CaptureHold(context.Background(), &tallyv1.CaptureHoldRequest{HoldId: h, Amount: 300, IdempotencyKey: key})
				captured[i] = errs[i] == nil
			} else {
				_, errs[i] = env.Client.ReleaseHold(context.Background(), &tallyv1.ReleaseHoldRequest{HoldId: h, IdempotencyKey: key})
			}
		}()
	}
	wg.Wait()
	ok, wasCapture := 0, false
	for i, err := range errs {
		if err == nil {
			ok++
			wasCapture = captured[i]
			continue
		}
		wantErr(t, err, codes.FailedPrecondition, ledger.ReasonHoldFinalized)
	}
	if ok != 1 {
		t.Fatalf("%d final actions applied, want exactly 1", ok)
	}
	want := int64(1000)
	if wasCapture {
		want = 700
	}
	wantBalance(t, strongBalance(t, env, a), want, 0, want)
	var charges int
	if err := env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM transfers WHERE hold_id = $1`, h).Scan(&charges); err != nil {
		t.Fatal(err)
	}
	if (wasCapture && charges != 1) || (!wasCapture && charges != 0) {
		t.Fatalf("%d capture charges for hold (captured=%v)", charges, wasCapture)
	}
}

// A hold expires at its time by PostgreSQL's clock, with Redis stopped and
// no sweeper: reads show the funds free, a charge can spend them, and a
// capture is HOLD_EXPIRED.
func TestHoldExpiresWithoutRedisOrSweeper(t *testing.T) {
	t.Parallel()
	r := privateRedis(t)
	env := cacheEnv(t, r.URL(), tallytest.Options{})
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 100)
	h := hold(t, env, a, 80, func(r *tallyv1.HoldRequest) { r.ExpiresInSeconds = 2 })
	// Fill the cache while the hold is open, then lose Redis.
	cb, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a})
	if err != nil {
		t.Fatal(err)
	}
	wantBalance(t, cb, 100, 80, 20)
	if err := r.Kill(); err != nil {
		t.Fatal(err)
	}
	_, err = charge(env, ctxT(t), a, 50)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonInsufficientFunds)
	time.Sleep(time.Until(h.GetHold().GetExpiresAt().AsTime()) + 100*time.Millisecond)
	for _, c := range []tallyv1.Consistency{tallyv1.Consistency_CONSISTENCY_CACHED, tallyv1.Consistency_CONSISTENCY_STRONG} {
		b, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a, Consistency: c})
		if err != nil {
			t.Fatal(err)
		}
		wantBalance(t, b, 100, 0, 100)
	}
	g, err := env.Client.GetHold(ctxT(t), &tallyv1.GetHoldRequest{HoldId: h.GetHold().GetHoldId()})
	if err != nil || g.GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_EXPIRED {
		t.Fatalf("GetHold after expiry: %v %v", g.GetStatus(), err)
	}
	_, err = env.Client.CaptureHold(ctxT(t), &tallyv1.CaptureHoldRequest{HoldId: h.GetHold().GetHoldId(), IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonHoldExpired)
	if _, err := charge(env, ctxT(t), a, 90); err != nil {
		t.Fatalf("charge of the freed funds: %v", err)
	}
	wantBalance(t, strongBalance(t, env, a), 10, 0, 10)
	var status int
	if err := env.Store.Pool().QueryRow(context.Background(), `SELECT status FROM holds WHERE hold_id = $1`, h.GetHold().GetHoldId()).Scan(&status); err != nil || status != 4 {
		t.Fatalf("stored hold status %d (%v), want 4 (expired, written down by the next write)", status, err)
	}
}

// A cached balance is not served past its account's next hold expiry, even
// with Redis up and no write to the account.
func TestCachedBalanceNotServedPastHoldExpiry(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 100)
	h := hold(t, env, a, 60, func(r *tallyv1.HoldRequest) { r.ExpiresInSeconds = 2 })
	b, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a})
	if err != nil {
		t.Fatal(err)
	}
	wantBalance(t, b, 100, 60, 40)
	time.Sleep(time.Until(h.GetHold().GetExpiresAt().AsTime()))
	b, err = env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a})
	if err != nil {
		t.Fatal(err)
	}
	wantBalance(t, b, 100, 0, 100)
}

// 50 concurrent refunds of one charge never add up to more than it.
func TestConcurrentRefundsNeverExceedCharge(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 1000)
	ch, err := charge(env, ctxT(t), a, 100)
	if err != nil {
		t.Fatal(err)
	}
	const n = 50
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = env.Client.Refund(context.Background(), &tallyv1.RefundRequest{
				TransferId: ch.GetTransfer().GetTransferId(), Amount: 7, IdempotencyKey: client.NewIdempotencyKey(), Reason: "dup"})
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
			continue
		}
		wantErr(t, err, codes.FailedPrecondition, ledger.ReasonRefundExceedsCharge)
	}
	if ok != 14 { // 14 × 7 = 98 ≤ 100 < 105
		t.Fatalf("%d refunds of 7 applied to a charge of 100, want 14", ok)
	}
	tr, err := env.Client.GetTransfer(ctxT(t), &tallyv1.GetTransferRequest{TransferId: ch.GetTransfer().GetTransferId()})
	if err != nil || tr.GetRefundedAmount() != 98 {
		t.Fatalf("refunded_amount %d (%v), want 98", tr.GetRefundedAmount(), err)
	}
	// The remaining 2 with amount 0 ("all that remains"), then nothing is left.
	rest, err := env.Client.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil || rest.GetTransfer().GetAmount() != 2 || rest.GetTransfer().GetKind() != tallyv1.TransferKind_TRANSFER_KIND_REFUND ||
		rest.GetTransfer().GetRefundOf() != ch.GetTransfer().GetTransferId() {
		t.Fatalf("refund of the rest: %v %v", rest, err)
	}
	_, err = env.Client.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonRefundExceedsCharge)
	wantBalance(t, strongBalance(t, env, a), 1000, 0, 1000)
	// A credit is not refundable.
	cr := credit(t, env, a, 5)
	_, err = env.Client.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: cr.GetTransfer().GetTransferId(), IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonNotACharge)
}

func chargeOp(acct string, amount int64, key string) *tallyv1.BatchOperation {
	return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, IdempotencyKey: key}}}
}

// An ATOMIC batch whose 500th operation fails leaves nothing behind, and its
// operations' keys stay free.
func TestAtomicBatchFailingItemLeavesNothing(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur).GetAccountId()
	poor := createAccount(t, env, cur).GetAccountId()
	credit(t, env, a, 100_000)
	before := strongBalance(t, env, a)
	var ops []*tallyv1.BatchOperation
	keys := make([]string, 600)
	for i := range keys {
		keys[i] = client.NewIdempotencyKey()
		acct := a
		if i == 499 {
			acct = poor // no funds: INSUFFICIENT_FUNDS
		}
		ops = append(ops, chargeOp(acct, 1, keys[i]))
	}
	batchKey := client.NewIdempotencyKey()
	res, err := env.Client.SubmitBatch(ctxT(t), &tallyv1.SubmitBatchRequest{BatchKey: batchKey, Mode: tallyv1.BatchMode_BATCH_MODE_ATOMIC, Operations: ops})
	if err != nil {
		t.Fatal(err)
	}
	if res.GetApplied() || res.GetFailedIndex() != 499 || len(res.GetResults()) != 600 {
		t.Fatalf("applied=%v failed_index=%d results=%d, want false, 499, 600", res.GetApplied(), res.GetFailedIndex(), len(res.GetResults()))
	}
	if e := res.GetResults()[499].GetError(); e.GetReason() != ledger.ReasonInsufficientFunds || codes.Code(e.GetCode()) != codes.FailedPrecondition {
		t.Fatalf("item 499: %v", res.GetResults()[499])
	}
	if e := res.GetResults()[0].GetError(); e.GetReason() != ledger.ReasonNotApplied {
		t.Fatalf("item 0: %v", res.GetResults()[0])
	}
	after := strongBalance(t, env, a)
	if after.GetBalance() != before.GetBalance() || after.GetVersion() != before.GetVersion() {
		t.Fatalf("balance moved: %v → %v", before, after)
	}
	var n int
	if err := env.Store.Pool().QueryRow(context.Background(),
		`SELECT (SELECT count(*) FROM transfers WHERE idempotency_key = ANY($1)) + (SELECT count(*) FROM idempotency_keys WHERE idempotency_key = ANY($1))`,
		keys).Scan(&n); err != nil || n != 0 {
		t.Fatalf("%d transfers or keys left behind (%v)", n, err)
	}
	// The retry of the same batch replays the failure.
	again, err := env.Client.SubmitBatch(ctxT(t), &tallyv1.SubmitBatchRequest{BatchKey: batchKey, Mode: tallyv1.BatchMode_BATCH_MODE_ATOMIC, Operations: ops})
	if err != nil || !again.GetReplayed() || again.GetApplied() || again.GetFailedIndex() != 499 {
		t.Fatalf("retried failed batch: %v %v", again.GetReplayed(), err)
	}
	// The operations' keys are free: the first one works on its own.
	if _, err := env.Client.Charge(ctxT(t), &tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: keys[0]}); err != nil {
		t.Fatalf("key of a failed ATOMIC batch: %v", err)
	}
}

// An INDEPENDENT batch gives what running its operations one by one gives,
// and a retried batch replays its results.
func TestIndependentBatchMatchesOneByOne(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	mk := func() []string {
		a := createAccount(t, env, cur).GetAccountId()
		b := createAccount(t, env, cur).GetAccountId()
		credit(t, env, a, 50)
		return []string{a, b}
	}
	build := func(accts []string, suffix string) []*tallyv1.BatchOperation {
		a, b := accts[0], accts[1]
		k := func(s string) string { return "ind-" + s + "-" + suffix }
		return []*tallyv1.BatchOperation{
			chargeOp(a, 20, k("1")),
			chargeOp(a, 40, k("2")), // insufficient: 30 left
			{Op: &tallyv1.BatchOperation_Hold{Hold: &tallyv1.HoldRequest{AccountId: a, Amount: 25, IdempotencyKey: k("3")}}},
			chargeOp(a, 10, k("4")), // insufficient: 5 available
			chargeOp(b, 1, k("5")),  // insufficient: empty
			chargeOp(a, 20, k("1")), // same key, same request: replay
			chargeOp(a, 21, k("1")), // same key, different request
			{Op: &tallyv1.BatchOperation_Transfer{Transfer: &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: b, Amount: 5, IdempotencyKey: k("6")}}},
		}
	}
	// One by one, in order, on one pair of accounts...
	one := mk()
	var seq []string
	for _, op := range build(one, "seq") {
		var err error
		switch o := op.GetOp().(type) {
		case *tallyv1.BatchOperation_Charge:
			_, err = env.Client.Charge(ctxT(t), o.Charge)
		case *tallyv1.BatchOperation_Hold:
			_, err = env.Client.Hold(ctxT(t), o.Hold)
		case *tallyv1.BatchOperation_Transfer:
			_, err = env.Client.Transfer(ctxT(t), o.Transfer)
		}
		seq = append(seq, outcome(err))
	}
	// ...and as one INDEPENDENT batch on another.
	two := mk()
	req := &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(), Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT, Operations: build(two, "batch")}
	res, err := env.Client.SubmitBatch(ctxT(t), req)
	if err != nil {
		t.Fatal(err)
	}
	var bat []string
	for _, r := range res.GetResults() {
		if e := r.GetError(); e != nil {
			bat = append(bat, codes.Code(e.GetCode()).String()+"/"+e.GetReason())
		} else {
			bat = append(bat, "OK")
		}
	}
	if fmt.Sprint(seq) != fmt.Sprint(bat) {
		t.Fatalf("one by one %v, batch %v", seq, bat)
	}
	if fmt.Sprint(seq) != "[OK FailedPrecondition/INSUFFICIENT_FUNDS OK FailedPrecondition/INSUFFICIENT_FUNDS FailedPrecondition/INSUFFICIENT_FUNDS OK AlreadyExists/IDEMPOTENCY_KEY_REUSED OK]" {
		t.Fatalf("unexpected outcomes %v", seq)
	}
	for i := range one {
		x, y := strongBalance(t, env, one[i]), strongBalance(t, env, two[i])
		if x.GetBalance() != y.GetBalance() || x.GetHeld() != y.GetHeld() || x.GetVersion() != y.GetVersion() {
			t.Fatalf("account %d: one by one %v, batch %v", i, x, y)
		}
	}
	// A retried batch replays: the same results, nothing applied twice.
	again, err := env.Client.SubmitBatch(ctxT(t), req)
	if err != nil || !again.GetReplayed() || len(again.GetResults()) != len(res.GetResults()) {
		t.Fatalf("retry: replayed=%v %v", again.GetReplayed(), err)
	}
	for i := range res.GetResults() {
		if res.GetResults()[i].GetTransfer().GetTransfer().GetTransferId() != again.GetResults()[i].GetTransfer().GetTransfer().GetTransferId() ||
			res.GetResults()[i].GetHold().GetHold().GetHoldId() != again.GetResults()[i].GetHold().GetHold().GetHoldId() {
			t.Fatalf("item %d differs on replay", i)
		}
	}
	if b := strongBalance(t, env, two[0]); b.GetBalance() != 25 {
		t.Fatalf("balance after replay %d, want 25", b.GetBalance())
	}
	// The same batch key with different operations is refused.
	req.Operations = req.Operations[:2]
	_, err = env.Client.SubmitBatch(ctxT(t), req)
	wantErr(t, err, codes.AlreadyExists, ledger.ReasonIdempotencyKeyReused)
}

func outcome(err error) string {
	if err == nil {
		return "OK"
	}
	st := status.Convert(err)
	info, _ := errInfo(err)
	return st.Code().String() + "/" + info
}

// A closed account refuses everything and stays readable; frozen refuses
// debits and holds but takes credits and refunds.
func TestAccountLifecycle(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur).GetAccountId()
	credit(t, env, a, 100)
	ch, err := charge(env, ctxT(t), a, 40)
	if err != nil {
		t.Fatal(err)
	}
	fr, err := env.Client.FreezeAccount(ctxT(t), &tallyv1.FreezeAccountRequest{AccountId: a})
	if err != nil || fr.GetStatus() != tallyv1.AccountStatus_ACCOUNT_STATUS_FROZEN {
		t.Fatalf("freeze: %v %v", fr, err)
	}
	_, err = charge(env, ctxT(t), a, 1)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	_, err = env.Client.Hold(ctxT(t), &tallyv1.HoldRequest{AccountId: a, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	credit(t, env, a, 1)
	if _, err := env.Client.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), Amount: 10, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("refund to a frozen account: %v", err)
	}
	// Closing needs an empty account.
	_, err = env.Client.CloseAccount(ctxT(t), &tallyv1.CloseAccountRequest{AccountId: a})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotEmpty)
	if _, err := env.Client.UnfreezeAccount(ctxT(t), &tallyv1.UnfreezeAccountRequest{AccountId: a}); err != nil {
		t.Fatal(err)
	}
	// credit_limit cannot be lowered below what is used.
	b := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.CreditLimit = 50 }).GetAccountId()
	if _, err := charge(env, ctxT(t), b, 30); err != nil {
		t.Fatal(err)
	}
	low := int64(20)
	_, err = env.Client.UpdateAccount(ctxT(t), &tallyv1.UpdateAccountRequest{AccountId: b, CreditLimit: &low})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonCreditLimitInUse)
	ok := int64(30)
	up, err := env.Client.UpdateAccount(ctxT(t), &tallyv1.UpdateAccountRequest{AccountId: b, CreditLimit: &ok,
		UpdateMetadata: true, Metadata: map[string]string{"plan": "pro"}})
	if err != nil || up.GetCreditLimit() != 30 || up.GetMetadata()["plan"] != "pro" {
		t.Fatalf("update: %v %v", up, err)
	}
	// Empty a and close it.
	if _, err := charge(env, ctxT(t), a, strongBalance(t, env, a).GetBalance()); err != nil {
		t.Fatal(err)
	}
	cl, err := env.Client.CloseAccount(ctxT(t), &tallyv1.CloseAccountRequest{AccountId: a})
	if err != nil || cl.GetStatus() != tallyv1.AccountStatus_ACCOUNT_STATUS_CLOSED {
		t.Fatalf("close: %v %v", cl, err)
	}
	// Closed: everything refused...
	_, err = charge(env, ctxT(t), a, 1)
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	_, err = env.Client.Credit(ctxT(t), &tallyv1.CreditRequest{AccountId: a, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	_, err = env.Client.Hold(ctxT(t), &tallyv1.HoldRequest{AccountId: a, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	_, err = env.Client.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	_, err = env.Client.Transfer(ctxT(t), &tallyv1.TransferRequest{DebitAccountId: b, CreditAccountId: a, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountNotActive)
	_, err = env.Client.FreezeAccount(ctxT(t), &tallyv1.FreezeAccountRequest{AccountId: a})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountClosed)
	_, err = env.Client.UpdateAccount(ctxT(t), &tallyv1.UpdateAccountRequest{AccountId: a, UpdateMetadata: true})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountClosed)
	// ...and still readable.
	if bal := strongBalance(t, env, a); bal.GetBalance() != 0 {
		t.Fatalf("closed balance %v", bal)
	}
	if _, err := env.Client.ListEntries(ctxT(t), &tallyv1.ListEntriesRequest{AccountId: a}); err != nil {
		t.Fatal(err)
	}
	// Every change is recorded with who made it.
	var changes, attributed int
	if err := env.Store.Pool().QueryRow(context.Background(),
		`SELECT count(*), count(created_by_client) FROM account_changes WHERE account_id = $1`, a).Scan(&changes, &attributed); err != nil {
		t.Fatal(err)
	}
	if changes != 3 || attributed != 3 { // freeze, unfreeze, close
		t.Fatalf("account_changes: %d rows, %d attributed; want 3, 3", changes, attributed)
	}
}

// Balances at past instants match a hand-computed history, exactly to the
// entry; recent instants are not final; GetBalances answers many at once.
func TestBalanceHistory(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur).GetAccountId()
	b := createAccount(t, env, cur).GetAccountId()
	type point struct {
		at   time.Time
		want int64
	}
	var points []point
	mark := func(want int64) {
		time.Sleep(20 * time.Millisecond)
		points = append(points, point{time.Now(), want})
		time.Sleep(20 * time.Millisecond)
	}
	mark(0)
	credit(t, env, a, 100)
	mark(100)
	if _, err := charge(env, ctxT(t), a, 30); err != nil {
		t.Fatal(err)
	}
	mark(70)
	if _, err := env.Client.Transfer(ctxT(t), &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: b, Amount: 20, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatal(err)
	}
	mark(50)
	// Exactly at an entry's timestamp, the entry counts.
	es, err := env.Client.ListEntries(ctxT(t), &tallyv1.ListEntriesRequest{AccountId: a})
	if err != nil || len(es.GetEntries()) != 3 {
		t.Fatalf("entries %v %v", es, err)
	}
	points = append(points, point{es.GetEntries()[1].GetCreatedAt().AsTime(), 70})
	for _, p := range points {
		got, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a, At: timestamppb.New(p.at), Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
		if err != nil {
			t.Fatal(err)
		}
		if got.GetBalance() != p.want || !got.GetAsOf().AsTime().Equal(p.at) {
			t.Fatalf("at %s: balance %d as_of %s, want %d", p.at, got.GetBalance(), got.GetAsOf().AsTime(), p.want)
		}
		if got.GetFinal() {
			t.Fatalf("a balance seconds old reported final")
		}
	}
	// Entries can be filtered by kind; each carries its running balance.
	only, err := env.Client.ListEntries(ctxT(t), &tallyv1.ListEntriesRequest{AccountId: a, Kinds: []tallyv1.TransferKind{tallyv1.TransferKind_TRANSFER_KIND_CHARGE}})
	if err != nil || len(only.GetEntries()) != 1 || only.GetEntries()[0].GetBalanceAfter() != 70 || only.GetEntries()[0].GetKind() != tallyv1.TransferKind_TRANSFER_KIND_CHARGE {
		t.Fatalf("charge entries %v %v", only, err)
	}
	// Long ago is final (and zero: before the account's first entry).
	old, err := env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a, At: timestamppb.New(time.Now().Add(-time.Hour)), Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	if err != nil || !old.GetFinal() || old.GetBalance() != 0 {
		t.Fatalf("an hour ago: %v %v", old, err)
	}
	many, err := env.Client.GetBalances(ctxT(t), &tallyv1.GetBalancesRequest{AccountIds: []string{a, b}, At: timestamppb.New(points[3].at)})
	if err != nil || len(many.GetBalances()) != 2 || many.GetBalances()[0].GetBalance() != 50 || many.GetBalances()[1].GetBalance() != 20 {
		t.Fatalf("GetBalances at: %v %v", many, err)
	}
	_, err = env.Client.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: a, At: timestamppb.New(time.Now().Add(time.Hour)), Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	wantErr(t, err, codes.InvalidArgument, ledger.ReasonInvalidArgument)
}

// Month-end balances of 10,000 accounts come back in one GetBalances call.
func TestGetBalancesTenThousand(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur).GetAccountId()
	credit(t, env, a, 123)
	ids := []string{a}
	// The rest are inserted directly: this test is about the read.
	rows, err := env.Store.Pool().Query(context.Background(), `INSERT INTO accounts (account_id, currency, type, floor, status, metadata)
		SELECT gen_random_uuid(), $1, 1, 1, 1, '{}' FROM generate_series(1, 9999) RETURNING account_id::text`, cur)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	rows.Close()
	res, err := env.Client.GetBalances(ctxT(t), &tallyv1.GetBalancesRequest{AccountIds: ids, At: timestamppb.New(time.Now())})
	if err != nil || len(res.GetBalances()) != 10_000 || res.GetBalances()[0].GetBalance() != 123 {
		t.Fatalf("GetBalances of 10,000: %d results, %v", len(res.GetBalances()), err)
	}
	_, err = env.Client.GetBalances(ctxT(t), &tallyv1.GetBalancesRequest{AccountIds: append(ids, a)})
	wantErr(t, err, codes.InvalidArgument, ledger.ReasonInvalidArgument)
}

// A low-balance threshold crossed downward is reported once, on the call
// that crossed it, decided in the committing transaction.
func TestThresholdCrossedOnce(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 100)
	th := int64(50)
	if up, err := env.Client.UpdateAccount(ctxT(t), &tallyv1.UpdateAccountRequest{AccountId: a, LowBalanceThreshold: &th}); err != nil || up.GetLowBalanceThreshold() != 50 {
		t.Fatalf("UpdateAccount: %v %v", up, err)
	}
	var crossed []bool
	for _, amt := range []int64{40, 20, 10} { // 60, 40 (crossed), 30
		r, err := charge(env, ctxT(t), a, amt)
		if err != nil {
			t.Fatal(err)
		}
		crossed = append(crossed, r.GetThresholdCrossed())
	}
	if fmt.Sprint(crossed) != "[false true false]" {
		t.Fatalf("threshold_crossed per charge %v, want [false true false]", crossed)
	}
	credit(t, env, a, 100) // back above: the next crossing reports again
	h := hold(t, env, a, 90)
	if !h.GetThresholdCrossed() {
		t.Fatal("a hold that took available below the threshold did not report it")
	}
	var stored int
	if err := env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM transfers WHERE debit_account_id = $1 AND threshold_crossed`, a).Scan(&stored); err != nil || stored != 1 {
		t.Fatalf("%d transfers stored with threshold_crossed (%v), want 1", stored, err)
	}
}

func errInfo(err error) (string, bool) {
	info, ok := api.ErrorInfo(err)
	return info.GetReason(), ok
}

// The database itself refuses what the ledger never does: a second final
// action on a hold, refunds above the charge, a floor broken by holds.
func TestDatabaseBacksHoldAndRefundInvariants(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 100)
	h := hold(t, env, a, 10).GetHold().GetHoldId()
	if _, err := env.Client.ReleaseHold(ctxT(t), &tallyv1.ReleaseHoldRequest{HoldId: h, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatal(err)
	}
	ch, err := charge(env, ctxT(t), a, 30)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Client.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), Amount: 5, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, sql, want string }{
		{"second final action", `UPDATE holds SET status = 2, captured_amount = 1, finalized_at = now() WHERE hold_id = '` + h + `'`, "final action"},
		{"refunds above the charge", `UPDATE charge_refunds SET refunded = 31 WHERE transfer_id = '` + ch.GetTransfer().GetTransferId() + `'`, "charge_refunds_within_charge"},
		{"held beyond the floor", `UPDATE accounts SET held = 1000, next_hold_expiry = now() WHERE account_id = '` + a + `'`, "accounts_held_within_floor"},
		{"negative held", `UPDATE accounts SET held = -1 WHERE account_id = '` + a + `'`, "accounts_held_nonnegative"},
		{"delete a hold", `DELETE FROM holds WHERE hold_id = '` + h + `'`, "forbidden"},
	} {
		_, err := env.Store.Pool().Exec(context.Background(), c.sql)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error naming %q", c.name, err, c.want)
		}
	}
}
