package api_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// statementActivity posts credits, charges, holds (captured, released and
// left to expire) and refunds on a new customer account, concurrently so a
// sharded revenue account gets entries on several shards. It returns the
// customer and the revenue account.
func statementActivity(t *testing.T, env *tallytest.Env, rounds int) (customer, revenue string) {
	t.Helper()
	ctx := ctxT(t)
	cur := newCurrency()
	customer = createAccount(t, env, cur).GetAccountId()
	credit(t, env, customer, 1_000_000)
	var wg sync.WaitGroup
	errs := make(chan error, rounds)
	var mu sync.Mutex
	for i := 0; i < rounds; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ch, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: customer, Amount: int64(100 + i),
				IdempotencyKey: client.NewIdempotencyKey(), Description: fmt.Sprintf("order %d", i)})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			revenue = ch.GetTransfer().GetCreditAccountId()
			mu.Unlock()
			switch i % 4 {
			case 0:
				_, err = env.Client.Refund(ctx, &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(),
					Amount: 50, IdempotencyKey: client.NewIdempotencyKey(), Reason: "sorry"})
			case 1:
				var h *tallyv1.HoldResult
				if h, err = env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: customer, Amount: 300,
					IdempotencyKey: client.NewIdempotencyKey()}); err == nil {
					_, err = env.Client.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: h.GetHold().GetHoldId(),
						Amount: 120, IdempotencyKey: client.NewIdempotencyKey()})
				}
			case 2:
				var h *tallyv1.HoldResult
				if h, err = env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: customer, Amount: 200,
					IdempotencyKey: client.NewIdempotencyKey()}); err == nil {
					_, err = env.Client.ReleaseHold(ctx, &tallyv1.ReleaseHoldRequest{HoldId: h.GetHold().GetHoldId(),
						IdempotencyKey: client.NewIdempotencyKey()})
				}
			case 3:
				_, err = env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: customer, Amount: 70,
					IdempotencyKey: client.NewIdempotencyKey(), ExpiresInSeconds: 1})
			}
			if err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("activity: %v", err)
	}
	return customer, revenue
}

// readStatement reads every page of a statement and checks that each page
// repeats the same opening, closing and totals, that every running balance
// is the previous one plus the line's amount, and that opening + lines =
// closing exactly. It returns the lines.
func readStatement(t *testing.T, env *tallytest.Env, acct string, from, to time.Time, pageSize int32) (*tallyv1.Statement, []*tallyv1.StatementLine) {
	t.Helper()
	req := &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(from), To: timestamppb.New(to), PageSize: pageSize}
	var first *tallyv1.Statement
	var lines []*tallyv1.StatementLine
	pages := 0
	for {
		st, err := env.Raw.GetStatement(ctxT(t), req)
		if err != nil {
			t.Fatalf("GetStatement page %d: %v", pages, err)
		}
		pages++
		if first == nil {
			first = st
		} else if st.GetOpeningBalance() != first.GetOpeningBalance() || st.GetClosingBalance() != first.GetClosingBalance() ||
			len(st.GetTotals()) != len(first.GetTotals()) {
			t.Fatalf("page %d disagrees with page 1: %v vs %v", pages, st, first)
		}
		if len(st.GetLines()) > int(pageSize) {
			t.Fatalf("page of %d lines, page_size %d", len(st.GetLines()), pageSize)
		}
		lines = append(lines, st.GetLines()...)
		if st.GetNextPageToken() == "" {
			break
		}
		req.PageToken = st.GetNextPageToken()
	}
	running := first.GetOpeningBalance()
	var byKind = map[tallyv1.TransferKind]int64{}
	for i, l := range lines {
		running += l.GetAmount()
		if l.GetRunningBalance() != running {
			t.Fatalf("line %d: running balance %d, want %d (opening %d)", i, l.GetRunningBalance(), running, first.GetOpeningBalance())
		}
		if i > 0 && l.GetCreatedAt().AsTime().Before(lines[i-1].GetCreatedAt().AsTime()) {
			t.Fatalf("line %d is dated before line %d", i, i-1)
		}
		byKind[l.GetKind()] += l.GetAmount()
	}
	if running != first.GetClosingBalance() {
		t.Fatalf("opening %d + lines = %d, closing %d", first.GetOpeningBalance(), running, first.GetClosingBalance())
	}
	for _, tot := range first.GetTotals() {
		if got := tot.GetCredits() + tot.GetDebits(); got != byKind[tot.GetKind()] {
			t.Fatalf("total of %v: %d, lines sum to %d", tot.GetKind(), got, byKind[tot.GetKind()])
		}
	}
	t.Logf("%s: %d lines in %d pages, opening %d, closing %d", acct, len(lines), pages, first.GetOpeningBalance(), first.GetClosingBalance())
	return first, lines
}

