package api_test

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// 50 concurrent Charges with one key: exactly one transfer, 49 replays, no error.
func TestChargeSameKeyConcurrently(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur)
	credit(t, env, a.GetAccountId(), 1000)
	key := client.NewIdempotencyKey()
	const n = 50
	var wg sync.WaitGroup
	results := make([]*tallyv1.TransferResult, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Raw client: no retries, so any error shows.
			results[i], errs[i] = env.Raw.Charge(context.Background(), &tallyv1.ChargeRequest{
				AccountId: a.GetAccountId(), Amount: 7, IdempotencyKey: key, Metadata: map[string]string{"b": "2", "a": "1"},
			})
		}()
	}
	wg.Wait()
	fresh, replays := 0, 0
	ids := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		ids[results[i].GetTransfer().GetTransferId()] = true
		if results[i].GetReplayed() {
			replays++
		} else {
			fresh++
		}
		if results[i].GetBalance().GetBalance() != 993 || results[i].GetBalance().GetVersion() != 2 {
			t.Fatalf("call %d: balance %v, want 993 at version 2", i, results[i].GetBalance())
		}
	}
	if fresh != 1 || replays != n-1 || len(ids) != 1 {
		t.Fatalf("fresh=%d replays=%d distinct transfers=%d; want 1, %d, 1", fresh, replays, len(ids), n-1)
	}
	var count int
	if err := env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM transfers WHERE idempotency_key = $1`, key).Scan(&count); err != nil || count != 1 {
		t.Fatalf("transfers with the key: %d (%v)", count, err)
	}
	if b := strongBalance(t, env, a.GetAccountId()); b.GetBalance() != 993 {
		t.Fatalf("balance %d, want 993", b.GetBalance())
	}
	env.CheckBooks(t)
}

// 200 concurrent Charges of 1 on an account holding 100: exactly 100 succeed.
func TestConcurrentChargesRespectFloor(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	a := createAccount(t, env, newCurrency())
	credit(t, env, a.GetAccountId(), 100)
	const n = 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, insufficient := 0, 0
	var other []error
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := env.Client.Charge(context.Background(), &tallyv1.ChargeRequest{
				AccountId: a.GetAccountId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey(),
			})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case status.Code(err) == codes.FailedPrecondition:
				insufficient++
			default:
				other = append(other, err)
			}
		}()
	}
	wg.Wait()
	if len(other) > 0 || ok != 100 || insufficient != 100 {
		t.Fatalf("ok=%d insufficient=%d other=%v; want 100, 100, none", ok, insufficient, other)
	}
	b := strongBalance(t, env, a.GetAccountId())
	if b.GetBalance() != 0 {
		t.Fatalf("final balance %d, want 0", b.GetBalance())
	}
	var sum int64
	if err := env.Store.Pool().QueryRow(context.Background(), `SELECT sum(amount) FROM entries WHERE account_id = $1`, a.GetAccountId()).Scan(&sum); err != nil || sum != 0 {
		t.Fatalf("entries sum to %d (%v), want 0", sum, err)
	}
	env.CheckBooks(t)
}

// Concurrent Credits to one account from many funding sources: none lost.
func TestConcurrentCreditsFromManyFundingAccounts(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur)
	const sources, each = 10, 20
	var funding []string
	for range sources {
		f := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.Type = tallyv1.AccountType_ACCOUNT_TYPE_FUNDING })
		funding = append(funding, f.GetAccountId())
	}
	var wg sync.WaitGroup
	errs := make(chan error, sources*each)
	for i := range sources * each {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := env.Client.Credit(context.Background(), &tallyv1.CreditRequest{
				AccountId: a.GetAccountId(), Amount: int64(i + 1), IdempotencyKey: client.NewIdempotencyKey(),
				FundingAccountId: funding[i%sources],
			})
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("credit: %v", err)
	}
	want := int64(sources * each * (sources*each + 1) / 2)
	b := strongBalance(t, env, a.GetAccountId())
	if b.GetBalance() != want || b.GetVersion() != sources*each {
		t.Fatalf("balance %d version %d, want %d and %d", b.GetBalance(), b.GetVersion(), want, sources*each)
	}
	env.CheckBooks(t)
}

// Same key, different request: ALREADY_EXISTS and nothing changed. A replay of
// a rejected charge stays rejected after a top-up.
func TestIdempotencyKeyRules(t *testing.T) {
	// Not parallel: it asserts global row counts.
	env := newEnv(t)
	ctx := ctxT(t)
	a := createAccount(t, env, newCurrency())
	credit(t, env, a.GetAccountId(), 100)
	key := client.NewIdempotencyKey()
	first, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 30, IdempotencyKey: key})
	if err != nil {
		t.Fatal(err)
	}
	before := env.Count(t)
	for name, req := range map[string]*tallyv1.ChargeRequest{
		"amount":      {AccountId: a.GetAccountId(), Amount: 31, IdempotencyKey: key},
		"description": {AccountId: a.GetAccountId(), Amount: 30, IdempotencyKey: key, Description: "x"},
		"metadata":    {AccountId: a.GetAccountId(), Amount: 30, IdempotencyKey: key, Metadata: map[string]string{"k": "v"}},
	} {
		_, err := env.Client.Charge(ctx, req)
		wantErr(t, err, codes.AlreadyExists, ledger.ReasonIdempotencyKeyReused)
		_ = name
	}
	// Another kind with the same key is a different request too.
	_, err = env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 30, IdempotencyKey: key})
	wantErr(t, err, codes.AlreadyExists, ledger.ReasonIdempotencyKeyReused)
	if after := env.Count(t); after != before {
		t.Fatalf("rows changed: %+v -> %+v", before, after)
	}
	if b := strongBalance(t, env, a.GetAccountId()); b.GetBalance() != 70 {
		t.Fatalf("balance %d, want 70", b.GetBalance())
	}
	// The same request replays the same transfer and the balance as of it.
	again, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 30, IdempotencyKey: key})
	if err != nil || !again.GetReplayed() || again.GetTransfer().GetTransferId() != first.GetTransfer().GetTransferId() ||
		again.GetBalance().GetBalance() != 70 || again.GetBalance().GetVersion() != first.GetBalance().GetVersion() {
		t.Fatalf("replay = %v, %v; want the first outcome replayed", again, err)
	}

	// A rejected charge stays rejected, even after funds arrive.
	rkey := client.NewIdempotencyKey()
	_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 500, IdempotencyKey: rkey})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonInsufficientFunds)
	if replayedErr(err) {
		t.Fatal("first rejection must not say replayed")
	}
	credit(t, env, a.GetAccountId(), 1000)
	_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 500, IdempotencyKey: rkey})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonInsufficientFunds)
	if !replayedErr(err) {
		t.Fatal("replayed rejection must say replayed=true")
	}
	// GetTransfer by the key of the rejection returns that rejection.
	_, err = env.Client.GetTransfer(ctx, &tallyv1.GetTransferRequest{IdempotencyKey: rkey})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonInsufficientFunds)
	if !replayedErr(err) {
		t.Fatal("GetTransfer of a rejected key must say replayed=true")
	}
	// A different request under the rejected key is still IDEMPOTENCY_KEY_REUSED.
	_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 5, IdempotencyKey: rkey})
	wantErr(t, err, codes.AlreadyExists, ledger.ReasonIdempotencyKeyReused)
	if b := strongBalance(t, env, a.GetAccountId()); b.GetBalance() != 1070 {
		t.Fatalf("balance %d, want 1070", b.GetBalance())
	}
	// Requests that record nothing: NOT_FOUND leaves the key free.
	nkey := client.NewIdempotencyKey()
	_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: "01890000-0000-7000-8000-000000000000", Amount: 5, IdempotencyKey: nkey})
	wantErr(t, err, codes.NotFound, ledger.ReasonAccountNotFound)
	if _, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 5, IdempotencyKey: nkey}); err != nil {
		t.Fatalf("key after NOT_FOUND must still be usable: %v", err)
	}
	env.CheckBooks(t)
}

func TestTransferRules(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	cur := newCurrency()
	a := createAccount(t, env, cur)
	b := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.CreditLimit = 50 })
	other := createAccount(t, env, newCurrency())
	credit(t, env, a.GetAccountId(), 100)

	res, err := env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a.GetAccountId(), CreditAccountId: b.GetAccountId(), Amount: 40, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	if res.GetBalance().GetAccountId() != a.GetAccountId() || res.GetBalance().GetBalance() != 60 || res.GetTransfer().GetKind() != tallyv1.TransferKind_TRANSFER_KIND_TRANSFER {
		t.Fatalf("transfer result %v", res)
	}
	// b may go to -credit_limit: 40 + 50 = 90 available.
	if _, err := env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: b.GetAccountId(), CreditAccountId: a.GetAccountId(), Amount: 91, IdempotencyKey: client.NewIdempotencyKey()}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("overdraft past credit limit: %v", err)
	}
	r2, err := env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: b.GetAccountId(), CreditAccountId: a.GetAccountId(), Amount: 90, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	if r2.GetBalance().GetBalance() != -50 || r2.GetBalance().GetAvailable() != 0 || r2.GetBalance().GetCreditLimit() != 50 {
		t.Fatalf("balance after using credit: %v", r2.GetBalance())
	}
	_, err = env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a.GetAccountId(), CreditAccountId: other.GetAccountId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonCurrencyMismatch)

	// A charge may only credit a REVENUE account, a credit only debit a FUNDING one.
	_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey(), RevenueAccountId: b.GetAccountId()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountTypeMismatch)
	_, err = env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey(), FundingAccountId: b.GetAccountId()})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonAccountTypeMismatch)
	// A product revenue account works and keeps spend split by product.
	rev := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) {
		r.Type = tallyv1.AccountType_ACCOUNT_TYPE_REVENUE
		r.ExternalRef = "product:sms"
	})
	if rev.GetFloor() != tallyv1.Floor_FLOOR_NONE {
		t.Fatalf("revenue account floor %v, want FLOOR_NONE", rev.GetFloor())
	}
	c, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 10, IdempotencyKey: client.NewIdempotencyKey(), RevenueAccountId: rev.GetAccountId()})
	if err != nil || c.GetTransfer().GetCreditAccountId() != rev.GetAccountId() {
		t.Fatalf("charge to product revenue: %v %v", c, err)
	}
	env.CheckBooks(t)
}

// Balances that would overflow int64 are OUT_OF_RANGE, recorded, never
// wrapped: a customer's balance, and each shard of a system account (bounded
// by store.ShardBalanceMax so that their sum fits an int64).
func TestOverflowIsOutOfRange(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	cur := newCurrency()
	a := createAccount(t, env, cur)
	const max = int64(^uint64(0) >> 1)
	// Fill a from customers that may go 1e18 below zero: nine such
	// transfers leave it at 9e18, the tenth would pass max.
	give := func(amount int64, key string) error {
		return giveFromCustomer(t, env, cur, a.GetAccountId(), amount, key)
	}
	fillFromCustomers(t, env, cur, a.GetAccountId(), 9)
	key := client.NewIdempotencyKey()
	wantErr(t, give(ledger.CreditLimitMax, key), codes.OutOfRange, ledger.ReasonBalanceOverflow)
	if bb := strongBalance(t, env, a.GetAccountId()); bb.GetBalance() != 9*ledger.CreditLimitMax {
		t.Fatalf("balance %d", bb.GetBalance())
	}
	if err := give(max-9*ledger.CreditLimitMax, client.NewIdempotencyKey()); err != nil {
		t.Fatalf("up to max exactly: %v", err)
	}
	key = client.NewIdempotencyKey()
	_, err := env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 1, IdempotencyKey: key})
	wantErr(t, err, codes.OutOfRange, ledger.ReasonBalanceOverflow)
	_, err = env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 1, IdempotencyKey: key})
	wantErr(t, err, codes.OutOfRange, ledger.ReasonBalanceOverflow)
	if !replayedErr(err) {
		t.Fatal("OUT_OF_RANGE must be recorded and replayed")
	}
	// A funding shard gives at most store.ShardBalanceMax.
	b := createAccount(t, env, cur)
	credit(t, env, b.GetAccountId(), store.ShardBalanceMax)
	_, err = env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: b.GetAccountId(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.OutOfRange, ledger.ReasonBalanceOverflow)
	if bb := strongBalance(t, env, a.GetAccountId()); bb.GetBalance() != max {
		t.Fatalf("balance %d", bb.GetBalance())
	}
	env.CheckBooks(t)
}

func TestKeysAreScopedByCallerColumn(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	// The schema already carries a scope column (one global scope until
	// authentication lands); the key's uniqueness is per (scope, key).
	var n int
	err := env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM information_schema.columns
		WHERE table_name IN ('idempotency_keys', 'transfers') AND column_name = 'scope'`).Scan(&n)
	if err != nil || n != 2 {
		t.Fatalf("scope columns: %d %v", n, err)
	}
}

// giveFromCustomer moves amount to account to from a new customer account
// that may go CreditLimitMax below zero (a system account's shard could not
// give that much: store.ShardBalanceMax).
func giveFromCustomer(t *testing.T, env *tallytest.Env, cur, to string, amount int64, key string) error {
	t.Helper()
	x := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.CreditLimit = ledger.CreditLimitMax })
	_, err := env.Client.Transfer(ctxT(t), &tallyv1.TransferRequest{DebitAccountId: x.GetAccountId(), CreditAccountId: to,
		Amount: amount, IdempotencyKey: key})
	return err
}

// fillFromCustomers gives account to n × CreditLimitMax.
func fillFromCustomers(t *testing.T, env *tallytest.Env, cur, to string, n int) {
	t.Helper()
	for range n {
		if err := giveFromCustomer(t, env, cur, to, ledger.CreditLimitMax, client.NewIdempotencyKey()); err != nil {
			t.Fatal(err)
		}
	}
}
