package api

import (
	"encoding/json"
	"time"

	"github.com/tallyledger/tally/auth"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Defaults of the change feed's limits.
const (
	// ExportPollIntervalDefault is how often the server's one feed watcher
	// looks for new events while a following stream is caught up.
	ExportPollIntervalDefault = 200 * time.Millisecond
	// ExportStreamDurationMaxDefault bounds one following stream; the client
	// resumes from its last cursor (api/client and tally export do).
	ExportStreamDurationMaxDefault = 10 * time.Minute
)

// ExportTransfers implements LedgerService: the gap-free change feed. A
// following stream counts against the per-key and per-server caps; once
// caught up it waits on the server's one feed watcher (feedHub) instead
// of polling PostgreSQL itself.
func (s *Server) ExportTransfers(r *tallyv1.ExportTransfersRequest, stream tallyv1.LedgerService_ExportTransfersServer) error {
	ctx := stream.Context()
	durMax := s.ExportStreamDurationMax
	if durMax <= 0 {
		durMax = ExportStreamDurationMaxDefault
	}
	deadline := time.Now().Add(durMax)
	var hub *feedHub
	if r.GetFollow() {
		hub = s.feed()
		key := ""
		if p, ok := auth.FromContext(ctx); ok {
			key = p.KeyID
		}
		leave, err := hub.join(key)
		if err != nil {
			return err
		}
		defer leave()
	}
	send := func(events []ledger.Event) error {
		for _, e := range events {
			if err := stream.Send(eventPB(e)); err != nil {
				return err
			}
		}
		return nil
	}
	cursor := r.GetCursor()
	for {
		events, next, err := s.l.ReadEvents(ctx, cursor, ledger.ExportPageSizeMaxDefault)
		if err != nil {
			return statusError(err)
		}
		if err := send(events); err != nil {
			return err
		}
		cursor = next
		if len(events) == ledger.ExportPageSizeMaxDefault {
			continue // more backlog
		}
		if hub == nil {
			return nil
		}
		// Caught up: take the watcher's pages while they fit.
		for {
			if !time.Now().Before(deadline) {
				return nil
			}
			events, next, ok, err := hub.wait(ctx, cursor, deadline)
			if err != nil {
				return statusError(err)
			}
			if !ok {
				break // behind the head: read for itself
			}
			if err := send(events); err != nil {
				return err
			}
			cursor = next
			if len(events) == ledger.ExportPageSizeMaxDefault {
				break
			}
		}
		if !time.Now().Before(deadline) {
			return nil
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
	case e.TopUp != nil:
		out.Event = &tallyv1.ExportTransfersResponse_Topup{Topup: topUpPB(*e.TopUp)}
	}
	return out
}
