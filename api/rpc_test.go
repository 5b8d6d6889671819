package api_test

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

func TestCreateAccountIsIdempotentWithID(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	cur := newCurrency()
	req := &tallyv1.CreateAccountRequest{
		AccountId: "01890000-0000-7000-8000-" + tallytestSuffix12(), Currency: cur, ExternalRef: "cust-42",
		CreditLimit: 10, Metadata: map[string]string{"plan": "pro", "region": "eu"},
	}
	a1, err := env.Raw.CreateAccount(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if a1.GetType() != tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER || a1.GetFloor() != tallyv1.Floor_FLOOR_NON_NEGATIVE ||
		a1.GetStatus() != tallyv1.AccountStatus_ACCOUNT_STATUS_ACTIVE || a1.GetVersion() != 0 {
		t.Fatalf("defaults: %v", a1)
	}
	a2, err := env.Raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{
		AccountId: req.AccountId, Currency: cur, ExternalRef: "cust-42", CreditLimit: 10,
		Metadata: map[string]string{"region": "eu", "plan": "pro"}, Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER,
	})
	if err != nil || a2.GetCreatedAt().AsTime() != a1.GetCreatedAt().AsTime() {
		t.Fatalf("same create again: %v %v", a2, err)
	}
	for _, mod := range []func(r *tallyv1.CreateAccountRequest){
		func(r *tallyv1.CreateAccountRequest) { r.CreditLimit = 11 },
		func(r *tallyv1.CreateAccountRequest) { r.ExternalRef = "cust-43" },
		func(r *tallyv1.CreateAccountRequest) { r.Metadata = map[string]string{"plan": "pro"} },
		func(r *tallyv1.CreateAccountRequest) { r.Floor = tallyv1.Floor_FLOOR_NONE; r.CreditLimit = 0 },
		func(r *tallyv1.CreateAccountRequest) { r.Currency = newCurrency() },
	} {
		r := &tallyv1.CreateAccountRequest{AccountId: req.AccountId, Currency: cur, ExternalRef: "cust-42", CreditLimit: 10,
			Metadata: map[string]string{"plan": "pro", "region": "eu"}}
		mod(r)
		_, err := env.Raw.CreateAccount(ctx, r)
		wantErr(t, err, codes.AlreadyExists, ledger.ReasonAccountExistsDifferent)
	}
	got, err := env.Raw.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: req.AccountId})
	if err != nil || got.GetExternalRef() != "cust-42" || got.GetMetadata()["plan"] != "pro" {
		t.Fatalf("GetAccount: %v %v", got, err)
	}
	_, err = env.Raw.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: "01890000-0000-7000-8000-000000000009"})
	wantErr(t, err, codes.NotFound, ledger.ReasonAccountNotFound)
}

func tallytestSuffix12() string { return newCurrency()[1:11] + "00" }

