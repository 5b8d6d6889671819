package torture

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"time"
)

// OpsSummary counts operations by outcome.
type OpsSummary struct {
	Attempted int `json:"attempted"`
	Acked     int `json:"acked"`
	Rejected  int `json:"rejected"`
	// RejectedByReason counts business rejections by ErrorInfo reason.
	RejectedByReason map[string]int `json:"rejected_by_reason"`
	Unexpected       int            `json:"unexpected"`
	Unknown          int            `json:"unknown_outcome"`
	// UnknownApplied counts ops without a definite answer that Postgres
	// shows applied.
	UnknownApplied int `json:"unknown_outcome_applied"`
	// Attempts is the number of RPCs sent; Retries excludes each op's first
	// attempt (both of a hedged op's concurrent first attempts).
	Attempts int `json:"attempts"`
	Retries  int `json:"retries"`
	// Retried counts ops that needed more than one attempt.
	Retried int `json:"retried_ops"`
	// OtherTallyd counts ops that were sent to more than one tallyd (by a
	// retry or a hedge).
	OtherTallyd int `json:"retried_on_other_tallyd"`
	// Replayed counts acked ops whose final answer was a replay (an
	// earlier attempt had committed without the client hearing back).
	Replayed int `json:"acked_as_replay"`
	// Hedged counts ops whose first attempt was sent twice at once.
	Hedged int            `json:"hedged"`
	ByKind map[string]int `json:"by_kind"`
	// Time from an op's first attempt to its definite answer, retries
	// included, in milliseconds.
	AnswerMsP50 int64 `json:"answer_ms_p50"`
	AnswerMsP99 int64 `json:"answer_ms_p99"`
	AnswerMsMax int64 `json:"answer_ms_max"`
	// NotApplied counts items of ATOMIC batches answered as not applied.
	NotApplied int `json:"not_applied"`
	// Batches counts SubmitBatch calls (their items are counted as ops).
	Batches BatchesSummary `json:"batches"`
	// Holds counts the holds in Postgres at the end by status.
	Holds map[string]int `json:"holds,omitempty"`
}

// BatchesSummary counts SubmitBatch calls.
type BatchesSummary struct {
	Total          int            `json:"total"`
	ByMode         map[string]int `json:"by_mode"`
	Items          int            `json:"items"`
	Applied        int            `json:"applied"`
	NotApplied     int            `json:"not_applied"`
	Unknown        int            `json:"unknown_outcome"`
	Unexpected     int            `json:"unexpected"`
	Replayed       int            `json:"acked_as_replay"`
	Hedged         int            `json:"hedged"`
	DesignedToFail int            `json:"with_item_designed_to_fail"`
}

// ReadsSummary counts balance reads.
type ReadsSummary struct {
	Total          int            `json:"total"`
	ByConsistency  map[string]int `json:"by_consistency"`
	BySource       map[string]int `json:"by_source"`
	Failures       int            `json:"failures"`
	FailuresByCode map[string]int `json:"failures_by_code,omitempty"`
}

// Report is the outcome of a torture run: what was done, what was injected
// and each invariant's verdict.
type Report struct {
	Seed          int64             `json:"seed"`
	Duration      string            `json:"duration"`
	Elapsed       string            `json:"elapsed"`
	StartedAt     time.Time         `json:"started_at"`
	Tallyds       int               `json:"tallyds"`
	Clients       int               `json:"clients"`
	Accounts      int               `json:"accounts"`
	CacheTTL      string            `json:"cache_ttl"`
	Ops           OpsSummary        `json:"ops"`
	Reads         ReadsSummary      `json:"reads"`
	Faults        map[string]int    `json:"faults"`
	FaultsMissing []string          `json:"faults_missing,omitempty"`
	AnswerCodes   map[string]int    `json:"answer_codes"`
	Invariants    []InvariantResult `json:"invariants"`
	// ScheduledFaults are a Topology run's deployment faults, with the
	// writes acknowledged around each, the ops lost and the write gap.
	ScheduledFaults []FaultRecord `json:"scheduled_faults,omitempty"`
	Violations      int           `json:"violations"`
	Pass            bool          `json:"pass"`
	TempDir         string        `json:"temp_dir,omitempty"`
}

