package torture

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Bounds of the feed follower and the final reconciliation.
const (
	// feedCatchUpMax bounds the wait, after the run, for the follower to
	// receive every event in the events table.
	feedCatchUpMax = 60 * time.Second
	// reconcileMax bounds the final Reconcile run (all attempts).
	reconcileMax = 90 * time.Second
)

// follower reads the change feed for the whole run with api/client's
// Export (follow), from the beginning. Export reopens a cut stream on the
// same tallyd from its cursor; when it gives up (that tallyd is down), the
// follower moves to the next tallyd with the cursor Export returned.
type follower struct {
	r       *runner
	clients []*client.Client

	mu     sync.Mutex
	log    FeedLog
	cursor string
	// cancelSession ends the current Export call (a stream stuck on a
	// connection that died silently), so the follower moves on.
	cancelSession context.CancelFunc
}

// kick ends the current Export call; the follower resumes from its cursor
// on the next tallyd.
func (f *follower) kick() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cancelSession != nil {
		f.cancelSession()
	}
}

func (r *runner) newFollower() (*follower, error) {
	f := &follower{r: r}
	for _, t := range r.tds {
		// A connection of its own (through the tallyd's proxy, so faults
		// cut it too), with the workload's admin key.
		c, err := newClient(t.idx, t.grpcAddr, r.apiKey, r.hist)
		if err != nil {
			return nil, err
		}
		f.clients = append(f.clients, c)
	}
	return f, nil
}

func (f *follower) close() {
	for _, c := range f.clients {
		c.Close()
	}
}

func (f *follower) received() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.log.Events)
}

func feedEvent(ev *tallyv1.ExportTransfersResponse) FeedEvent {
	e := FeedEvent{Cursor: ev.GetCursor()}
	switch {
	case ev.GetTransfer() != nil:
		e.Kind, e.Subject = "transfer", ev.GetTransfer().GetTransferId()
	case ev.GetHold() != nil:
		e.Kind, e.Subject = "hold", ev.GetHold().GetHoldId()
	case ev.GetAccountChange() != nil:
		e.Kind, e.Subject = "account_change", ev.GetAccountChange().GetAccountId()
	case ev.GetLowBalance() != nil:
		e.Kind, e.Subject = "low_balance", ev.GetLowBalance().GetTransferId()
		if e.Subject == "" {
			e.Subject = ev.GetLowBalance().GetHoldId()
		}
	case ev.GetTopup() != nil:
		e.Kind, e.Subject = "topup", ev.GetTopup().GetTopupId()
	default:
		e.Kind = "unknown"
	}
	return e
}

// run follows the feed until ctx ends.
func (f *follower) run(ctx context.Context) {
	for i := 0; ctx.Err() == nil; i++ {
		idx := i % len(f.clients)
		sctx, cancel := context.WithCancel(ctx)
		f.mu.Lock()
		cursor := f.cursor
		f.log.Sessions++
		f.cancelSession = cancel
		f.mu.Unlock()
		next, err := f.clients[idx].Export(sctx, cursor, true, func(ev *tallyv1.ExportTransfersResponse) error {
			f.mu.Lock()
			f.log.Events = append(f.log.Events, feedEvent(ev))
			f.mu.Unlock()
			return nil
		})
		kicked := sctx.Err() != nil
		cancel()
		f.mu.Lock()
		f.cursor = next
		if err != nil && !kicked {
			code := status.Code(err)
			f.r.hist.CountAnswer(codeName(code))
			if code == codes.Internal || code == codes.Unknown {
				f.r.hist.AddBadAnswer(Answer{What: "ExportTransfers (follow)", Tallyd: idx, Code: codeName(code),
					Message: status.Convert(err).Message(), At: time.Now()})
			}
			if len(f.log.Errors) < 50 {
				f.log.Errors = append(f.log.Errors, fmt.Sprintf("tallyd %d: %s", idx, err))
			}
		}
		f.mu.Unlock()
		if ctx.Err() == nil && err != nil {
			hold(ctx, 100*time.Millisecond)
		}
	}
}

