package api_test

import (
	"context"
	"math"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// The hostile-client suite, money half (issue 16): what a key of a narrow
// role must not be able to do to the books, through the real server.

// hostileBooks is one currency with a funded customer and the ids of its
// default and extra system accounts, learned as a caller learns them: from
// replies.
type hostileBooks struct {
	currency                       string
	customer, other                string
	revenue, funding               string // the defaults
	revenue2, funding2             string // created by admin
	chargeID                       string // a charge of customer by admin
	charger                        tallyv1.LedgerServiceClient
	chargerKey                     auth.Created
	admin                          tallyv1.LedgerServiceClient
	balancesBefore                 map[string]int64
	transfersBefore, entriesBefore int64
}

func newHostileBooks(t *testing.T, env *tallytest.Env) *hostileBooks {
	t.Helper()
	ctx := ctxT(t)
	b := &hostileBooks{currency: newCurrency(), admin: env.Client.Raw()}
	b.customer = createAccount(t, env, b.currency).GetAccountId()
	b.other = createAccount(t, env, b.currency).GetAccountId()
	cr := credit(t, env, b.customer, 1000)
	b.funding = cr.GetTransfer().GetDebitAccountId()
	ch, err := b.admin.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.customer, Amount: 10, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	b.revenue, b.chargeID = ch.GetTransfer().GetCreditAccountId(), ch.GetTransfer().GetTransferId()
	b.revenue2 = createAccount(t, env, b.currency, func(r *tallyv1.CreateAccountRequest) {
		r.Type = tallyv1.AccountType_ACCOUNT_TYPE_REVENUE
		r.Floor = tallyv1.Floor_FLOOR_NONE
	}).GetAccountId()
	b.funding2 = createAccount(t, env, b.currency, func(r *tallyv1.CreateAccountRequest) {
		r.Type = tallyv1.AccountType_ACCOUNT_TYPE_FUNDING
		r.Floor = tallyv1.Floor_FLOOR_NONE
	}).GetAccountId()
	b.chargerKey = env.NewKey(t, auth.RoleCharger, "")
	b.charger = env.Dial(t, b.chargerKey.Key.String()).Raw()
	b.snapshot(t, env)
	return b
}

func (b *hostileBooks) accounts() []string {
	return []string{b.customer, b.other, b.revenue, b.funding, b.revenue2, b.funding2}
}

func (b *hostileBooks) snapshot(t *testing.T, env *tallytest.Env) {
	t.Helper()
	b.balancesBefore = map[string]int64{}
	for _, a := range b.accounts() {
		b.balancesBefore[a] = strongBalance(t, env, a).GetBalance()
	}
	b.transfersBefore, b.entriesBefore = b.countMoves(t, env)
}

// countMoves counts this currency's transfers and entries.
func (b *hostileBooks) countMoves(t *testing.T, env *tallytest.Env) (transfers, entries int64) {
	t.Helper()
	err := env.Store.Pool().QueryRow(context.Background(), `
		SELECT (SELECT count(*) FROM transfers WHERE currency = $1),
		       (SELECT count(*) FROM entries e JOIN accounts a USING (account_id) WHERE a.currency = $1)`,
		b.currency).Scan(&transfers, &entries)
	if err != nil {
		t.Fatal(err)
	}
	return transfers, entries
}

// unchanged asserts no balance, transfer or entry of the currency changed.
func (b *hostileBooks) unchanged(t *testing.T, env *tallytest.Env, what string) {
	t.Helper()
	for _, a := range b.accounts() {
		if got := strongBalance(t, env, a).GetBalance(); got != b.balancesBefore[a] {
			t.Errorf("%s: balance of %s changed from %d to %d", what, a, b.balancesBefore[a], got)
		}
	}
	tr, en := b.countMoves(t, env)
	if tr != b.transfersBefore || en != b.entriesBefore {
		t.Errorf("%s: transfers %d → %d, entries %d → %d", what, b.transfersBefore, tr, b.entriesBefore, en)
	}
}

// A charger charging a system account (the default funding or revenue
// account, another funding or revenue account), directly or inside a batch
// of either mode, is refused and nothing changes; the overflow attack of
// the review (charging funding by nearly 2^63) cannot start.
func TestHostileChargerCannotChargeSystemAccounts(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	b := newHostileBooks(t, env)
	ctx := ctxT(t)
	targets := map[string]string{"default funding": b.funding, "funding": b.funding2, "other revenue": b.revenue2}
	for name, acct := range targets {
		for _, amount := range []int64{1, math.MaxInt64 - 807} {
			_, err := b.charger.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
			wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
			_, err = b.charger.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, RevenueAccountId: b.revenue2, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
			if name == "other revenue" {
				wantErr(t, err, codes.InvalidArgument, "SELF_POSTING")
			} else {
				wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
			}
			for _, mode := range []tallyv1.BatchMode{tallyv1.BatchMode_BATCH_MODE_ATOMIC, tallyv1.BatchMode_BATCH_MODE_INDEPENDENT} {
				res, err := b.charger.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(), Mode: mode,
					Operations: []*tallyv1.BatchOperation{chargeOp(acct, amount, client.NewIdempotencyKey())}})
				if err != nil {
					t.Fatalf("%s batch %v: %v", name, mode, err)
				}
				if e := res.GetResults()[0].GetError(); e.GetReason() != "ACCOUNT_TYPE_MISMATCH" {
					t.Errorf("%s batch %v: item result %v, want ACCOUNT_TYPE_MISMATCH", name, mode, res.GetResults()[0])
				}
			}
		}
	}
	// The revenue account charged as a customer with another revenue
	// account as the counterparty: a type mismatch too.
	_, err := b.charger.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.revenue, RevenueAccountId: b.revenue2, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
	// Charging a customer into a funding account (as the "revenue") too.
	_, err = b.charger.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.customer, RevenueAccountId: b.funding2, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
	// Not even admin may charge a system account, or credit one.
	_, err = b.admin.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.funding, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
	_, err = b.admin.Credit(ctx, &tallyv1.CreditRequest{AccountId: b.revenue2, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
	_, err = b.admin.Credit(ctx, &tallyv1.CreditRequest{AccountId: b.customer, FundingAccountId: b.revenue2, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
	b.unchanged(t, env, "after charging system accounts")
	// A customer charge still works, and holds on system accounts do not.
	if _, err := b.charger.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.customer, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("charging a customer: %v", err)
	}
	_, err = b.charger.Hold(ctx, &tallyv1.HoldRequest{AccountId: b.funding2, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.FailedPrecondition, "ACCOUNT_TYPE_MISMATCH")
}

// Self-postings (debit = credit through a default account) are
// INVALID_ARGUMENT, not INTERNAL, and in an INDEPENDENT batch fail only
// their own item.
func TestHostileSelfPostingsAreInvalidArgument(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	b := newHostileBooks(t, env)
	ctx := ctxT(t)
	_, err := b.admin.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.revenue, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.InvalidArgument, "SELF_POSTING")
	_, err = b.charger.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.revenue, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.InvalidArgument, "SELF_POSTING")
	_, err = b.admin.Credit(ctx, &tallyv1.CreditRequest{AccountId: b.funding, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.InvalidArgument, "SELF_POSTING")
	_, err = b.admin.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: b.customer, CreditAccountId: b.customer, Amount: 5, IdempotencyKey: client.NewIdempotencyKey()})
	wantErr(t, err, codes.InvalidArgument, "SELF_POSTING")
	key := client.NewIdempotencyKey()
	res, err := b.charger.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(), Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT,
		Operations: []*tallyv1.BatchOperation{chargeOp(b.revenue, 5, client.NewIdempotencyKey()), chargeOp(b.customer, 7, key)}})
	if err != nil {
		t.Fatalf("independent batch with a self-posting: %v", err)
	}
	if e := res.GetResults()[0].GetError(); e.GetReason() != "SELF_POSTING" || e.GetCode() != int32(codes.InvalidArgument) {
		t.Errorf("self-posting item: %v", res.GetResults()[0])
	}
	if res.GetResults()[1].GetTransfer() == nil {
		t.Errorf("the good item of an independent batch did not apply: %v", res.GetResults()[1])
	}
	b.balancesBefore[b.customer] -= 7
	b.balancesBefore[b.revenue] += 7
	b.transfersBefore++
	b.entriesBefore += 2
	b.unchanged(t, env, "after self-postings")
	// An UpdateAccount whose credit limit would overflow available is
	// OUT_OF_RANGE, not INTERNAL.
	rich := createAccount(t, env, b.currency).GetAccountId()
	fillFromCustomers(t, env, b.currency, rich, 9)
	limit := int64(1_000_000_000_000_000_000)
	_, err = b.admin.UpdateAccount(ctx, &tallyv1.UpdateAccountRequest{AccountId: rich, CreditLimit: &limit})
	wantErr(t, err, codes.OutOfRange, "BALANCE_OVERFLOW")
}