// Summarize counts a history's operations and reads. db, when not nil,
// resolves how many unknown-outcome ops were applied.
func Summarize(h *History, db *DBState) (OpsSummary, ReadsSummary) {
	applied := map[string]bool{}
	ops := OpsSummary{RejectedByReason: map[string]int{}, ByKind: map[string]int{}, Batches: BatchesSummary{ByMode: map[string]int{}}}
	if db != nil {
		for _, t := range db.Transfers {
			applied[t.Key] = true
		}
		for _, k := range db.Keys {
			if k.TransferID != "" || k.HoldID != "" {
				applied[k.Key] = true
			}
		}
		ops.Holds = map[string]int{}
		names := map[int16]string{HoldOpen: "open", HoldCaptured: "captured", HoldReleased: "released", HoldExpired: "expired"}
		for _, h := range db.Holds {
			ops.Holds[names[h.Status]]++
		}
	}
	for _, b := range h.Batches {
		bs := &ops.Batches
		bs.Total++
		bs.ByMode[b.Mode]++
		bs.Items += len(b.ItemKeys)
		if b.DesignedToFail >= 0 {
			bs.DesignedToFail++
		}
		switch {
		case b.Outcome == OutcomeAcked && b.Applied:
			bs.Applied++
		case b.Outcome == OutcomeAcked:
			bs.NotApplied++
		case b.Outcome == OutcomeUnknown:
			bs.Unknown++
		default:
			bs.Unexpected++
		}
		if b.Outcome == OutcomeAcked && b.Replayed {
			bs.Replayed++
		}
		if b.Hedged {
			bs.Hedged++
		}
	}
	for _, o := range h.Ops {
		ops.Attempted++
		ops.ByKind[string(o.Kind)]++
		ops.Attempts += o.Attempts
		ops.Retries += max(o.Attempts-o.firstRound(), 0)
		if o.Retried() {
			ops.Retried++
		}
		if o.Tallyds > 1 {
			ops.OtherTallyd++
		}
		if o.Hedged {
			ops.Hedged++
		}
		switch o.Outcome {
		case OutcomeAcked:
			ops.Acked++
			if o.Replayed {
				ops.Replayed++
			}
		case OutcomeRejected:
			ops.Rejected++
			ops.RejectedByReason[o.FinalReason]++
		case OutcomeUnexpected:
			ops.Unexpected++
		case OutcomeUnknown:
			ops.Unknown++
		case OutcomeNotApplied:
			ops.NotApplied++
		}
		if (o.Outcome == OutcomeUnknown || o.Outcome == OutcomeUnexpected) && applied[o.Key] {
			ops.UnknownApplied++
		}
	}
	if len(h.Ops) > 0 {
		ms := make([]int64, 0, len(h.Ops))
		for _, o := range h.Ops {
			ms = append(ms, o.End.Sub(o.Start).Milliseconds())
		}
		slices.Sort(ms)
		ops.AnswerMsP50 = ms[len(ms)/2]
		ops.AnswerMsP99 = ms[min(len(ms)-1, len(ms)*99/100)]
		ops.AnswerMsMax = ms[len(ms)-1]
	}
	reads := ReadsSummary{ByConsistency: map[string]int{}, BySource: map[string]int{}, FailuresByCode: map[string]int{}}
	for _, o := range h.Observations {
		reads.Total++
		reads.ByConsistency[o.Consistency]++
		reads.BySource[o.Source]++
	}
	for _, f := range h.ReadFailures {
		reads.Failures++
		k := f.Code
		if f.Reason != "" {
			k += "/" + f.Reason
		}
		reads.FailuresByCode[k]++
	}
	return ops, reads
}

// Finish fills the verdict fields from the invariants.
func (r *Report) Finish() {
	r.Violations = 0
	r.Pass = true
	for _, inv := range r.Invariants {
		r.Violations += inv.Violations
		if !inv.Pass {
			r.Pass = false
		}
	}
	if len(r.Invariants) == 0 {
		r.Pass = false
	}
}

