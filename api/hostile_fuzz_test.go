package api_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// requestSpace is what FuzzHostileRequests draws from: a key of every
// role, accounts of every type and state in one currency, and the charges
// and holds made so far (by admin and by one charger), so fuzzed requests
// name real objects as well as made-up ones.
type requestSpace struct {
	env      *tallytest.Env
	currency string
	roles    []auth.Role
	clients  map[auth.Role]tallyv1.LedgerServiceClient
	keys     map[auth.Role]string
	conn     *grpc.ClientConn
	accounts []string // customer, customer without floor, revenue ×2, funding ×2, frozen, closed, unknown

	mu      sync.Mutex
	charges []string
	holds   []string
}

func newRequestSpace(f *testing.F) *requestSpace {
	env := newAuthEnv(f)
	ctx := context.Background()
	s := &requestSpace{env: env, currency: newCurrency(), clients: map[auth.Role]tallyv1.LedgerServiceClient{}, keys: map[auth.Role]string{}}
	for _, r := range auth.Roles {
		s.roles = append(s.roles, r)
		s.keys[r] = env.NewKey(f, r, "").Key.String()
		s.clients[r] = env.Dial(f, s.keys[r]).Raw()
	}
	conn, err := grpc.NewClient(env.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = conn.Close() })
	s.conn = conn
	admin := env.Client.Raw()
	mk := func(typ tallyv1.AccountType, floor tallyv1.Floor) string {
		a, err := admin.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: s.currency, Type: typ, Floor: floor})
		if err != nil {
			f.Fatal(err)
		}
		return a.GetAccountId()
	}
	customer := mk(tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, tallyv1.Floor_FLOOR_NON_NEGATIVE)
	loose := mk(tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, tallyv1.Floor_FLOOR_NONE)
	frozen := mk(tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, tallyv1.Floor_FLOOR_NON_NEGATIVE)
	closed := mk(tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, tallyv1.Floor_FLOOR_NON_NEGATIVE)
	cr, err := admin.Credit(ctx, &tallyv1.CreditRequest{AccountId: customer, Amount: 1_000_000, IdempotencyKey: "fuzz-seed-credit"})
	if err != nil {
		f.Fatal(err)
	}
	ch, err := s.clients[auth.RoleCharger].Charge(ctx, &tallyv1.ChargeRequest{AccountId: customer, Amount: 100, IdempotencyKey: "fuzz-seed-charge"})
	if err != nil {
		f.Fatal(err)
	}
	if _, err := admin.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: frozen}); err != nil {
		f.Fatal(err)
	}
	if _, err := admin.CloseAccount(ctx, &tallyv1.CloseAccountRequest{AccountId: closed}); err != nil {
		f.Fatal(err)
	}
	s.charges = []string{ch.GetTransfer().GetTransferId(), cr.GetTransfer().GetTransferId()}
	s.accounts = []string{customer, loose,
		ch.GetTransfer().GetCreditAccountId(), mk(tallyv1.AccountType_ACCOUNT_TYPE_REVENUE, tallyv1.Floor_FLOOR_NONE),
		cr.GetTransfer().GetDebitAccountId(), mk(tallyv1.AccountType_ACCOUNT_TYPE_FUNDING, tallyv1.Floor_FLOOR_NONE),
		frozen, closed, uuid.Must(uuid.NewV7()).String()}
	return s
}

func (s *requestSpace) pick(list []string, b uint8) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(list) == 0 || int(b)%(len(list)+1) == len(list) {
		return uuid.Must(uuid.NewV7()).String() // an id that does not exist
	}
	return list[int(b)%(len(list)+1)]
}

func (s *requestSpace) account(b uint8) string {
	if b == 255 {
		return "" // the field left out
	}
	return s.accounts[int(b)%len(s.accounts)]
}

