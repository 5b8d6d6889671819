package torture

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Topology is a PostgreSQL deployment a run uses instead of its own private
// server: for example Patroni with etcd, HAProxy and PgBouncer
// (internal/localsvc's Topology). The run creates and migrates its
// database through DirectURL, every tallyd's PostgreSQL fault proxy
// forwards to TallydTarget, and the checker reads DirectURL, which must
// always reach the current primary.
type Topology interface {
	// DirectURL reaches the current primary without a connection pooler
	// (migrations take session state); db names the database.
	DirectURL(db string) string
	// TallydTarget is the host:port every tallyd connects to (through its
	// fault proxy): a pooler, or a router in front of the primary.
	TallydTarget() string
}

// ScheduledFault is a fault of the deployment itself, injected once at a
// fixed point of the run in place of one of the nemesis's turns: a
// failover, a planned switchover.
type ScheduledFault struct {
	// Name is the fault's kind in the report.
	Name string
	// At is how far into the workload it is due, as a fraction of
	// Config.Duration.
	At float64
	// Do injects the fault and returns once it is over. Recovered is when
	// the deployment accepted writes again (zero: when Do returned); the
	// write gap around the fault is measured up to then.
	Do func(ctx context.Context) (FaultOutcome, error)
}

// FaultOutcome is what a ScheduledFault reports.
type FaultOutcome struct {
	Detail    string
	Recovered time.Time
}

// scheduledFaultMax bounds one scheduled fault: a failover waits for the
// leader key to expire and for the old primary to rejoin.
const scheduledFaultMax = 3 * time.Minute

// FaultRecord is one scheduled fault as it happened, with what the
// clients saw around it.
type FaultRecord struct {
	Name      string    `json:"name"`
	Detail    string    `json:"detail"`
	Began     time.Time `json:"began"`
	Recovered time.Time `json:"recovered"`
	Ended     time.Time `json:"ended"`
	// AckedBefore counts the ops acknowledged before the fault began,
	// AckedAfter those sent and acknowledged after it was over.
	AckedBefore int `json:"acked_before"`
	AckedAfter  int `json:"acked_after"`
	// Lost counts acknowledged ops that created no transfer or hold in
	// the final primary, acknowledged after the previous scheduled fault
	// was over and before this one was (what this fault lost: a fault
	// may lose what was acknowledged while it was being injected, such
	// as the commits a cut-off standby never received).
	Lost int `json:"lost"`
	// WriteGap is the longest time, around the fault, with no
	// acknowledged write: between two consecutive acknowledgments, the
	// later one after the fault began and the earlier one before it was
	// over.
	WriteGap time.Duration `json:"write_gap"`
}

// nextScheduled returns the index of the first scheduled fault due at
// elapsed that has not run yet, or -1.
func (r *runner) nextScheduled(elapsed time.Duration) int {
	for i, f := range r.cfg.Faults {
		if r.scheduledDone[i] {
			continue
		}
		if elapsed >= time.Duration(f.At*float64(r.cfg.Duration)) {
			return i
		}
	}
	return -1
}

// runScheduled injects scheduled fault i with its own bounded context: a
// failover is seen through even when the run is ending.
func (r *runner) runScheduled(stop context.Context, i int) (string, string, error) {
	f := r.cfg.Faults[i]
	r.scheduledDone[i] = true
	ctx, cancel := context.WithTimeout(context.WithoutCancel(stop), scheduledFaultMax)
	defer cancel()
	began := time.Now()
	out, err := f.Do(ctx)
	ended := time.Now()
	if out.Recovered.IsZero() {
		out.Recovered = ended
	}
	r.faultRecords = append(r.faultRecords, FaultRecord{Name: f.Name, Detail: out.Detail, Began: began,
		Recovered: out.Recovered, Ended: ended})
	r.printf("  %s at t=%s: %s\n", f.Name, began.Sub(r.workloadStart).Round(100*time.Millisecond), out.Detail)
	return f.Name, out.Detail, err
}

// nemesisKinds are the nemesis's fault kinds for this run: with a
// Topology, the deployment's own scheduled faults replace the private
// server's restarts.
func (r *runner) nemesisKinds() []string {
	if r.cfg.Topology == nil {
		return FaultKinds
	}
	var kinds []string
	for _, k := range FaultKinds {
		if k != FaultPGRestartFast && k != FaultPGRestartImmediate {
			kinds = append(kinds, k)
		}
	}
	return kinds
}

// ackedWrite is one acknowledged op of a workload client.
type ackedWrite struct {
	start, end time.Time
	key        string
	kind       OpKind
}

// ackedWrites returns the workload's acknowledged ops, by acknowledgment
// time.
func (r *runner) ackedWrites() []ackedWrite {
	r.hist.mu.Lock()
	var ws []ackedWrite
	for _, o := range r.hist.Ops {
		if o.Client >= 0 && o.Outcome == OutcomeAcked {
			ws = append(ws, ackedWrite{start: o.Start, end: o.End, key: o.Key, kind: o.Kind})
		}
	}
	r.hist.mu.Unlock()
	sort.Slice(ws, func(a, b int) bool { return ws[a].end.Before(ws[b].end) })
	return ws
}