func TestFindAccountsPages(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	cur := newCurrency()
	ref := "ref-" + cur
	want := map[string]bool{}
	for range 7 {
		want[createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) { r.ExternalRef = ref }).GetAccountId()] = true
	}
	createAccount(t, env, cur) // no ref
	seen := map[string]bool{}
	token := ""
	pages := 0
	for {
		resp, err := env.Client.FindAccounts(ctx, &tallyv1.FindAccountsRequest{ExternalRef: ref, PageSize: 3, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, a := range resp.GetAccounts() {
			if seen[a.GetAccountId()] || !want[a.GetAccountId()] {
				t.Fatalf("unexpected or repeated account %s", a.GetAccountId())
			}
			seen[a.GetAccountId()] = true
		}
		token = resp.GetNextPageToken()
		if token == "" {
			break
		}
		if pages > 5 {
			t.Fatal("too many pages")
		}
	}
	if len(seen) != 7 || pages != 3 {
		t.Fatalf("found %d accounts in %d pages, want 7 in 3", len(seen), pages)
	}
	// Currency + type filters find the system accounts of the currency.
	resp, err := env.Client.FindAccounts(ctx, &tallyv1.FindAccountsRequest{Currency: cur, Type: tallyv1.AccountType_ACCOUNT_TYPE_REVENUE})
	if err != nil || len(resp.GetAccounts()) != 1 {
		t.Fatalf("revenue accounts of %s: %v %v", cur, resp, err)
	}
	// A token from one query is refused by another.
	r1, _ := env.Client.FindAccounts(ctx, &tallyv1.FindAccountsRequest{ExternalRef: ref, PageSize: 1})
	_, err = env.Raw.FindAccounts(ctx, &tallyv1.FindAccountsRequest{Currency: cur, PageSize: 1, PageToken: r1.GetNextPageToken()})
	wantErr(t, err, codes.InvalidArgument, ledger.ReasonInvalidArgument)
}

func TestListEntriesAndGetTransfer(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	a := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 100)
	var keys []string
	for i := range 5 {
		k := client.NewIdempotencyKey()
		keys = append(keys, k)
		if _, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a, Amount: int64(i + 1), IdempotencyKey: k, Description: "usage"}); err != nil {
			t.Fatal(err)
		}
	}
	var all []*tallyv1.Entry
	token := ""
	for {
		resp, err := env.Client.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, resp.GetEntries()...)
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if len(all) != 6 {
		t.Fatalf("%d entries, want 6", len(all))
	}
	running := int64(0)
	for i, e := range all {
		running += e.GetAmount()
		if e.GetSequence() != int64(i+1) || e.GetBalanceAfter() != running || e.GetVersionAfter() != int64(i+1) {
			t.Fatalf("entry %d: %v (running %d)", i, e, running)
		}
		if i > 0 && e.GetCreatedAt().AsTime().Before(all[i-1].GetCreatedAt().AsTime()) {
			t.Fatalf("entry %d dated before its predecessor", i)
		}
	}
	if running != 100-15 {
		t.Fatalf("final running balance %d", running)
	}
	// Time window: nothing before the first entry, everything up to far future.
	first := all[0].GetCreatedAt().AsTime()
	resp, err := env.Client.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, EndTime: timestamppb.New(first)})
	if err != nil || len(resp.GetEntries()) != 0 {
		t.Fatalf("entries before the first: %v %v", resp, err)
	}
	resp, err = env.Client.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, StartTime: timestamppb.New(first), EndTime: timestamppb.New(time.Now().Add(time.Hour))})
	if err != nil || len(resp.GetEntries()) != 6 {
		t.Fatalf("entries in window: %d %v", len(resp.GetEntries()), err)
	}
	_, err = env.Raw.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: "01890000-0000-7000-8000-000000000010"})
	wantErr(t, err, codes.NotFound, ledger.ReasonAccountNotFound)

	// GetTransfer by id and by key agree.
	byKey, err := env.Client.GetTransfer(ctx, &tallyv1.GetTransferRequest{IdempotencyKey: keys[2]})
	if err != nil || byKey.GetAmount() != 3 || byKey.GetDescription() != "usage" || byKey.GetKind() != tallyv1.TransferKind_TRANSFER_KIND_CHARGE {
		t.Fatalf("by key: %v %v", byKey, err)
	}
	byID, err := env.Client.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: byKey.GetTransferId()})
	if err != nil || byID.GetIdempotencyKey() != keys[2] || byID.GetDebitAccountId() != a {
		t.Fatalf("by id: %v %v", byID, err)
	}
	_, err = env.Raw.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: "01890000-0000-7000-8000-000000000011"})
	wantErr(t, err, codes.NotFound, ledger.ReasonTransferNotFound)
	_, err = env.Raw.GetTransfer(ctx, &tallyv1.GetTransferRequest{IdempotencyKey: "never-used-" + newCurrency()})
	wantErr(t, err, codes.NotFound, ledger.ReasonTransferNotFound)
}

func TestGetBalanceConsistency(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	a := createAccount(t, env, newCurrency(), func(r *tallyv1.CreateAccountRequest) { r.CreditLimit = 25 }).GetAccountId()
	res := credit(t, env, a, 100)
	v := res.GetBalance().GetVersion()
	// After a write the cache holds the new version (the refresh follows
	// the answer within moments): a cached read hits.
	var b *tallyv1.Balance
	var err error
	for deadline := time.Now().Add(time.Second); ; time.Sleep(5 * time.Millisecond) {
		b, err = env.Client.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a})
		if err != nil || b.GetBalance() != 100 || b.GetVersion() != v || b.GetAvailable() != 125 {
			t.Fatalf("cached read: %v %v", b, err)
		}
		if b.GetSource() == tallyv1.BalanceSource_BALANCE_SOURCE_CACHE {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cached read a second after the write: %v", b)
		}
	}
	b, err = env.Client.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	if err != nil || b.GetSource() != tallyv1.BalanceSource_BALANCE_SOURCE_STORE || b.GetBalance() != 100 {
		t.Fatalf("strong read: %v %v", b, err)
	}
	b, err = env.Client.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a, MinVersion: v})
	if err != nil || b.GetVersion() < v {
		t.Fatalf("min_version read: %v %v", b, err)
	}
	_, err = env.Raw.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a, MinVersion: v + 1})
	wantErr(t, err, codes.FailedPrecondition, ledger.ReasonVersionNotReached)
	_, err = env.Raw.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: "01890000-0000-7000-8000-000000000012"})
	wantErr(t, err, codes.NotFound, ledger.ReasonAccountNotFound)
}