func (s *requestSpace) remember(res any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch r := res.(type) {
	case *tallyv1.TransferResult:
		if id := r.GetTransfer().GetTransferId(); id != "" && len(s.charges) < 256 {
			s.charges = append(s.charges, id)
		}
	case *tallyv1.HoldResult:
		if id := r.GetHold().GetHoldId(); id != "" && len(s.holds) < 256 {
			s.holds = append(s.holds, id)
		}
	}
}

// fuzzOp is one fuzzed operation, built from the fuzzer's bytes.
type fuzzOp struct {
	op, a, b, obj uint8
	amount, limit int64
	key, text     string
}

func (s *requestSpace) build(o fuzzOp) (method string, req, resp any) {
	meta := map[string]string{}
	if o.text != "" {
		meta[o.text] = o.text
	}
	a, b := s.account(o.a), s.account(o.b)
	switch o.op % 14 {
	case 0:
		return "Charge", &tallyv1.ChargeRequest{AccountId: a, RevenueAccountId: b, Amount: o.amount, IdempotencyKey: o.key, Description: o.text, Metadata: meta}, &tallyv1.TransferResult{}
	case 1:
		return "Charge", &tallyv1.ChargeRequest{AccountId: a, Amount: o.amount, IdempotencyKey: o.key}, &tallyv1.TransferResult{}
	case 2:
		return "Credit", &tallyv1.CreditRequest{AccountId: a, FundingAccountId: b, Amount: o.amount, IdempotencyKey: o.key}, &tallyv1.TransferResult{}
	case 3:
		return "Transfer", &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: b, Amount: o.amount, IdempotencyKey: o.key}, &tallyv1.TransferResult{}
	case 4:
		return "Refund", &tallyv1.RefundRequest{TransferId: s.pick(s.charges, o.obj), Amount: o.amount, IdempotencyKey: o.key, Reason: o.text}, &tallyv1.TransferResult{}
	case 5:
		return "Hold", &tallyv1.HoldRequest{AccountId: a, RevenueAccountId: b, Amount: o.amount, IdempotencyKey: o.key, ExpiresInSeconds: o.limit % 100000}, &tallyv1.HoldResult{}
	case 6:
		return "CaptureHold", &tallyv1.CaptureHoldRequest{HoldId: s.pick(s.holds, o.obj), Amount: o.amount, IdempotencyKey: o.key}, &tallyv1.HoldResult{}
	case 7:
		return "ReleaseHold", &tallyv1.ReleaseHoldRequest{HoldId: s.pick(s.holds, o.obj), IdempotencyKey: o.key}, &tallyv1.HoldResult{}
	case 8:
		return "FreezeAccount", &tallyv1.FreezeAccountRequest{AccountId: a}, &tallyv1.Account{}
	case 9:
		return "UnfreezeAccount", &tallyv1.UnfreezeAccountRequest{AccountId: a}, &tallyv1.Account{}
	case 10:
		return "CloseAccount", &tallyv1.CloseAccountRequest{AccountId: a}, &tallyv1.Account{}
	case 11:
		lim, th := o.limit, o.amount
		return "UpdateAccount", &tallyv1.UpdateAccountRequest{AccountId: a, CreditLimit: &lim, LowBalanceThreshold: &th,
			UpdateMetadata: o.obj%2 == 0, Metadata: meta}, &tallyv1.Account{}
	case 12:
		return "GetHold", &tallyv1.GetHoldRequest{HoldId: s.pick(s.holds, o.obj)}, &tallyv1.Hold{}
	}
	// A batch of the other kinds, in either mode.
	ops := []*tallyv1.BatchOperation{
		{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{AccountId: a, Amount: o.amount, IdempotencyKey: o.key + "-1"}}},
		{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{AccountId: b, RevenueAccountId: a, Amount: o.limit, IdempotencyKey: o.key + "-2"}}},
		{Op: &tallyv1.BatchOperation_Refund{Refund: &tallyv1.RefundRequest{TransferId: s.pick(s.charges, o.obj), Amount: o.amount, IdempotencyKey: o.key + "-3"}}},
		{Op: &tallyv1.BatchOperation_Hold{Hold: &tallyv1.HoldRequest{AccountId: b, Amount: o.amount, IdempotencyKey: o.key + "-4"}}},
		{Op: &tallyv1.BatchOperation_CaptureHold{CaptureHold: &tallyv1.CaptureHoldRequest{HoldId: s.pick(s.holds, o.obj+1), IdempotencyKey: o.key + "-5"}}},
		{Op: &tallyv1.BatchOperation_Credit{Credit: &tallyv1.CreditRequest{AccountId: a, FundingAccountId: b, Amount: o.amount, IdempotencyKey: o.key + "-6"}}},
	}
	mode := tallyv1.BatchMode_BATCH_MODE_ATOMIC
	if o.obj%2 == 1 {
		mode = tallyv1.BatchMode_BATCH_MODE_INDEPENDENT
	}
	return "SubmitBatch", &tallyv1.SubmitBatchRequest{BatchKey: o.key, Mode: mode, Operations: ops[:1+int(o.b)%len(ops)]}, &tallyv1.SubmitBatchResponse{}
}

