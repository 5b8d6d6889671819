package torture

import (
	"strings"
	"testing"
	"time"
)

// scheduledRun is a runner with one recorded scheduled fault at t0+10s,
// recovered at t0+14s, and a workload acknowledging one charge a second
// from t0 to t0+30s except while the deployment was down.
func scheduledRun(t0 time.Time) (*runner, *DBState) {
	r := &runner{hist: NewHistory(), cfg: Config{Faults: []ScheduledFault{{Name: "failover"}}}, scheduledDone: []bool{true}}
	r.faultRecords = []FaultRecord{{Name: "failover", Began: t0.Add(10 * time.Second), Recovered: t0.Add(14 * time.Second)}}
	db := &DBState{}
	for s := 0; s < 30; s++ {
		if s > 10 && s < 15 {
			continue // down: nothing acknowledged from 10s to 15s
		}
		at := t0.Add(time.Duration(s) * time.Second)
		key := "k" + at.Format("150405")
		r.hist.AddOp(&Op{Client: 0, Key: key, Kind: KindCharge, Start: at.Add(-100 * time.Millisecond), End: at, Outcome: OutcomeAcked})
		db.Transfers = append(db.Transfers, TransferRow{Key: key})
	}
	// Setup-phase ops (client -1) never count.
	r.hist.AddOp(&Op{Client: -1, Key: "setup", Kind: KindCredit, Start: t0.Add(-time.Minute), End: t0.Add(-time.Minute), Outcome: OutcomeAcked})
	db.Transfers = append(db.Transfers, TransferRow{Key: "setup"})
	return r, db
}

func TestCheckScheduledPassesWithNothingLost(t *testing.T) {
	r, db := scheduledRun(time.Unix(1_800_000_000, 0))
	inv := r.checkScheduled(db)
	if !inv.Pass {
		t.Fatalf("want PASS, got %+v", inv)
	}
	f := r.faultRecords[0]
	// Acked at 0..10 s end before 10 s? 0..9 do; 10 ends exactly at Began.
	if f.AckedBefore != 10 || f.AckedAfter != 15 || f.Lost != 0 {
		t.Errorf("before %d after %d lost %d, want 10, 15, 0", f.AckedBefore, f.AckedAfter, f.Lost)
	}
	if f.WriteGap != 5*time.Second {
		t.Errorf("write gap %s, want 5s (acks at 10s and 15s)", f.WriteGap)
	}
	if !strings.Contains(inv.Note, "lost 0") || !strings.Contains(inv.Note, "longest write gap 5s") {
		t.Errorf("note %q lacks the figures", inv.Note)
	}
}

// The check must fail when an acknowledged op is missing from the final
// primary (a failover to a lagging standby), and attribute the loss.
func TestCheckScheduledFailsOnALostAck(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	r, db := scheduledRun(t0)
	// The standby never received the last two seconds before the fault.
	var kept []TransferRow
	for _, tr := range db.Transfers {
		if tr.Key != "k"+t0.Add(8*time.Second).Format("150405") && tr.Key != "k"+t0.Add(9*time.Second).Format("150405") {
			kept = append(kept, tr)
		}
	}
	db.Transfers = kept
	inv := r.checkScheduled(db)
	if inv.Pass {
		t.Fatalf("want FAIL with two acknowledged charges lost, got PASS: %+v", inv)
	}
	if got := r.faultRecords[0].Lost; got != 2 {
		t.Errorf("lost %d, want 2", got)
	}
	// A loss acknowledged while the fault was being injected (the primary
	// still answering, its standby cut off) is the fault's too.
	r, db = scheduledRun(t0)
	r.faultRecords[0].Recovered = t0.Add(16 * time.Second)
	db.Transfers = db.Transfers[1:] // drop the ack at 0 s ...
	var kept2 []TransferRow
	for _, tr := range db.Transfers {
		if tr.Key != "k"+t0.Add(15*time.Second).Format("150405") { // ... and the one at 15 s
			kept2 = append(kept2, tr)
		}
	}
	db.Transfers = kept2
	if inv := r.checkScheduled(db); inv.Pass || r.faultRecords[0].Lost != 2 {
		t.Errorf("acks lost at 0 s and during the fault (15 s): pass=%v lost=%d, want FAIL and 2", inv.Pass, r.faultRecords[0].Lost)
	}
	if !strings.Contains(strings.Join(inv.Examples, "\n"), "2 acknowledged ops lost") {
		t.Errorf("examples %q do not say what was lost", inv.Examples)
	}
}

func TestCheckScheduledFailsWhenAFaultNeverRan(t *testing.T) {
	r, db := scheduledRun(time.Unix(1_800_000_000, 0))
	r.cfg.Faults = append(r.cfg.Faults, ScheduledFault{Name: "switchover"})
	r.scheduledDone = append(r.scheduledDone, false)
	if inv := r.checkScheduled(db); inv.Pass {
		t.Fatalf("want FAIL: the switchover never happened")
	}
}

func TestCheckScheduledFailsWithoutWritesAfter(t *testing.T) {
	r, db := scheduledRun(time.Unix(1_800_000_000, 0))
	r.faultRecords[0].Recovered = r.faultRecords[0].Recovered.Add(time.Hour)
	if inv := r.checkScheduled(db); inv.Pass {
		t.Fatalf("want FAIL: nothing was sent and acknowledged after the fault")
	}
}

func TestWriteGap(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	ends := []time.Time{at(0), at(1), at(7), at(8), at(20)}
	// Around [2, 3]: between the acks at 1 and 7.
	if g := writeGap(ends, at(2), at(3)); g != 6*time.Second {
		t.Errorf("gap %s, want 6s", g)
	}
	// The gap after 8 is outside [0.5, 1.5] ... but the one from 1 to 7
	// starts inside it.
	if g := writeGap(ends, at(0.5), at(1.5)); g != 6*time.Second {
		t.Errorf("gap %s, want 6s", g)
	}
	if g := writeGap(nil, at(0), at(1)); g != 0 {
		t.Errorf("gap %s with no acks, want 0", g)
	}
}

func TestValidateTopology(t *testing.T) {
	if err := validateTopology(Config{Faults: []ScheduledFault{{Name: "x"}}}); err == nil {
		t.Error("scheduled faults without a Topology: want an error")
	}
}
