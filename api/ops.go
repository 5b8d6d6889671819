package api

import (
	"context"
	"strconv"
	"time"

	"github.com/google/uuid"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// SubmitBatchBytesMaxDefault bounds a SubmitBatch request's encoded size. It
// stays below MsgBytesMaxDefault so a batch that is too big gets a clear
// INVALID_ARGUMENT naming this limit rather than a transport error.
const SubmitBatchBytesMaxDefault = 3 << 20

// Refund implements LedgerService.
func (s *Server) Refund(ctx context.Context, r *tallyv1.RefundRequest) (*tallyv1.TransferResult, error) {
	res, err := apply(ctx, s, r, refundMove)
	if err != nil {
		return nil, err
	}
	return resultPB(res), nil
}

func refundMove(r *tallyv1.RefundRequest) (ledger.MoveRequest, error) {
	charge, err := parseID("transfer_id", r.GetTransferId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	return ledger.MoveRequest{Kind: ledger.KindRefund, ChargeID: charge, Amount: r.GetAmount(),
		IdempotencyKey: r.GetIdempotencyKey(), Description: r.GetReason(), Metadata: r.GetMetadata()}, nil
}

// Hold implements LedgerService.
func (s *Server) Hold(ctx context.Context, r *tallyv1.HoldRequest) (*tallyv1.HoldResult, error) {
	res, err := apply(ctx, s, r, holdMove)
	if err != nil {
		return nil, err
	}
	return holdResultPB(res), nil
}

func holdMove(r *tallyv1.HoldRequest) (ledger.MoveRequest, error) {
	acct, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	rev, err := parseID("revenue_account_id", r.GetRevenueAccountId(), false)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	at, err := parseTime("expires_at", r.GetExpiresAt())
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	in := r.GetExpiresInSeconds()
	if in < 0 || in > int64(365*24*time.Hour/time.Second) {
		return ledger.MoveRequest{}, invalidArg("expires_in_seconds", "expires_in_seconds is out of range")
	}
	return ledger.MoveRequest{Kind: ledger.KindHold, AccountID: acct, Counterparty: rev, Amount: r.GetAmount(),
		IdempotencyKey: r.GetIdempotencyKey(), Description: r.GetDescription(), Metadata: r.GetMetadata(),
		ExpiresAt: at, ExpiresIn: time.Duration(in) * time.Second}, nil
}

// CaptureHold implements LedgerService.
func (s *Server) CaptureHold(ctx context.Context, r *tallyv1.CaptureHoldRequest) (*tallyv1.HoldResult, error) {
	res, err := apply(ctx, s, r, captureMove)
	if err != nil {
		return nil, err
	}
	return holdResultPB(res), nil
}

func captureMove(r *tallyv1.CaptureHoldRequest) (ledger.MoveRequest, error) {
	id, err := parseID("hold_id", r.GetHoldId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	return ledger.MoveRequest{Kind: ledger.KindCapture, HoldID: id, Amount: r.GetAmount(), IdempotencyKey: r.GetIdempotencyKey()}, nil
}

// ReleaseHold implements LedgerService.
func (s *Server) ReleaseHold(ctx context.Context, r *tallyv1.ReleaseHoldRequest) (*tallyv1.HoldResult, error) {
	res, err := apply(ctx, s, r, releaseMove)
	if err != nil {
		return nil, err
	}
	return holdResultPB(res), nil
}

func releaseMove(r *tallyv1.ReleaseHoldRequest) (ledger.MoveRequest, error) {
	id, err := parseID("hold_id", r.GetHoldId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	return ledger.MoveRequest{Kind: ledger.KindRelease, HoldID: id, IdempotencyKey: r.GetIdempotencyKey()}, nil
}

// GetHold implements LedgerService.
func (s *Server) GetHold(ctx context.Context, r *tallyv1.GetHoldRequest) (*tallyv1.Hold, error) {
	id, err := parseID("hold_id", r.GetHoldId(), true)
	if err != nil {
		return nil, err
	}
	h, err := s.l.GetHold(ctx, id)
	if me, chargerOnly := ownOnly(ctx); err == nil && chargerOnly && h.CreatedByClient != me.ClientID {
		// As GetTransfer: another client's hold does not exist for a charger.
		err = &ledger.Error{Code: ledger.CodeNotFound, Reason: ledger.ReasonHoldNotFound, Message: "hold " + id.String() + " not found"}
	}
	if err != nil {
		return nil, statusError(err)
	}
	return holdPB(h), nil
}

// SubmitBatch implements LedgerService. A charger may batch what it may call
// one by one (charges, holds, captures, releases, refunds), not credits or
// transfers.
func (s *Server) SubmitBatch(ctx context.Context, r *tallyv1.SubmitBatchRequest) (*tallyv1.SubmitBatchResponse, error) {
	if n := proto.Size(r); n > s.submitBatchBytesMax() {
		return nil, invalidArg("operations", "the batch is larger than the limit of bytes per batch (--submit-batch-bytes-max)")
	}
	mode := ledger.BatchMode(r.GetMode())
	p, authed := auth.FromContext(ctx)
	items := make([]ledger.MoveRequest, 0, len(r.GetOperations()))
	for i, op := range r.GetOperations() {
		var m ledger.MoveRequest
		var err error
		switch o := op.GetOp().(type) {
		case *tallyv1.BatchOperation_Charge:
			m, err = chargeMove(o.Charge)
		case *tallyv1.BatchOperation_Credit:
			m, err = creditMove(o.Credit)
		case *tallyv1.BatchOperation_Transfer:
			m, err = transferMove(o.Transfer)
		case *tallyv1.BatchOperation_Hold:
			m, err = holdMove(o.Hold)
		case *tallyv1.BatchOperation_CaptureHold:
			m, err = captureMove(o.CaptureHold)
		case *tallyv1.BatchOperation_ReleaseHold:
			m, err = releaseMove(o.ReleaseHold)
		case *tallyv1.BatchOperation_Refund:
			m, err = refundMove(o.Refund)
		default:
			return nil, invalidArg("operations", "operation "+strconv.Itoa(i)+" is empty")
		}
		if err != nil {
			return nil, err
		}
		if authed && p.Role == auth.RoleCharger && (m.Kind == ledger.KindCredit || m.Kind == ledger.KindTransfer) {
			return nil, newStatus(codes.PermissionDenied, ReasonPermissionDenied,
				"role charger may not batch credits or transfers", nil)
		}
		items = append(items, moveRequest(ctx, m))
	}
	res, err := s.l.SubmitBatch(ctx, ledger.BatchRequest{Scope: scope(ctx), Key: r.GetBatchKey(), Mode: mode, Items: items})
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.SubmitBatchResponse{Applied: res.Applied, FailedIndex: int32(res.FailedIndex), Replayed: res.Replayed}
	for i, it := range res.Items {
		switch {
		case it.Error != nil:
			st := codeOf[it.Error.Code]
			out.Results = append(out.Results, &tallyv1.BatchOperationResult{Outcome: &tallyv1.BatchOperationResult_Error{
				Error: &tallyv1.BatchError{Code: int32(st), Reason: it.Error.Reason, Message: it.Error.Message}}})
		case items[i].Kind == ledger.KindHold || items[i].Kind == ledger.KindCapture || items[i].Kind == ledger.KindRelease:
			out.Results = append(out.Results, &tallyv1.BatchOperationResult{Outcome: &tallyv1.BatchOperationResult_Hold{
				Hold: holdResultPB(*it.Result)}})
		default:
			out.Results = append(out.Results, &tallyv1.BatchOperationResult{Outcome: &tallyv1.BatchOperationResult_Transfer{
				Transfer: resultPB(*it.Result)}})
		}
	}
	return out, nil
}

func (s *Server) submitBatchBytesMax() int {
	if s.SubmitBatchBytesMax > 0 {
		return s.SubmitBatchBytesMax
	}
	return SubmitBatchBytesMaxDefault
}

// FreezeAccount implements LedgerService.
func (s *Server) FreezeAccount(ctx context.Context, r *tallyv1.FreezeAccountRequest) (*tallyv1.Account, error) {
	return s.changeAccount(ctx, ledger.KindFreeze, r.GetAccountId(), ledger.MoveRequest{Reason: r.GetReason()})
}

// UnfreezeAccount implements LedgerService.
func (s *Server) UnfreezeAccount(ctx context.Context, r *tallyv1.UnfreezeAccountRequest) (*tallyv1.Account, error) {
	return s.changeAccount(ctx, ledger.KindUnfreeze, r.GetAccountId(), ledger.MoveRequest{Reason: r.GetReason()})
}

// CloseAccount implements LedgerService.
func (s *Server) CloseAccount(ctx context.Context, r *tallyv1.CloseAccountRequest) (*tallyv1.Account, error) {
	return s.changeAccount(ctx, ledger.KindClose, r.GetAccountId(), ledger.MoveRequest{})
}

// UpdateAccount implements LedgerService.
func (s *Server) UpdateAccount(ctx context.Context, r *tallyv1.UpdateAccountRequest) (*tallyv1.Account, error) {
	var m ledger.MoveRequest
	if r.CreditLimit != nil {
		cl := r.GetCreditLimit()
		m.NewCreditLimit = &cl
	}
	if r.GetUpdateMetadata() {
		m.NewMetadata = r.GetMetadata()
		if m.NewMetadata == nil {
			m.NewMetadata = map[string]string{}
		}
	} else if len(r.GetMetadata()) > 0 {
		return nil, invalidArg("update_metadata", "set update_metadata to replace metadata")
	}
	if r.LowBalanceThreshold != nil {
		if r.GetClearLowBalanceThreshold() {
			return nil, invalidArg("clear_low_balance_threshold", "set low_balance_threshold or clear it, not both")
		}
		t := r.GetLowBalanceThreshold()
		m.NewThreshold = &t
	}
	m.ClearThreshold = r.GetClearLowBalanceThreshold()
	return s.changeAccount(ctx, ledger.KindUpdate, r.GetAccountId(), m)
}

func (s *Server) changeAccount(ctx context.Context, kind ledger.Kind, accountID string, m ledger.MoveRequest) (*tallyv1.Account, error) {
	id, err := parseID("account_id", accountID, true)
	if err != nil {
		return nil, err
	}
	m.Kind, m.AccountID = kind, id
	a, err := s.l.ChangeAccount(ctx, moveRequest(ctx, m))
	if err != nil {
		return nil, statusError(err)
	}
	return accountPB(a), nil
}

// GetBalances implements LedgerService.
func (s *Server) GetBalances(ctx context.Context, r *tallyv1.GetBalancesRequest) (*tallyv1.GetBalancesResponse, error) {
	if n := len(r.GetAccountIds()); n > s.l.Limits().BalancesAccountsMax {
		return nil, invalidArg("account_ids", "too many account_ids (--balances-accounts-max)")
	}
	ids := make([]uuid.UUID, 0, len(r.GetAccountIds()))
	for _, a := range r.GetAccountIds() {
		id, err := parseID("account_ids", a, true)
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	at, err := parseTime("at", r.GetAt())
	if err != nil {
		return nil, err
	}
	bs, err := s.l.GetBalances(ctx, ids, at)
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.GetBalancesResponse{Balances: make([]*tallyv1.Balance, len(bs))}
	for i, b := range bs {
		out.Balances[i] = balancePB(b)
	}
	return out, nil
}

func holdPB(h ledger.Hold) *tallyv1.Hold {
	out := &tallyv1.Hold{
		HoldId: h.ID.String(), IdempotencyKey: h.IdempotencyKey, AccountId: h.AccountID.String(),
		RevenueAccountId: idString(h.RevenueAccountID), Amount: h.Amount, Currency: h.Currency,
		Status: tallyv1.HoldStatus(h.Status), ExpiresAt: timestamppb.New(h.ExpiresAt), CapturedAmount: h.CapturedAmount,
		CaptureTransferId: idString(h.CaptureTransferID), Description: h.Description, Metadata: h.Metadata,
		CreatedAt: timestamppb.New(h.CreatedAt), CreatedByClientId: idString(h.CreatedByClient), CreatedByKeyId: h.CreatedByKey,
	}
	if h.FinalizedAt != nil {
		out.FinalizedAt = timestamppb.New(*h.FinalizedAt)
	}
	return out
}

func holdResultPB(r ledger.TransferResult) *tallyv1.HoldResult {
	out := &tallyv1.HoldResult{Balance: balancePB(r.Balance), Replayed: r.Replayed, ThresholdCrossed: r.ThresholdCrossed}
	if r.Hold != nil {
		out.Hold = holdPB(*r.Hold)
	}
	if r.Transfer.ID != uuid.Nil {
		out.Transfer = transferPB(r.Transfer)
	}
	return out
}
