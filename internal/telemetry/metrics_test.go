package telemetry

import (
	"context"
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

func withInfo(t *testing.T, c codes.Code, reason string, md map[string]string) error {
	t.Helper()
	st, err := status.New(c, "x").WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "tally.v1", Metadata: md})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

// The outcome interceptor counts errors by ErrorInfo reason (UNSPECIFIED
// without one), replays of postings and of recorded rejections, and charge
// amounts of first-time charges only.
func TestOutcomeInterceptor(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry())
	call := func(method string, resp any, err error) {
		info := &grpc.UnaryServerInfo{FullMethod: method}
		_, _ = m.outcomeUnary(context.Background(), nil, info, func(context.Context, any) (any, error) { return resp, err })
	}
	charge := tallyv1.LedgerService_Charge_FullMethodName
	credit := tallyv1.LedgerService_Credit_FullMethodName
	transfer := func(kind tallyv1.TransferKind, amount int64) *tallyv1.Transfer {
		return &tallyv1.Transfer{Kind: kind, Amount: amount, Currency: "EUR"}
	}
	res := func(amount int64, replayed bool) *tallyv1.TransferResult {
		return &tallyv1.TransferResult{Transfer: transfer(tallyv1.TransferKind_TRANSFER_KIND_CHARGE, amount), Replayed: replayed}
	}
	call(charge, res(100, false), nil)
	call(charge, res(100, true), nil)
	call(charge, res(7, false), nil)
	call(credit, &tallyv1.TransferResult{Transfer: transfer(tallyv1.TransferKind_TRANSFER_KIND_CREDIT, 1000)}, nil) // not a charge
	call(tallyv1.LedgerService_Refund_FullMethodName, &tallyv1.TransferResult{Transfer: transfer(tallyv1.TransferKind_TRANSFER_KIND_REFUND, 5)}, nil)
	call(tallyv1.LedgerService_CaptureHold_FullMethodName, &tallyv1.HoldResult{Transfer: transfer(tallyv1.TransferKind_TRANSFER_KIND_CHARGE, 1000)}, nil)
	batch := func(applied, replayed bool) *tallyv1.SubmitBatchResponse {
		return &tallyv1.SubmitBatchResponse{Applied: applied, Replayed: replayed, Results: []*tallyv1.BatchOperationResult{
			{Outcome: &tallyv1.BatchOperationResult_Transfer{Transfer: res(10000, false)}},
			{Outcome: &tallyv1.BatchOperationResult_Transfer{Transfer: res(100000, true)}}, // an item replayed
			{Outcome: &tallyv1.BatchOperationResult_Hold{Hold: &tallyv1.HoldResult{}}},     // a hold: no transfer
		}}
	}
	call(tallyv1.LedgerService_SubmitBatch_FullMethodName, batch(true, false), nil)
	call(tallyv1.LedgerService_SubmitBatch_FullMethodName, batch(true, true), nil)   // the batch replayed
	call(tallyv1.LedgerService_SubmitBatch_FullMethodName, batch(false, false), nil) // ATOMIC, failed
	call(charge, nil, withInfo(t, codes.FailedPrecondition, "INSUFFICIENT_FUNDS", nil))
	call(charge, nil, withInfo(t, codes.FailedPrecondition, "INSUFFICIENT_FUNDS", map[string]string{"replayed": "true"}))
	call(credit, nil, errors.New("not a status"))

	for _, c := range []struct {
		got  float64
		want float64
		what string
	}{
		{testutil.ToFloat64(m.chargedUnits.WithLabelValues("EUR")), 100 + 7 + 1000 + 10000, "charged EUR"},
		{testutil.ToFloat64(m.refundedUnits.WithLabelValues("EUR")), 5, "refunded EUR"},
		{testutil.ToFloat64(m.replays.WithLabelValues("Charge")), 2, "Charge replays"},
		{testutil.ToFloat64(m.replays.WithLabelValues("SubmitBatch")), 1, "SubmitBatch replays"},
		{testutil.ToFloat64(m.replays.WithLabelValues("Credit")), 0, "Credit replays"},
		{testutil.ToFloat64(m.rejections.WithLabelValues("Charge", "FailedPrecondition", "INSUFFICIENT_FUNDS")), 2, "INSUFFICIENT_FUNDS"},
		{testutil.ToFloat64(m.rejections.WithLabelValues("Credit", "Unknown", "UNSPECIFIED")), 1, "Credit UNSPECIFIED"},
		{float64(testutil.CollectAndCount(m.chargeAmount)), 1, "charge amount series"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
}

func TestNewTracingRejectsBadConfig(t *testing.T) {
	if _, err := NewTracing(context.Background(), TracingConfig{}); err == nil {
		t.Error("no endpoint accepted")
	}
	if _, err := NewTracing(context.Background(), TracingConfig{Endpoint: "127.0.0.1:4317", SampleRatio: 2}); err == nil {
		t.Error("sample ratio 2 accepted")
	}
}
