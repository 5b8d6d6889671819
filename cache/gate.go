package cache

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// writeGate decides whether cached balances may be served at all. The
// breaker alone cannot: a Redis that still answers reads but refuses writes
// (a read-only replica, maxmemory with noeviction, a write that timed out)
// keeps the old value of an account whose newer value could not be stored,
// and the successful reads in between reset the breaker's count of
// consecutive failures. So one write that did not reach Redis closes the
// gate at once; reads do not reopen it. It reopens when a write that began
// after the latest failure succeeded (the periodic probe is such a write)
// and the entries of the accounts whose updates were missed (remembered, up
// to pendingMax) have been deleted or overwritten.
//
// On reopening, the gate sets a floor: the start of the first missed write
// of the outage. An entry whose AsOf is before it was stored before this
// process saw Redis refuse writes and may have missed an update that
// another tallyd could not store and this process cannot know about, so it
// is refused (and refilled from PostgreSQL). AsOf is stamped by
// PostgreSQL's clock, the floor by this process's: the floor is only as good
// as the clocks agree, which is why this process's own missed entries are
// deleted before reopening rather than left to the floor.
type writeGate struct {
	serving atomic.Bool
	floor   atomic.Int64 // unix nanos; entries with an older AsOf are not served

	mu          sync.Mutex
	closedSince time.Time // start of the first missed write since the gate closed
	failedAt    time.Time // start of the latest write that did not reach Redis
	reason      string    // why, for Status
	pending     map[uuid.UUID]time.Time
}

const (
	// pendingMax bounds the accounts remembered for deletion after missed
	// updates. Beyond it, entries that missed an update are left to the
	// floor and to their TTL.
	pendingMax = 10_000
)

func newWriteGate() *writeGate {
	g := &writeGate{pending: map[uuid.UUID]time.Time{}}
	g.serving.Store(true)
	return g
}

// open reports whether cached balances may be served now.
func (g *writeGate) open() bool { return g.serving.Load() }

// refuses reports whether an entry stamped asOf is below the floor.
func (g *writeGate) refuses(asOf time.Time) bool {
	f := g.floor.Load()
	return f != 0 && asOf.UnixNano() < f
}

// missed records that a write begun at start did not reach Redis; id, if
// set, is the account whose entry may now be stale. It closes the gate and
// reports whether it was open. A write skipped by the open breaker keeps
// the reason recorded: it says less than the failure that opened it.
func (g *writeGate) missed(id *uuid.UUID, start time.Time, reason string) (wasOpen bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	wasOpen = g.serving.Swap(false)
	if wasOpen {
		g.closedSince = start
	}
	if start.After(g.failedAt) {
		g.failedAt = start
	}
	if reason != reasonSkipped || g.reason == "" {
		g.reason = reason
	}
	if id != nil {
		if t, ok := g.pending[*id]; ok || len(g.pending) < pendingMax {
			if start.After(t) {
				g.pending[*id] = start
			}
		}
	}
	return wasOpen
}

// wrote records that a write begun at start reached Redis (id, if set, is
// the account it stored, now at least as new as any update missed before
// start). It reports whether that reopened the gate.
func (g *writeGate) wrote(id *uuid.UUID, start time.Time) (reopened bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if id != nil {
		g.clear(*id, start)
	}
	return g.tryOpen(start)
}

// clear forgets a missed update of id that a write begun at start repaired.
func (g *writeGate) clear(id uuid.UUID, start time.Time) {
	if t, ok := g.pending[id]; ok && t.Before(start) {
		delete(g.pending, id)
	}
}

// tryOpen reopens the gate after a successful write begun at start, unless
// that write began before the latest failure (it proves nothing about Redis
// now) or missed entries are still to be deleted.
func (g *writeGate) tryOpen(start time.Time) bool {
	if g.serving.Load() || !start.After(g.failedAt) || len(g.pending) > 0 {
		return false
	}
	g.floor.Store(g.closedSince.UnixNano())
	g.reason = ""
	g.serving.Store(true)
	return true
}

// pendingIDs returns up to n accounts whose entries are to be deleted.
func (g *writeGate) pendingIDs(n int) []uuid.UUID {
	g.mu.Lock()
	defer g.mu.Unlock()
	ids := make([]uuid.UUID, 0, min(n, len(g.pending)))
	for id := range g.pending {
		if len(ids) == n {
			break
		}
		ids = append(ids, id)
	}
	return ids
}

// deleted records that the entries of ids were deleted by a call begun at
// start (an update missed after that is still pending), and reports
// whether that reopened the gate.
func (g *writeGate) deleted(ids []uuid.UUID, start time.Time) (reopened bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, id := range ids {
		g.clear(id, start)
	}
	return g.tryOpen(start)
}

// state returns why the gate is closed ("" when open) and how many entries
// wait for deletion.
func (g *writeGate) state() (reason string, pending int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.serving.Load() {
		return "", len(g.pending)
	}
	return g.reason, len(g.pending)
}
