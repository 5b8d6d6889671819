package api

import (
	"context"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// SummarizeUsage implements LedgerService: a spend breakdown from the
// rollups.
func (s *Server) SummarizeUsage(ctx context.Context, r *tallyv1.SummarizeUsageRequest) (*tallyv1.SummarizeUsageResponse, error) {
	acct, err := parseID("account_id", r.GetAccountId(), false)
	if err != nil {
		return nil, err
	}
	from, to, err := ledger.ParseUsageDays(r.GetFromDay(), r.GetToDay())
	if err != nil {
		return nil, statusError(err)
	}
	sum, err := s.l.SummarizeUsage(ctx, ledger.UsageQuery{
		AccountID: acct, ExternalRef: r.GetExternalRef(), From: from, To: to, GroupBy: r.GetGroupBy(),
	})
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.SummarizeUsageResponse{Dimensions: sum.Dimensions, Rows: make([]*tallyv1.UsageRow, 0, len(sum.Rows))}
	for _, u := range sum.Rows {
		row := &tallyv1.UsageRow{
			Currency: u.Currency, AccountId: idString(u.AccountID), RevenueAccountId: idString(u.RevenueAccountID),
			Period: u.Period, Dimensions: u.Dimensions, Charged: u.Charged, Refunded: u.Refunded, Net: u.Net,
			Charges: u.Charges, Refunds: u.Refunds,
		}
		out.Rows = append(out.Rows, row)
	}
	return out, nil
}