// A charger refunds, captures and releases only its own client's charges
// and holds; another client's are NOT_FOUND exactly like GetTransfer and
// GetHold answer, so Refund is no existence oracle. Admin and support act
// on everything.
func TestHostileCrossClientObjectsAreNotFound(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	b := newHostileBooks(t, env)
	ctx := ctxT(t)
	// A hold and a charge made by another charger client.
	owner := env.Dial(t, env.NewKey(t, auth.RoleCharger, "").Key.String()).Raw()
	hres, err := owner.Hold(ctx, &tallyv1.HoldRequest{AccountId: b.customer, Amount: 50, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	holdID := hres.GetHold().GetHoldId()
	cres, err := owner.Charge(ctx, &tallyv1.ChargeRequest{AccountId: b.customer, Amount: 20, IdempotencyKey: client.NewIdempotencyKey()})
	if err != nil {
		t.Fatal(err)
	}
	chargeID := cres.GetTransfer().GetTransferId()
	b.snapshot(t, env)
	// The hostile charger, on another client's objects and on a made-up id:
	// the same answers.
	for _, id := range []string{chargeID, b.chargeID, "01900000-0000-7000-8000-000000000000"} {
		_, err = b.charger.Refund(ctx, &tallyv1.RefundRequest{TransferId: id, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
		wantErr(t, err, codes.NotFound, "TRANSFER_NOT_FOUND")
		_, err = b.charger.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: id})
		wantErr(t, err, codes.NotFound, "TRANSFER_NOT_FOUND")
	}
	for _, id := range []string{holdID, "01900000-0000-7000-8000-000000000001"} {
		_, err = b.charger.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: id, IdempotencyKey: client.NewIdempotencyKey()})
		wantErr(t, err, codes.NotFound, "HOLD_NOT_FOUND")
		_, err = b.charger.ReleaseHold(ctx, &tallyv1.ReleaseHoldRequest{HoldId: id, IdempotencyKey: client.NewIdempotencyKey()})
		wantErr(t, err, codes.NotFound, "HOLD_NOT_FOUND")
		_, err = b.charger.GetHold(ctx, &tallyv1.GetHoldRequest{HoldId: id})
		wantErr(t, err, codes.NotFound, "HOLD_NOT_FOUND")
	}
	// In a batch, too.
	res, err := b.charger.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(), Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT,
		Operations: []*tallyv1.BatchOperation{
			{Op: &tallyv1.BatchOperation_Refund{Refund: &tallyv1.RefundRequest{TransferId: chargeID, IdempotencyKey: client.NewIdempotencyKey()}}},
			{Op: &tallyv1.BatchOperation_CaptureHold{CaptureHold: &tallyv1.CaptureHoldRequest{HoldId: holdID, IdempotencyKey: client.NewIdempotencyKey()}}},
			{Op: &tallyv1.BatchOperation_ReleaseHold{ReleaseHold: &tallyv1.ReleaseHoldRequest{HoldId: holdID, IdempotencyKey: client.NewIdempotencyKey()}}},
		}})
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"TRANSFER_NOT_FOUND", "HOLD_NOT_FOUND", "HOLD_NOT_FOUND"} {
		if got := res.GetResults()[i].GetError().GetReason(); got != want {
			t.Errorf("batch item %d: %v, want %s", i, res.GetResults()[i], want)
		}
	}
	b.unchanged(t, env, "after cross-client refund, capture and release")
	// The owner, support and admin still act on them.
	if _, err := owner.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: holdID, Amount: 10, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("owner capture: %v", err)
	}
	support := env.Dial(t, env.NewKey(t, auth.RoleSupport, "").Key.String()).Raw()
	if _, err := support.Refund(ctx, &tallyv1.RefundRequest{TransferId: chargeID, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("support refund: %v", err)
	}
	if _, err := b.admin.Refund(ctx, &tallyv1.RefundRequest{TransferId: chargeID, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("admin refund: %v", err)
	}
}

// Support changes customer accounts only: freezing a default system
// account would stop every credit and refund of its currency. Closing a
// default system account names the real reason.
func TestHostileSystemAccountsAreAdminOnly(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	b := newHostileBooks(t, env)
	ctx := ctxT(t)
	support := env.Dial(t, env.NewKey(t, auth.RoleSupport, "").Key.String()).Raw()
	for _, acct := range []string{b.revenue, b.funding, b.revenue2} {
		_, err := support.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: acct})
		wantErr(t, err, codes.PermissionDenied, "PERMISSION_DENIED")
		_, err = support.CloseAccount(ctx, &tallyv1.CloseAccountRequest{AccountId: acct})
		wantErr(t, err, codes.PermissionDenied, "PERMISSION_DENIED")
	}
	if _, err := support.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: b.other}); err != nil {
		t.Fatalf("support freezing a customer: %v", err)
	}
	_, err := b.admin.CloseAccount(ctx, &tallyv1.CloseAccountRequest{AccountId: b.funding})
	wantErr(t, err, codes.FailedPrecondition, "SYSTEM_ACCOUNT")
	// Credits still work: nothing froze the funding account.
	if _, err := b.admin.Credit(ctx, &tallyv1.CreditRequest{AccountId: b.customer, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
		t.Fatalf("credit after support's attempts: %v", err)
	}
}

