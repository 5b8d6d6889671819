package api_test

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Every bad input gets its clear error, and the database is unchanged.
func TestBadInput(t *testing.T) {
	// Not parallel: it asserts global row counts.
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur).GetAccountId()
	b := createAccount(t, env, cur).GetAccountId()
	other := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, a, 1000)
	raw := env.Raw
	key := func() string { return client.NewIdempotencyKey() }
	bigMeta := map[string]string{}
	for i := range 33 {
		bigMeta[strings.Repeat("k", i+1)] = "v"
	}
	const unknown = "01890000-0000-7000-8000-000000000001"
	type tc struct {
		name   string
		call   func(ctx context.Context) error
		code   codes.Code
		reason string
	}
	charge := func(r *tallyv1.ChargeRequest) func(ctx context.Context) error {
		return func(ctx context.Context) error { _, err := raw.Charge(ctx, r); return err }
	}
	cases := []tc{
		{"amount zero", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 0, IdempotencyKey: key()}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"amount negative", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: -5, IdempotencyKey: key()}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"key missing", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"key overlong", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: strings.Repeat("k", 129)}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"key non-printable", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: "abc\x01def"}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"key non-ascii", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: "clé"}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"malformed uuid", charge(&tallyv1.ChargeRequest{AccountId: "not-a-uuid", Amount: 1, IdempotencyKey: key()}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"uuid without dashes", charge(&tallyv1.ChargeRequest{AccountId: strings.ReplaceAll(a, "-", ""), Amount: 1, IdempotencyKey: key()}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"malformed revenue uuid", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: key(), RevenueAccountId: "x"}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"unknown account", charge(&tallyv1.ChargeRequest{AccountId: unknown, Amount: 1, IdempotencyKey: key()}), codes.NotFound, ledger.ReasonAccountNotFound},
		{"unknown revenue account", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: key(), RevenueAccountId: unknown}), codes.NotFound, ledger.ReasonAccountNotFound},
		{"metadata too many keys", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: key(), Metadata: bigMeta}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"metadata key too long", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: key(), Metadata: map[string]string{strings.Repeat("k", 65): "v"}}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"metadata value too long", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: key(), Metadata: map[string]string{"k": strings.Repeat("v", 513)}}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"description too long", charge(&tallyv1.ChargeRequest{AccountId: a, Amount: 1, IdempotencyKey: key(), Description: strings.Repeat("d", 1025)}), codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"transfer same account", func(ctx context.Context) error {
			_, err := raw.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: a, Amount: 1, IdempotencyKey: key()})
			return err
		}, codes.InvalidArgument, ledger.ReasonSelfPosting},
		{"transfer currency mismatch", func(ctx context.Context) error {
			_, err := raw.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: other, Amount: 1, IdempotencyKey: "mismatch-" + key()})
			return err
		}, codes.FailedPrecondition, ledger.ReasonCurrencyMismatch},
		{"transfer missing credit account", func(ctx context.Context) error {
			_, err := raw.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a, Amount: 1, IdempotencyKey: key()})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"currency lowercase", func(ctx context.Context) error {
			_, err := raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "usd"})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"currency empty", func(ctx context.Context) error {
			_, err := raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: ""})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"currency too long", func(ctx context.Context) error {
			_, err := raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: strings.Repeat("A", 17)})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"credit limit negative", func(ctx context.Context) error {
			_, err := raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: cur, CreditLimit: -1})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"credit limit too large", func(ctx context.Context) error {
			_, err := raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: cur, CreditLimit: ledger.CreditLimitMax + 1})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"account metadata too many keys", func(ctx context.Context) error {
			_, err := raw.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: cur, Metadata: bigMeta})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"page size negative", func(ctx context.Context) error {
			_, err := raw.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, PageSize: -1})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"page size over 1000", func(ctx context.Context) error {
			_, err := raw.FindAccounts(ctx, &tallyv1.FindAccountsRequest{Currency: cur, PageSize: 1001})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"garbled page token", func(ctx context.Context) error {
			_, err := raw.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, PageToken: "%%%garbage"})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"forged page token", func(ctx context.Context) error {
			// Valid base64 JSON, but the checksum does not match.
			_, err := raw.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, PageToken: "eyJ2IjoxLCJhIjoiIiwicyI6MSwiYyI6IngifQ"})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"min_version negative", func(ctx context.Context) error {
			_, err := raw.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a, MinVersion: -1})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"get transfer with both id and key", func(ctx context.Context) error {
			_, err := raw.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: a, IdempotencyKey: "k"})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
		{"invalid timestamp", func(ctx context.Context) error {
			_, err := raw.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: a, StartTime: &timestamppb.Timestamp{Seconds: 1, Nanos: -1}})
			return err
		}, codes.InvalidArgument, ledger.ReasonInvalidArgument},
	}
	before := env.Count(t)
	// The currency-mismatch case is a recorded business rejection; every
	// other case must record nothing at all.
	for _, c := range cases {
		err := c.call(ctxT(t))
		if err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		t.Run(c.name, func(t *testing.T) { wantErr(t, err, c.code, c.reason) })
	}
	after := env.Count(t)
	if after.Accounts != before.Accounts || after.Transfers != before.Transfers || after.Entries != before.Entries || after.Keys != before.Keys+1 {
		t.Fatalf("rows changed: %+v -> %+v (want only the currency-mismatch key recorded)", before, after)
	}
	if bb := strongBalance(t, env, a); bb.GetBalance() != 1000 || bb.GetVersion() != 1 {
		t.Fatalf("balance changed: %v", bb)
	}
	_ = b
}
