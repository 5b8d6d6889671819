package client

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"time"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Export reads the change feed from cursor ("" = the beginning), calling fn
// for each event in order, and returns the cursor to resume from: the cursor
// of the last event fn accepted. A stream cut by UNAVAILABLE or a deadline is
// reopened from that cursor (the retry contract: resend the same request),
// so fn sees every event exactly once. With follow, Export keeps reading new
// events until ctx ends (then it returns ctx's error with the cursor);
// without, it returns nil once it has caught up. An error from fn stops
// Export and is returned.
func (c *Client) Export(ctx context.Context, cursor string, follow bool, fn func(*tallyv1.ExportTransfersResponse) error) (string, error) {
	p := c.policy
	p.fill()
	failures := 0
	for {
		progressed := false
		err := func() error {
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			stream, err := c.raw.ExportTransfers(sctx, &tallyv1.ExportTransfersRequest{Cursor: cursor, Follow: follow})
			if err != nil {
				return err
			}
			for {
				ev, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					return err
				}
				if err := fn(ev); err != nil {
					return &callbackError{err}
				}
				cursor, progressed = ev.GetCursor(), true
			}
		}()
		var cb *callbackError
		switch {
		case errors.As(err, &cb):
			return cursor, cb.err
		case err == nil && !follow:
			return cursor, nil
		case err == nil:
			// The server ended a following stream at its duration limit.
			failures = 0
			continue
		}
		if ctx.Err() != nil {
			return cursor, ctx.Err()
		}
		if retry, _ := Retryable(err); !retry {
			return cursor, err
		}
		if progressed {
			failures = 0
		}
		failures++
		if failures >= p.RetryAttemptsMax {
			return cursor, err
		}
		wait := p.BackoffBase << min(failures-1, 16)
		if wait > p.BackoffMax || wait <= 0 {
			wait = p.BackoffMax
		}
		wait = wait/2 + rand.N(wait/2+1)
		select {
		case <-ctx.Done():
			return cursor, ctx.Err()
		case <-time.After(wait):
		}
	}
}

type callbackError struct{ err error }

func (e *callbackError) Error() string { return e.err.Error() }

// Reconcile runs a reconciliation, calling fn for each streamed message
// (progress, findings, then the summary). It is read-only; a failed run can
// simply be started again.
func (c *Client) Reconcile(ctx context.Context, r *tallyv1.ReconcileRequest, fn func(*tallyv1.ReconcileResponse) error) error {
	stream, err := c.raw.Reconcile(ctx, r)
	if err != nil {
		return err
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := fn(m); err != nil {
			return err
		}
	}
}