// FuzzHostileRequests sends requests from the whole request space (every
// money-moving and lifecycle operation, batches of both modes, every
// account type and state, real and made-up objects, every role) through
// the real server, and asserts that none answers INTERNAL or UNKNOWN and
// that the currency's books still sum to zero after each call.
func FuzzHostileRequests(f *testing.F) {
	s := newRequestSpace(f)
	for op := uint8(0); op < 14; op++ {
		for a := uint8(0); a < 9; a += 2 {
			f.Add(op, uint8(op%5), a, uint8(a+1), uint8(op), int64(5), int64(10), "k", "")
		}
	}
	f.Add(uint8(1), uint8(0), uint8(2), uint8(0), uint8(0), int64(1), int64(0), "self", "")                  // charge of the default revenue
	f.Add(uint8(2), uint8(4), uint8(4), uint8(0), uint8(0), int64(1), int64(0), "self", "")                  // credit of the default funding
	f.Add(uint8(0), uint8(0), uint8(4), uint8(2), uint8(0), int64(9223372036854775000), int64(0), "big", "") // charge funding by ~2^63
	f.Add(uint8(11), uint8(4), uint8(0), uint8(0), uint8(0), int64(0), int64(1000000000000000000), "lim", "")
	f.Fuzz(func(t *testing.T, op, role, a, b, obj uint8, amount, limit int64, key, text string) {
		// The generated client refuses to marshal invalid UTF-8 (on its own
		// side, as INTERNAL); undecodable bytes sent raw are another test's.
		text = strings.ToValidUTF8(text, "?")
		o := fuzzOp{op: op, a: a, b: b, obj: obj, amount: amount, limit: limit, key: fmt.Sprintf("fz-%d-%s", time.Now().UnixNano(), strings.ToValidUTF8(key, "?")), text: text}
		method, req, resp := s.build(o)
		r := s.roles[int(role)%len(s.roles)]
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		callErr := s.conn.Invoke(withAuthz(ctx, "Bearer "+s.keys[r]), "/tally.v1.LedgerService/"+method, req, resp)
		if c := status.Code(callErr); c == codes.Internal || c == codes.Unknown {
			t.Fatalf("%s as %s: %v (request %v)", method, r, callErr, req)
		}
		if callErr == nil {
			s.remember(resp)
		}
		var sum int64
		if err := s.env.Store.Pool().QueryRow(ctx, `SELECT coalesce(sum(balance), 0)::int8 FROM accounts WHERE currency = $1`, s.currency).Scan(&sum); err != nil {
			t.Fatal(err)
		}
		if sum != 0 {
			t.Fatalf("after %s as %s (%v): the currency's balances sum to %d", method, r, req, sum)
		}
	})
}