// catchUp waits (bounded) until the follower has received as many events
// as the events table holds, stops it, and records what it received.
func (r *runner) catchUp(ctx context.Context, f *follower, stopFollower context.CancelFunc, done <-chan struct{}) {
	defer func() {
		stopFollower()
		<-done
		f.close()
		f.mu.Lock()
		log := f.log
		f.mu.Unlock()
		r.hist.mu.Lock()
		r.hist.Feed = &log
		r.hist.mu.Unlock()
	}()
	conn, err := pgx.Connect(ctx, r.dbURL)
	if err != nil {
		r.event("feed catch-up: cannot count events", "err", err)
		return
	}
	defer conn.Close(context.WithoutCancel(ctx))
	deadline := time.Now().Add(feedCatchUpMax)
	lastGot, lastProgress := -1, time.Now()
	for {
		var n int64
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM events`).Scan(&n); err != nil {
			r.event("feed catch-up: cannot count events", "err", err)
			return
		}
		got := int64(f.received())
		if got >= n {
			f.mu.Lock()
			f.log.CaughtUp = got == n
			f.mu.Unlock()
			r.printf("feed follower caught up: %d events\n", got)
			return
		}
		if int(got) != lastGot {
			lastGot, lastProgress = int(got), time.Now()
		} else if time.Since(lastProgress) > 10*time.Second {
			// Behind and not moving: its stream may hang on a connection
			// that died without a word; make it reconnect.
			r.event("feed follower stalled; reconnecting", "received", got, "events", n)
			f.kick()
			lastProgress = time.Now()
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			r.printf("feed follower did NOT catch up within %s: %d of %d events\n", feedCatchUpMax, got, n)
			return
		}
		hold(ctx, 200*time.Millisecond)
	}
}

// reconcile runs Reconcile over every account on a live tallyd (the next
// one on failure) and records the findings.
func (r *runner) reconcile(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, reconcileMax)
	defer cancel()
	log := &ReconcileLog{}
	for i := 0; ; i++ {
		t := r.tds[i%len(r.tds)]
		run := &ReconcileLog{}
		err := t.cl.Reconcile(ctx, &tallyv1.ReconcileRequest{Provider: r.stripe != nil}, func(m *tallyv1.ReconcileResponse) error {
			switch {
			case m.GetFinding() != nil:
				fd := m.GetFinding()
				run.Findings = append(run.Findings, formatFinding(fd.GetCheck(), fd.GetAccountId(), fd.GetTransferId(), fd.GetCurrency(), fd.GetDetail()))
			case m.GetSummary() != nil:
				run.Summary = true
				run.AccountsChecked, run.SummaryFindings = m.GetSummary().GetAccountsChecked(), m.GetSummary().GetFindings()
			}
			return nil
		})
		if err == nil && !run.Summary {
			err = errors.New("the stream ended without a summary")
		}
		if err == nil {
			log = run
			break
		}
		log = run
		log.Error = fmt.Sprintf("tallyd %d: %v", t.idx, err)
		code := status.Code(err)
		if code == codes.Internal || code == codes.Unknown {
			r.hist.AddBadAnswer(Answer{What: "Reconcile", Tallyd: t.idx, Code: codeName(code), Message: status.Convert(err).Message(), At: time.Now()})
		}
		if retry, _ := client.Retryable(err); !retry || ctx.Err() != nil {
			break
		}
		hold(ctx, time.Second)
	}
	r.printf("reconcile: %d accounts checked, %d findings%s\n", log.AccountsChecked, len(log.Findings),
		map[bool]string{true: " (error: " + log.Error + ")", false: ""}[log.Error != ""])
	r.hist.mu.Lock()
	r.hist.Reconcile = log
	r.hist.mu.Unlock()
}

// formatFinding renders a reconciliation finding for the report.
func formatFinding(check, account, transfer, currency, detail string) string {
	return fmt.Sprintf("%s: account %s transfer %s currency %s: %s", check, account, transfer, currency, detail)
}