// lostAcked returns the acknowledged ops that left no transfer (or, for a
// hold, no hold) in db: what a failover to a lagging standby loses.
func lostAcked(ws []ackedWrite, db *DBState) []ackedWrite {
	transfers := make(map[string]bool, len(db.Transfers))
	for _, t := range db.Transfers {
		transfers[t.Key] = true
	}
	holds := make(map[string]bool, len(db.Holds))
	for _, h := range db.Holds {
		holds[h.Key] = true
	}
	var lost []ackedWrite
	for _, w := range ws {
		var found bool
		switch w.kind {
		case KindHold:
			found = holds[w.key]
		case KindRelease:
			continue // moves nothing: no row of its own
		default:
			found = transfers[w.key]
		}
		if !found {
			lost = append(lost, w)
		}
	}
	return lost
}

// writeGap is the longest time between two consecutive acknowledgments
// (ends sorted) where the later one comes after from and the earlier one
// before to: how long clients could not write around [from, to].
func writeGap(ends []time.Time, from, to time.Time) time.Duration {
	var gap time.Duration
	for i := 1; i < len(ends); i++ {
		if ends[i].After(from) && ends[i-1].Before(to) {
			gap = max(gap, ends[i].Sub(ends[i-1]))
		}
	}
	return gap
}

// InvScheduledFaults is the invariant of a run with scheduled faults.
const InvScheduledFaults = "scheduled_faults"

// checkScheduled is the invariant of a run with scheduled faults: each
// happened, clients got writes acknowledged before and after each, and
// no acknowledged op was lost (a deliberately broken fault fails it, and
// its record says how much it lost). It also fills in the fault records.
func (r *runner) checkScheduled(db *DBState) InvariantResult {
	inv := InvariantResult{Name: InvScheduledFaults,
		Description: "every scheduled fault of the deployment happened; ops were acknowledged before and after each; no acknowledged op was lost (checked on the final primary)",
		Pass:        true}
	fail := func(format string, args ...any) {
		inv.Pass = false
		inv.Violations++
		if len(inv.Examples) < 20 {
			inv.Examples = append(inv.Examples, fmt.Sprintf(format, args...))
		}
	}
	ws := r.ackedWrites()
	ends := make([]time.Time, len(ws))
	for i, w := range ws {
		ends[i] = w.end
	}
	lost := lostAcked(ws, db)
	var notes []string
	var prev time.Time
	for i := range r.faultRecords {
		f := &r.faultRecords[i]
		inv.Checked++
		for _, w := range lost {
			if !w.end.Before(prev) && w.end.Before(f.Recovered) {
				f.Lost++
			}
		}
		prev = f.Recovered
		for _, w := range ws {
			if w.end.Before(f.Began) {
				f.AckedBefore++
			}
			if w.start.After(f.Recovered) {
				f.AckedAfter++
			}
		}
		f.WriteGap = writeGap(ends, f.Began, f.Recovered)
		if f.AckedBefore == 0 || f.AckedAfter == 0 {
			fail("%s: %d ops acknowledged before it, %d sent and acknowledged after it: want some of each", f.Name, f.AckedBefore, f.AckedAfter)
		}
		notes = append(notes, fmt.Sprintf("%s: acked before %d, after %d, lost %d, longest write gap %s",
			f.Name, f.AckedBefore, f.AckedAfter, f.Lost, f.WriteGap.Round(time.Millisecond)))
	}
	for i, f := range r.cfg.Faults {
		if !r.scheduledDone[i] {
			fail("%s never happened (run too short?)", f.Name)
		}
	}
	if len(lost) > 0 {
		fail("%d acknowledged ops lost", len(lost))
		for _, w := range lost[:min(len(lost), 5)] {
			fail("acked %s key %s at %s is not in the final primary", w.kind, w.key, w.end.Format("15:04:05.000"))
		}
	}
	inv.Note = strings.Join(notes, "; ")
	return inv
}

// validateTopology checks a Config's Topology and Faults.
func validateTopology(cfg Config) error {
	if len(cfg.Faults) > 0 && cfg.Topology == nil {
		return errors.New("torture: scheduled faults need a Topology")
	}
	if cfg.Topology != nil && (cfg.PGFailover || cfg.OldTallydBin != "" || cfg.PgBouncer) {
		return errors.New("torture: a run on a Topology (which has its own pooler) cannot also be a -pg-failover, -pgbouncer or rolling-upgrade run")
	}
	for _, f := range cfg.Faults {
		if f.Name == "" || f.Do == nil || f.At < 0 || f.At >= 1 {
			return fmt.Errorf("torture: scheduled fault %q: need a name, Do and 0 <= At < 1", f.Name)
		}
	}
	return nil
}
