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
// gate at once; reads do not reopen it, only a write that began after the
// failure and succeeded does (the periodic probe is such a write).
//
// On reopening, the gate sets a floor: entries whose AsOf is before it were
// stored before Redis stopped taking writes and may have missed an update
// (this process's, or another tallyd's that this process cannot know
// about), so they are refused and refilled from PostgreSQL.
//
// The accounts whose updates were missed are remembered (up to pendingMax)
// so that the probe deletes their entries once Redis takes writes again:
// that protects other tallyds that never noticed a short outage.
type writeGate struct {
	serving atomic.Bool
	floor   atomic.Int64 // unix nanos; entries with an older AsOf are not served

	mu       sync.Mutex
	failedAt time.Time // start of the latest write that did not reach Redis
	reason   string    // why, for Status
	pending  map[uuid.UUID]time.Time
}

const (
	// pendingMax bounds the accounts remembered for deletion after missed
	// updates. Beyond it, entries that missed an update are left to the
	// floor (this process) and to their TTL (other tallyds).
	pendingMax = 10_000
	// asOfSkewMax is how far the clock that stamps AsOf (PostgreSQL's, or
	// another tallyd's) may run ahead of this process's: the floor is set
	// this much after reopening, so a stale entry is refused even then.
	asOfSkewMax = time.Second
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
// the account it stored). A write begun before the latest failure proves
// nothing about Redis now; one begun after it reopens the gate. It reports
// whether it reopened.
func (g *writeGate) wrote(id *uuid.UUID, start time.Time) (reopened bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if id != nil {
		if t, ok := g.pending[*id]; ok && t.Before(start) {
			delete(g.pending, *id)
		}
	}
	if g.serving.Load() || !start.After(g.failedAt) {
		return false
	}
	g.floor.Store(time.Now().Add(asOfSkewMax).UnixNano())
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
// start: an update missed after that is still pending.
func (g *writeGate) deleted(ids []uuid.UUID, start time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, id := range ids {
		if t, ok := g.pending[id]; ok && t.Before(start) {
			delete(g.pending, id)
		}
	}
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