// The database refuses a charge of a system account even when the ledger's
// check is bypassed: the account types a transfer records are proven by
// composite foreign keys and checked per kind.
func TestHostileDatabaseBacksAccountTypeRules(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	b := newHostileBooks(t, env)
	pool := env.Store.Pool()
	for _, c := range []struct{ name, sql, want string }{
		{"charge of a funding account", `INSERT INTO transfers (transfer_id, idempotency_key, kind, debit_account_id, credit_account_id, amount, currency, created_at, debit_account_type, credit_account_type)
			VALUES (gen_random_uuid(), 'x1', 1, '` + b.funding2 + `', '` + b.revenue + `', 5, '` + b.currency + `', now(), 3, 2)`, "transfers_account_types_valid"},
		{"funding recorded as customer", `INSERT INTO transfers (transfer_id, idempotency_key, kind, debit_account_id, credit_account_id, amount, currency, created_at, debit_account_type, credit_account_type)
			VALUES (gen_random_uuid(), 'x2', 1, '` + b.funding2 + `', '` + b.revenue + `', 5, '` + b.currency + `', now(), 1, 2)`, "transfers_debit_account_type_fk"},
		{"hold on a revenue account", `INSERT INTO holds (hold_id, scope, idempotency_key, account_id, amount, currency, expires_at, created_at, account_type)
			VALUES (gen_random_uuid(), '', 'x3', '` + b.revenue2 + `', 5, '` + b.currency + `', now() + interval '1 hour', now(), 2)`, "holds_account_types_valid"},
		{"account type changed under a transfer", `UPDATE accounts SET type = 3 WHERE account_id = '` + b.revenue + `'`, "accounts_system_role_valid"},
		{"customer type changed under a transfer", `UPDATE accounts SET type = 2 WHERE account_id = '` + b.customer + `'`, "transfers_"},
	} {
		_, err := pool.Exec(context.Background(), c.sql)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error naming %q", c.name, err, c.want)
		}
	}
	// And what the ledger writes carries the types.
	var untyped int64
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM transfers WHERE currency = $1
		AND (debit_account_type IS NULL OR credit_account_type IS NULL)`, b.currency).Scan(&untyped); err != nil {
		t.Fatal(err)
	}
	if untyped != 0 {
		t.Errorf("%d transfers written without account types", untyped)
	}
}