// TestStatementAddsUpExactly checks opening + lines = closing across many
// pages for a customer (credits, charges, captures, refunds; holds released
// and expired) and its sharded revenue account, for the whole history and
// for a period that starts in the middle of it.
func TestStatementAddsUpExactly(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	from := time.Now().Add(-time.Minute)
	customer, revenue := statementActivity(t, env, 24)
	mid := time.Now()
	time.Sleep(1100 * time.Millisecond) // the expiring holds expire
	customer2, _ := statementActivity(t, env, 8)
	_ = customer2
	credit(t, env, customer, 77)
	to := time.Now()

	st, lines := readStatement(t, env, customer, from, to, 5)
	if want := strongBalance(t, env, customer).GetBalance(); st.GetClosingBalance() != want {
		t.Fatalf("customer closing %d, STRONG GetBalance %d", st.GetClosingBalance(), want)
	}
	if st.GetOpeningBalance() != 0 || len(lines) != 38 {
		t.Fatalf("customer: opening %d, %d lines", st.GetOpeningBalance(), len(lines))
	}
	if st.GetFinal() {
		t.Fatalf("a statement ending now is final")
	}
	// A period from the middle: the opening is the balance then.
	st2, _ := readStatement(t, env, customer, mid, to, 3)
	at, err := env.Raw.GetBalance(ctxT(t), &tallyv1.GetBalanceRequest{AccountId: customer, At: timestamppb.New(mid)})
	if err != nil {
		t.Fatal(err)
	}
	if st2.GetOpeningBalance() != at.GetBalance() {
		t.Fatalf("opening at mid %d, GetBalance{at} %d", st2.GetOpeningBalance(), at.GetBalance())
	}

	// The sharded revenue account: lines from several shards, the running
	// balance of the account.
	rst, rlines := readStatement(t, env, revenue, from, to, 4)
	if want := strongBalance(t, env, revenue).GetBalance(); rst.GetClosingBalance() != want {
		t.Fatalf("revenue closing %d, STRONG GetBalance %d", rst.GetClosingBalance(), want)
	}
	shards := map[string]bool{}
	for _, l := range rlines {
		shards[l.GetShardId()] = true
	}
	t.Logf("revenue lines on %d shards", len(shards))
}

// TestStatementErrors checks the request's validation.
func TestStatementErrors(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	acct := createAccount(t, env, newCurrency()).GetAccountId()
	now := time.Now()
	cases := []struct {
		name string
		req  *tallyv1.GetStatementRequest
		code codes.Code
	}{
		{"no from", &tallyv1.GetStatementRequest{AccountId: acct, To: timestamppb.New(now)}, codes.InvalidArgument},
		{"to before from", &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(now), To: timestamppb.New(now.Add(-time.Hour))}, codes.InvalidArgument},
		{"future", &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(now.Add(-time.Hour)), To: timestamppb.New(now.Add(time.Hour))}, codes.InvalidArgument},
		{"bad token", &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(now.Add(-time.Hour)), To: timestamppb.New(now), PageToken: "x"}, codes.InvalidArgument},
		{"unknown", &tallyv1.GetStatementRequest{AccountId: "6f1c7c1e-0000-4000-8000-000000000000", From: timestamppb.New(now.Add(-time.Hour)), To: timestamppb.New(now)}, codes.NotFound},
	}
	for _, c := range cases {
		_, err := env.Raw.GetStatement(ctxT(t), c.req)
		wantErr(t, err, c.code, "")
	}
	old := now.Add(-time.Hour)
	st, err := env.Raw.GetStatement(ctxT(t), &tallyv1.GetStatementRequest{AccountId: acct, From: timestamppb.New(old.Add(-time.Hour)), To: timestamppb.New(old)})
	if err != nil || !st.GetFinal() {
		t.Fatalf("an hour-old period: %v final=%v", err, st.GetFinal())
	}
}

// TestListOpenHoldsAndRefunds pages through an account's open holds (not
// the released or expired ones) and a charge's refunds.
func TestListOpenHoldsAndRefunds(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	acct := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, acct, 10_000)
	open := map[string]bool{}
	for i := 0; i < 7; i++ {
		h, err := env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: acct, Amount: 10, IdempotencyKey: client.NewIdempotencyKey(),
			ExpiresInSeconds: int64(600 + i)})
		if err != nil {
			t.Fatal(err)
		}
		open[h.GetHold().GetHoldId()] = true
	}
	rel, err := env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: acct, Amount: 10, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Client.ReleaseHold(ctx, &tallyv1.ReleaseHoldRequest{HoldId: rel.GetHold().GetHoldId(), IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatal(err)
	}
	seen, tok := 0, ""
	for {
		res, err := env.Raw.ListOpenHolds(ctx, &tallyv1.ListOpenHoldsRequest{AccountId: acct, PageSize: 3, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range res.GetHolds() {
			if !open[h.GetHoldId()] || h.GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_OPEN {
				t.Fatalf("listed %s (%v)", h.GetHoldId(), h.GetStatus())
			}
			seen++
		}
		if tok = res.GetNextPageToken(); tok == "" {
			break
		}
	}
	if seen != len(open) {
		t.Fatalf("listed %d open holds, want %d", seen, len(open))
	}

	ch, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: 500, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if _, err := env.Client.Refund(ctx, &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), Amount: 10,
			IdempotencyKey: client.NewIdempotencyKey(), Reason: fmt.Sprint("r", i)}); err != nil {
			t.Fatal(err)
		}
	}
	var refunds []*tallyv1.Transfer
	tok = ""
	for {
		res, err := env.Raw.ListRefunds(ctx, &tallyv1.ListRefundsRequest{TransferId: ch.GetTransfer().GetTransferId(), PageSize: 2, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		refunds = append(refunds, res.GetRefunds()...)
		if tok = res.GetNextPageToken(); tok == "" {
			break
		}
	}
	if len(refunds) != 5 || refunds[0].GetRefundOf() != ch.GetTransfer().GetTransferId() || refunds[0].GetKind() != tallyv1.TransferKind_TRANSFER_KIND_REFUND {
		t.Fatalf("refunds: %v", refunds)
	}
	_, err = env.Raw.ListRefunds(ctx, &tallyv1.ListRefundsRequest{TransferId: acct})
	wantErr(t, err, codes.NotFound, "")
	_, err = env.Raw.ListOpenHolds(ctx, &tallyv1.ListOpenHoldsRequest{AccountId: acct, PageToken: "garbage"})
	wantErr(t, err, codes.InvalidArgument, "")
}
