package api

import (
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Reconcile implements LedgerService.
func (s *Server) Reconcile(r *tallyv1.ReconcileRequest, stream tallyv1.LedgerService_ReconcileServer) error {
	ids := make([]uuid.UUID, 0, len(r.GetAccountIds()))
	if len(r.GetAccountIds()) > ledger.ReconcileAccountsMax {
		return invalidArg("account_ids", "too many account_ids")
	}
	for _, a := range r.GetAccountIds() {
		id, err := parseID("account_ids", a, true)
		if err != nil {
			return err
		}
		ids = append(ids, id)
	}
	var sendErr error
	send := func(m *tallyv1.ReconcileResponse) error {
		if err := stream.Send(m); err != nil {
			sendErr = err
			return err
		}
		return nil
	}
	sum, err := s.l.Reconcile(stream.Context(), ledger.ReconcileRequest{
		AccountIDs: ids, PageSize: int(r.GetPageSize()), RepairCache: r.GetRepairCache(),
		Provider: r.GetProvider(), ProviderFrom: timeOrZero(r.GetProviderFrom()), ProviderTo: timeOrZero(r.GetProviderTo()),
	}, func(f ledger.Finding) error {
		return send(&tallyv1.ReconcileResponse{Message: &tallyv1.ReconcileResponse_Finding{Finding: &tallyv1.ReconcileFinding{
			Check: f.Check, AccountId: idString(f.AccountID), TransferId: idString(f.TransferID), Currency: f.Currency,
			Detail: f.Detail, Repaired: f.Repaired,
		}}})
	}, func(checked, total int64) error {
		return send(&tallyv1.ReconcileResponse{Message: &tallyv1.ReconcileResponse_Progress{Progress: &tallyv1.ReconcileProgress{
			AccountsChecked: checked, AccountsTotal: total,
		}}})
	})
	if sendErr != nil {
		return sendErr // the stream broke; grpc reports it to nobody
	}
	if err != nil {
		return statusError(err)
	}
	return stream.Send(&tallyv1.ReconcileResponse{Message: &tallyv1.ReconcileResponse_Summary{Summary: &tallyv1.ReconcileSummary{
		AccountsChecked: sum.AccountsChecked, Findings: sum.Findings,
	}}})
}

func timeOrZero(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}
