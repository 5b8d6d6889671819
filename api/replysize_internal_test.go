package api

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/proto"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// The ledger's reply estimates (ledger/replysize.go) must be upper bounds of
// the protobuf this package makes of the same values, or a batch the ledger
// lets through could still be too large to send.
func TestHostileReplyEstimatesAreUpperBounds(t *testing.T) {
	id := uuid.MustParse("ffffffff-ffff-4fff-bfff-ffffffffffff")
	far := time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)
	big := int64(math.MinInt64) // the longest varint
	for _, n := range []int{0, 1, 32, 200} {
		md := map[string]string{}
		for i := 0; i < n; i++ {
			md[strings.Repeat("é", 32)+string(rune('a'+i%26))+strings.Repeat("k", i)] = strings.Repeat("€", 170+i)
		}
		s := strings.Repeat("ü", 512*(n%3+1))
		tr := ledger.Transfer{ID: id, IdempotencyKey: strings.Repeat("k", 128), Kind: ledger.KindCapture, DebitAccountID: id,
			CreditAccountID: id, Amount: big, Currency: strings.Repeat("Z", 16), Description: s, Metadata: md, CreatedAt: far,
			CreatedByClient: id, CreatedByKey: "cert:" + strings.Repeat("c", 64), RefundOf: id, HoldID: id, ThresholdCrossed: true, Refunded: big}
		h := ledger.Hold{ID: id, IdempotencyKey: tr.IdempotencyKey, AccountID: id, RevenueAccountID: id, Amount: big, Currency: tr.Currency,
			Status: ledger.HoldCaptured, ExpiresAt: far, CapturedAmount: big, CaptureTransferID: id, Description: s, Metadata: md,
			CreatedAt: far, FinalizedAt: &far, CreatedByClient: id, CreatedByKey: tr.CreatedByKey}
		b := ledger.Balance{AccountID: id, Currency: tr.Currency, Balance: big, Available: big, CreditLimit: big, Version: big,
			Source: ledger.SourceStore, AsOf: far, Held: big, Final: true}
		r := ledger.TransferResult{Transfer: tr, Balance: b, Replayed: true, Hold: &h, ThresholdCrossed: true}
		if got, est := proto.Size(holdResultPB(r)), ledger.ResultBytes(r); got > est {
			t.Errorf("metadata %d: HoldResult is %d bytes, estimated %d", n, got, est)
		}
		r.Hold = nil
		if got, est := proto.Size(resultPB(r)), ledger.ResultBytes(r); got > est {
			t.Errorf("metadata %d: TransferResult is %d bytes, estimated %d", n, got, est)
		}
		thr := big
		a := ledger.Account{ID: id, Currency: tr.Currency, Type: ledger.AccountTypeFunding, ExternalRef: strings.Repeat("r", 256),
			Floor: ledger.FloorNone, CreditLimit: big, Status: ledger.StatusClosed, Metadata: md, CreatedAt: far, Version: big, LowBalanceThreshold: &thr}
		// In a page: the repeated field's tag and length are in the estimate's
		// per-item overhead (8 bytes).
		if got, est := proto.Size(&tallyv1.FindAccountsResponse{Accounts: []*tallyv1.Account{accountPB(a)}}), ledger.AccountBytes(a)+8; got > est {
			t.Errorf("metadata %d: Account is %d bytes, estimated %d", n, got, est)
		}
		e := ledger.Entry{TransferID: id, AccountID: id, Sequence: big, Amount: big, BalanceAfter: big, VersionAfter: big, CreatedAt: far,
			CreatedByClient: id, CreatedByKey: tr.CreatedByKey, Kind: ledger.KindRelease}
		if got, est := proto.Size(&tallyv1.ListEntriesResponse{Entries: []*tallyv1.Entry{entryPB(e)}}), ledger.EntryBytes(e)+8; got > est {
			t.Errorf("Entry is %d bytes, estimated %d", got, est)
		}
		if got, est := proto.Size(&tallyv1.GetBalancesResponse{Balances: []*tallyv1.Balance{balancePB(b)}}), ledger.BalanceBytesMax+8; got > est {
			t.Errorf("Balance is %d bytes, estimated %d", got, est)
		}
	}
}