// WriteJSON writes the report as indented JSON to path.
func (r *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func formatCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if m[keys[i]] != m[keys[j]] {
			return m[keys[i]] > m[keys[j]]
		}
		return keys[i] < keys[j]
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

// PrintSummary writes the human-readable summary.
func (r *Report) PrintSummary(w io.Writer) {
	fmt.Fprintf(w, "\n=== tally-torture: seed %d, duration %s (wall %s), %d tallyds, %d clients, %d accounts, cache TTL %s ===\n",
		r.Seed, r.Duration, r.Elapsed, r.Tallyds, r.Clients, r.Accounts, r.CacheTTL)
	o := r.Ops
	fmt.Fprintf(w, "ops:     %d attempted: %d acked, %d rejected, %d not applied (ATOMIC batch items), %d unexpected answer, %d unknown outcome (%d of those applied)\n",
		o.Attempted, o.Acked, o.Rejected, o.NotApplied, o.Unexpected, o.Unknown, o.UnknownApplied)
	fmt.Fprintf(w, "         by kind: %s\n", formatCounts(o.ByKind))
	b := o.Batches
	fmt.Fprintf(w, "batches: %d (%s) with %d items: %d applied, %d not applied, %d unknown outcome, %d unexpected; %d acked as a replay; %d sent twice at once; %d with an item built to fail\n",
		b.Total, formatCounts(b.ByMode), b.Items, b.Applied, b.NotApplied, b.Unknown, b.Unexpected, b.Replayed, b.Hedged, b.DesignedToFail)
	if len(o.Holds) > 0 {
		fmt.Fprintf(w, "holds:   %s\n", formatCounts(o.Holds))
	}
	if len(o.RejectedByReason) > 0 {
		fmt.Fprintf(w, "         rejections: %s\n", formatCounts(o.RejectedByReason))
	}
	fmt.Fprintf(w, "retries: %d retries over %d attempts; %d ops retried, %d reached more than one tallyd, %d acked as a replay; %d sent twice at once\n",
		o.Retries, o.Attempts, o.Retried, o.OtherTallyd, o.Replayed, o.Hedged)
	fmt.Fprintf(w, "         time to a definite answer: p50 %dms, p99 %dms, max %dms\n", o.AnswerMsP50, o.AnswerMsP99, o.AnswerMsMax)
	fmt.Fprintf(w, "reads:   %d ok (%s; from %s), %d failed", r.Reads.Total, formatCounts(r.Reads.ByConsistency),
		formatCounts(r.Reads.BySource), r.Reads.Failures)
	if r.Reads.Failures > 0 {
		fmt.Fprintf(w, " (%s)", formatCounts(r.Reads.FailuresByCode))
	}
	fmt.Fprintln(w)
	total := 0
	for _, n := range r.Faults {
		total += n
	}
	fmt.Fprintf(w, "faults:  %d injected: %s\n", total, formatCounts(r.Faults))
	if len(r.FaultsMissing) > 0 {
		fmt.Fprintf(w, "         NOT injected (run too short?): %s\n", strings.Join(r.FaultsMissing, ", "))
	}
	fmt.Fprintf(w, "answers: %s\n", formatCounts(r.AnswerCodes))
	for _, f := range r.ScheduledFaults {
		fmt.Fprintf(w, "%s: %s\n         acknowledged before %d, after %d; lost %d; longest write gap %s (the deployment took writes again %s after it began)\n",
			f.Name, f.Detail, f.AckedBefore, f.AckedAfter, f.Lost, f.WriteGap.Round(time.Millisecond),
			f.Recovered.Sub(f.Began).Round(time.Millisecond))
	}
	fmt.Fprintln(w, "invariants:")
	failed := 0
	for _, inv := range r.Invariants {
		verdict := "PASS"
		switch {
		case !inv.Pass:
			verdict = "FAIL"
			failed++
		case inv.Skipped:
			verdict = "SKIP"
		}
		line := fmt.Sprintf("  %s %-28s %7d checked", verdict, inv.Name, inv.Checked)
		if inv.Violations > 0 {
			line += fmt.Sprintf(", %d VIOLATIONS", inv.Violations)
		}
		if inv.Note != "" {
			line += "  (" + inv.Note + ")"
		}
		fmt.Fprintln(w, line)
		for _, ex := range inv.Examples {
			fmt.Fprintf(w, "         - %s\n", ex)
		}
		if inv.Violations > len(inv.Examples) {
			fmt.Fprintf(w, "         ... and %d more\n", inv.Violations-len(inv.Examples))
		}
	}
	if r.Pass {
		fmt.Fprintf(w, "RESULT: PASS: all %d invariants hold (seed %d)\n", len(r.Invariants), r.Seed)
	} else {
		fmt.Fprintf(w, "RESULT: FAIL: %d of %d invariants violated, %d violations (replay with -seed %d)\n",
			failed, len(r.Invariants), r.Violations, r.Seed)
	}
}
