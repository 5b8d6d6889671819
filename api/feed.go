package api

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/tallyledger/tally/ledger"
)

// Defaults of the following-stream caps. Each has a tallyd flag.
const (
	// ExportFollowStreamsPerKeyMaxDefault bounds following ExportTransfers
	// streams per API key (a reconciliation job needs a few).
	ExportFollowStreamsPerKeyMaxDefault = 8
	// ExportFollowStreamsMaxDefault bounds following streams per server.
	ExportFollowStreamsMaxDefault = 256
)

// ReasonFollowStreamsExhausted: a following stream over a cap.
const ReasonFollowStreamsExhausted = "FOLLOW_STREAMS_EXHAUSTED"

// feedPage is what the watcher read once: every event after from, up to
// and including next. A page is complete: no event can later appear in
// its range (ReadEvents only returns positions every writer has passed).
type feedPage struct {
	from, next string
	events     []ledger.Event
}

// feedHub shares one poller among a server's following streams: one
// goroutine reads the feed from its head every poll interval while some
// follower is caught up, and hands each new page to the caught-up
// followers, so an idle follower costs no PostgreSQL query and N caught-up
// followers cost one query per interval, not N. A follower behind the head
// reads its own backlog.
type feedHub struct {
	l    *ledger.Ledger
	poll time.Duration
	log  *slog.Logger
	// perKeyMax and max cap the following streams.
	perKeyMax, max int

	mu        sync.Mutex
	followers int
	perKey    map[string]int
	waiting   int
	running   bool
	head      string
	page      *feedPage
	changed   chan struct{} // closed when a page is published

	// Reads counts the watcher's queries (tests and metrics).
	reads atomic.Int64
}

func newFeedHub(l *ledger.Ledger, poll time.Duration, perKeyMax, max int, log *slog.Logger) *feedHub {
	return &feedHub{l: l, poll: poll, log: log, perKeyMax: perKeyMax, max: max,
		perKey: map[string]int{}, changed: make(chan struct{})}
}

// join admits a following stream of key, or refuses it with
// RESOURCE_EXHAUSTED (the client retries after a backoff). Key "" (a server
// without authentication) has only the per-server cap.
func (h *feedHub) join(key string) (func(), error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.followers >= h.max {
		return nil, newStatus(codes.ResourceExhausted, ReasonFollowStreamsExhausted,
			fmt.Sprintf("this server already serves %d following feed streams; retry after a backoff", h.max), nil)
	}
	if key != "" && h.perKey[key] >= h.perKeyMax {
		return nil, newStatus(codes.ResourceExhausted, ReasonFollowStreamsExhausted,
			fmt.Sprintf("this API key already has %d following feed streams open; close one or retry after a backoff", h.perKeyMax), nil)
	}
	h.followers++
	h.perKey[key]++
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			h.followers--
			if h.perKey[key]--; h.perKey[key] <= 0 {
				delete(h.perKey, key)
			}
		})
	}, nil
}

// wait blocks a follower caught up at cursor until the feed moves past it,
// ctx ends or until passes. It returns the events after cursor when the
// watcher's page covers them (ok), or ok false when the follower must read
// for itself (it is behind the head, or the page does not fit its cursor).
func (h *feedHub) wait(ctx context.Context, cursor string, until time.Time) (events []ledger.Event, next string, ok bool, err error) {
	timer := time.NewTimer(time.Until(until))
	defer timer.Stop()
	for {
		h.mu.Lock()
		if !h.running {
			// A stopped watcher's head is stale: start from this follower.
			h.head, h.page, h.running = cursor, nil, true
			go h.watch()
		}
		if c, cerr := ledger.CompareCursors(cursor, h.head); cerr != nil || c < 0 {
			h.mu.Unlock()
			return nil, "", false, nil
		}
		ch := h.changed
		h.waiting++
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-timer.C:
		case <-ch:
		}
		h.mu.Lock()
		h.waiting--
		p := h.page
		h.mu.Unlock()
		if err != nil || !time.Now().Before(until) {
			return nil, "", false, err
		}
		if p == nil {
			return nil, "", false, nil
		}
		afterFrom, e1 := ledger.CompareCursors(cursor, p.from)
		beforeNext, e2 := ledger.CompareCursors(cursor, p.next)
		switch {
		case e1 != nil || e2 != nil || afterFrom < 0:
			return nil, "", false, nil
		case beforeNext >= 0:
			continue // this follower is ahead of the page: wait for the next
		}
		for i, e := range p.events {
			if c, _ := ledger.CompareCursors(e.Cursor, cursor); c > 0 {
				return p.events[i:], p.next, true, nil
			}
		}
		return nil, p.next, true, nil
	}
}

// watch is the hub's one poller. It stops once no follower waits.
func (h *feedHub) watch() {
	t := time.NewTicker(h.poll)
	defer t.Stop()
	failures := 0
	for range t.C {
		h.mu.Lock()
		if h.waiting == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		head := h.head
		h.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		events, next, err := h.l.ReadEvents(ctx, head, ledger.ExportPageSizeMaxDefault)
		cancel()
		h.reads.Add(1)
		if err != nil {
			// Waiting followers stay idle; the next interval tries again.
			if failures++; failures == 1 || failures%100 == 0 {
				h.log.Warn("feed watcher cannot read the feed", "err", err.Error(), "failures", failures)
			}
			continue
		}
		failures = 0
		if len(events) == 0 {
			continue
		}
		h.mu.Lock()
		if h.head == head {
			h.page = &feedPage{from: head, next: next, events: events}
			h.head = next
			close(h.changed)
			h.changed = make(chan struct{})
		}
		h.mu.Unlock()
	}
}
