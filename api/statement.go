package api

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// GetStatement implements LedgerService.
func (s *Server) GetStatement(ctx context.Context, r *tallyv1.GetStatementRequest) (*tallyv1.Statement, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	from, err := requiredTime("from", r.GetFrom())
	if err != nil {
		return nil, err
	}
	to, err := requiredTime("to", r.GetTo())
	if err != nil {
		return nil, err
	}
	st, err := s.l.GetStatement(ctx, ledger.StatementQuery{
		AccountID: id, From: from, To: to, PageSize: int(r.GetPageSize()), PageToken: r.GetPageToken(),
	})
	if err != nil {
		return nil, statusError(err)
	}
	return statementPB(st), nil
}

// requiredTime parses a timestamp that must be set.
func requiredTime(field string, ts *timestamppb.Timestamp) (time.Time, error) {
	t, err := parseTime(field, ts)
	if err != nil {
		return time.Time{}, err
	}
	if t == nil {
		return time.Time{}, invalidArg(field, field+" is required")
	}
	return *t, nil
}

func statementPB(st ledger.Statement) *tallyv1.Statement {
	out := &tallyv1.Statement{
		AccountId: st.AccountID.String(), Currency: st.Currency, From: timestamppb.New(st.From), To: timestamppb.New(st.To),
		OpeningBalance: st.Opening, ClosingBalance: st.Closing, Final: st.Final, NextPageToken: st.NextPageToken,
	}
	for _, l := range st.Lines {
		out.Lines = append(out.Lines, &tallyv1.StatementLine{
			CreatedAt: timestamppb.New(l.CreatedAt), Kind: tallyv1.TransferKind(l.Kind), Description: l.Description,
			Amount: l.Amount, RunningBalance: l.RunningBalance, TransferId: l.TransferID.String(),
			CreatedByClientId: idString(l.CreatedByClient), CreatedByKeyId: l.CreatedByKey,
			ShardId: idString(l.ShardID), Sequence: l.Sequence,
		})
	}
	for _, t := range st.Totals {
		out.Totals = append(out.Totals, &tallyv1.StatementTotal{
			Kind: tallyv1.TransferKind(t.Kind), Count: t.Count, Credits: t.Credits, Debits: t.Debits,
		})
	}
	return out
}

// ListOpenHolds implements LedgerService.
func (s *Server) ListOpenHolds(ctx context.Context, r *tallyv1.ListOpenHoldsRequest) (*tallyv1.ListOpenHoldsResponse, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	hs, next, err := s.l.ListOpenHolds(ctx, id, int(r.GetPageSize()), r.GetPageToken())
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.ListOpenHoldsResponse{NextPageToken: next}
	for _, h := range hs {
		out.Holds = append(out.Holds, holdPB(h))
	}
	return out, nil
}

// ListRefunds implements LedgerService.
func (s *Server) ListRefunds(ctx context.Context, r *tallyv1.ListRefundsRequest) (*tallyv1.ListRefundsResponse, error) {
	id, err := parseID("transfer_id", r.GetTransferId(), true)
	if err != nil {
		return nil, err
	}
	ts, next, err := s.l.ListRefunds(ctx, id, int(r.GetPageSize()), r.GetPageToken())
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.ListRefundsResponse{NextPageToken: next}
	for _, t := range ts {
		out.Refunds = append(out.Refunds, transferPB(t))
	}
	return out, nil
}
