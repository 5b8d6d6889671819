package api

import (
	"encoding/json"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Defaults of the change feed's limits.
const (
	// ExportPollIntervalDefault is how often a following stream looks for
	// new events once it has caught up.
	ExportPollIntervalDefault = 200 * time.Millisecond
	// ExportStreamDurationMaxDefault bounds one following stream; the client
	// resumes from its last cursor (api/client and tally export do).
	ExportStreamDurationMaxDefault = 10 * time.Minute
)

// ExportTransfers implements LedgerService: the gap-free change feed.
func (s *Server) ExportTransfers(r *tallyv1.ExportTransfersRequest, stream tallyv1.LedgerService_ExportTransfersServer) error {
	ctx := stream.Context()
	poll, durMax := s.ExportPollInterval, s.ExportStreamDurationMax
	if poll <= 0 {
		poll = ExportPollIntervalDefault
	}
	if durMax <= 0 {
		durMax = ExportStreamDurationMaxDefault
	}
	deadline := time.Now().Add(durMax)
	cursor := r.GetCursor()
	for {
		events, next, err := s.l.ReadEvents(ctx, cursor, ledger.ExportPageSizeMaxDefault)
		if err != nil {
			return statusError(err)
		}
		for _, e := range events {
			if err := stream.Send(eventPB(e)); err != nil {
				return err
			}
		}
		cursor = next
		if len(events) == ledger.ExportPageSizeMaxDefault {
			continue // more backlog
		}
		if !r.GetFollow() || time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return statusError(ctx.Err())
		case <-time.After(poll):
		}
	}
}

func eventPB(e ledger.Event) *tallyv1.ExportTransfersResponse {
	out := &tallyv1.ExportTransfersResponse{Cursor: e.Cursor, CreatedAt: timestamppb.New(e.CreatedAt)}
	switch {
	case e.Transfer != nil:
		out.Event = &tallyv1.ExportTransfersResponse_Transfer{Transfer: transferPB(*e.Transfer)}
	case e.Hold != nil:
		out.Event = &tallyv1.ExportTransfersResponse_Hold{Hold: holdPB(*e.Hold)}
	case e.AccountChange != nil:
		c := e.AccountChange
		before, _ := json.Marshal(c.Before)
		after, _ := json.Marshal(c.After)
		out.Event = &tallyv1.ExportTransfersResponse_AccountChange{AccountChange: &tallyv1.AccountChangeEvent{
			AccountId: c.AccountID.String(), Action: c.Action, VersionAfter: c.VersionAfter,
			BeforeJson: string(before), AfterJson: string(after), CreatedByClientId: idString(c.CreatedByClient),
			CreatedByKeyId: c.CreatedByKey, CreatedAt: timestamppb.New(c.CreatedAt),
		}}
	case e.LowBalance != nil:
		lb := e.LowBalance
		out.Event = &tallyv1.ExportTransfersResponse_LowBalance{LowBalance: &tallyv1.LowBalanceEvent{
			AccountId: lb.AccountID.String(), TransferId: idString(lb.TransferID), HoldId: idString(lb.HoldID),
			Available: lb.Available, Threshold: lb.Threshold, CreatedAt: timestamppb.New(lb.CreatedAt),
		}}
	}
	return out
}
