package api

import (
	"context"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// SetAutoTopUp implements LedgerService.
func (s *Server) SetAutoTopUp(ctx context.Context, r *tallyv1.SetAutoTopUpRequest) (*tallyv1.AutoTopUp, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	req := ledger.SetAutoTopUpRequest{Rule: ledger.AutoTopUp{
		AccountID: id, Enabled: r.GetEnabled(), Threshold: r.GetThreshold(), TargetBalance: r.GetTargetBalance(),
		AmountMax: r.GetAmountMax(), PerDayMax: r.GetPerDayMax(), ProviderCustomerID: r.GetProviderCustomerId(),
		PaymentMethodID: r.GetPaymentMethodId(),
	}}
	if p, ok := auth.FromContext(ctx); ok {
		req.CreatedByClient, req.CreatedByKey, req.Restrict = p.ClientID, p.KeyID, restrictOf(p.Role)
	}
	rule, err := s.l.SetAutoTopUp(ctx, req)
	if err != nil {
		return nil, statusError(err)
	}
	return autoTopUpPB(rule), nil
}

// GetAutoTopUp implements LedgerService.
func (s *Server) GetAutoTopUp(ctx context.Context, r *tallyv1.GetAutoTopUpRequest) (*tallyv1.AutoTopUp, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	rule, err := s.l.GetAutoTopUp(ctx, id)
	if err != nil {
		return nil, statusError(err)
	}
	return autoTopUpPB(rule), nil
}

// ListTopUps implements LedgerService.
func (s *Server) ListTopUps(ctx context.Context, r *tallyv1.ListTopUpsRequest) (*tallyv1.ListTopUpsResponse, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	if r.GetPageSize() < 0 {
		return nil, invalidArg("page_size", "page_size must not be negative")
	}
	xs, next, err := s.l.ListTopUps(ctx, id, int(r.GetPageSize()), r.GetPageToken())
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.ListTopUpsResponse{NextPageToken: next}
	for _, x := range xs {
		out.Topups = append(out.Topups, topUpPB(x))
	}
	return out, nil
}

func autoTopUpPB(r ledger.AutoTopUp) *tallyv1.AutoTopUp {
	return &tallyv1.AutoTopUp{
		AccountId: r.AccountID.String(), Enabled: r.Enabled, Threshold: r.Threshold, TargetBalance: r.TargetBalance,
		AmountMax: r.AmountMax, PerDayMax: r.PerDayMax, ProviderCustomerId: r.ProviderCustomerID,
		PaymentMethodId: r.PaymentMethodID, ConsecutiveFailures: r.ConsecutiveFailures,
		DisabledReason: r.DisabledReason, UpdatedAt: timestamppb.New(r.UpdatedAt),
	}
}

func topUpPB(x ledger.TopUp) *tallyv1.TopUp {
	out := &tallyv1.TopUp{
		TopupId: x.ID.String(), AccountId: x.AccountID.String(), Status: tallyv1.TopUpStatus(x.Status),
		Amount: x.Amount, Currency: x.Currency, ProviderPaymentId: x.ProviderPaymentID,
		CreditTransferId: idString(x.CreditTransferID), TriggerTransferId: idString(x.TriggerTransferID),
		TriggerHoldId: idString(x.TriggerHoldID), FailureCode: x.FailureCode, FailureReason: x.FailureReason,
		Attempts: x.Attempts, CreatedAt: timestamppb.New(x.CreatedAt), UpdatedAt: timestamppb.New(x.UpdatedAt),
		ProviderCustomerId: x.ProviderCustomerID, PaymentMethodId: x.PaymentMethodID,
	}
	if x.FinishedAt != nil {
		out.FinishedAt = timestamppb.New(*x.FinishedAt)
	}
	return out
}
