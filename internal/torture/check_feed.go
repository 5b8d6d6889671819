package torture

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// checkLifecycle checks the lifecycle client's answers, that ACCOUNT_NOT_ACTIVE
// refusals happened only while an account was frozen or closed, and the
// accounts' final statuses.
func (c *checker) checkLifecycle() {
	r := c.results[InvLifecycleAnswers]
	if len(c.h.Lifecycle) == 0 {
		r.Skipped, r.Note = true, "no lifecycle calls"
		return
	}
	type window struct{ from, to time.Time } // to zero: still frozen/closed
	windows := map[string][]window{}
	openFreeze := map[string]int{}
	closed := map[string]bool{}
	calls := slices.Clone(c.h.Lifecycle)
	sort.SliceStable(calls, func(i, j int) bool { return calls[i].Start.Before(calls[j].Start) })
	answers := map[string]int{}
	retried := 0
	for _, lc := range calls {
		c.checked(InvLifecycleAnswers, 1)
		if lc.Attempts > 1 {
			retried++
		}
		ans := lc.Code
		if lc.Code != "OK" && lc.Reason != "" {
			ans = lc.Reason
		}
		answers[lc.Action+" "+ans]++
		switch {
		case !lc.Definite:
			c.fail(InvLifecycleAnswers, "%s of account %s: no definite answer in %d attempts (last %s %s)", lc.Action, lc.Account, lc.Attempts, lc.Code, lc.Reason)
		case !slices.Contains(lc.Expect, ans):
			c.fail(InvLifecycleAnswers, "%s of account %s: answered %s %s, expected one of %v", lc.Action, lc.Account, lc.Code, lc.Reason, lc.Expect)
		}
		switch lc.Action {
		case ActionFreeze:
			// Open from the moment it was sent (it may apply before the
			// answer, or without one arriving).
			if _, ok := openFreeze[lc.Account]; !ok && lc.Code != reasonClosed && lc.Reason != reasonClosed {
				windows[lc.Account] = append(windows[lc.Account], window{from: lc.Start})
				openFreeze[lc.Account] = len(windows[lc.Account]) - 1
			}
		case ActionUnfreeze:
			if i, ok := openFreeze[lc.Account]; ok && lc.Code == "OK" {
				windows[lc.Account][i].to = lc.End
				delete(openFreeze, lc.Account)
			}
		case ActionClose:
			if lc.Code == "OK" || !lc.Definite {
				windows[lc.Account] = append(windows[lc.Account], window{from: lc.Start})
			}
			if lc.Code == "OK" && lc.Status == "ACCOUNT_STATUS_CLOSED" {
				closed[lc.Account] = true
			}
		}
	}

	// An op refused ACCOUNT_NOT_ACTIVE must have overlapped a window of
	// one of its accounts (or of its batch's).
	batchAccounts := map[string][]string{}
	for _, o := range c.h.Ops {
		if o.BatchKey != "" {
			batchAccounts[o.BatchKey] = append(batchAccounts[o.BatchKey], o.Account, o.Counterparty)
		}
	}
	notActive := 0
	for _, o := range c.h.Ops {
		if o.FinalReason != reasonNotActive {
			continue
		}
		notActive++
		c.checked(InvLifecycleAnswers, 1)
		accts := append([]string{o.Account, o.Counterparty}, batchAccounts[o.BatchKey]...)
		found := false
		for _, a := range accts {
			for _, w := range windows[a] {
				if !w.from.After(o.End) && (w.to.IsZero() || !w.to.Before(o.Start)) {
					found = true
				}
			}
		}
		if !found {
			c.fail(InvLifecycleAnswers, "%s key %s account %s: refused ACCOUNT_NOT_ACTIVE (%s..%s) while none of its accounts was frozen or closed",
				o.Kind, o.Key, o.Account, o.Start.Format("15:04:05.000"), o.End.Format("15:04:05.000"))
		}
	}

	for _, id := range sortedKeys(c.db.Accounts) {
		a := c.db.Accounts[id]
		c.checked(InvLifecycleAnswers, 1)
		want := int16(StatusActive)
		if closed[id] {
			want = StatusClosed
		}
		if a.Status != want {
			c.fail(InvLifecycleAnswers, "account %s ends with status %d, expected %d", id, a.Status, want)
		}
	}
	var parts []string
	for _, k := range sortedKeys(answers) {
		parts = append(parts, fmt.Sprintf("%s %d", k, answers[k]))
	}
	r.Note = fmt.Sprintf("%d lifecycle calls (%s; %d retried); %d ops refused ACCOUNT_NOT_ACTIVE; %d accounts closed",
		len(calls), strings.Join(parts, ", "), retried, notActive, len(closed))
}

// feedPos is a feed position: an events row's (xid, event_id).
type feedPos struct {
	xid uint64
	id  int64
}

func (p feedPos) less(q feedPos) bool { return p.xid < q.xid || p.xid == q.xid && p.id < q.id }

// parseFeedCursor parses a c1.<xid>.<event_id> cursor.
func parseFeedCursor(s string) (feedPos, bool) {
	rest, ok := strings.CutPrefix(s, "c1.")
	x, i, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 {
		return feedPos{}, false
	}
	xid, err := strconv.ParseUint(x, 10, 64)
	if err != nil {
		return feedPos{}, false
	}
	id, err := strconv.ParseInt(i, 10, 64)
	if err != nil {
		return feedPos{}, false
	}
	return feedPos{xid, id}, true
}

// checkFeed compares what the follower received with the events table and
// the transfers.
func (c *checker) checkFeed() {
	r := c.results[InvFeedExactlyOnce]
	f := c.h.Feed
	if f == nil {
		r.Skipped, r.Note = true, "no feed follower (a rolling upgrade's previous release may lack the feed)"
		return
	}
	c.checked(InvFeedExactlyOnce, len(f.Events)+len(c.db.Events)+len(c.db.Transfers))
	if !f.CaughtUp {
		c.fail(InvFeedExactlyOnce, "the follower did not catch up: it received %d events, the events table has %d", len(f.Events), len(c.db.Events))
	}
	dbEvents := make(map[feedPos]*EventRow, len(c.db.Events))
	for i := range c.db.Events {
		e := &c.db.Events[i]
		dbEvents[feedPos{e.XID, e.ID}] = e
	}
	seen := make(map[feedPos]int, len(f.Events))
	transferEvents := map[string]int{}
	var prev feedPos
	for i, e := range f.Events {
		p, ok := parseFeedCursor(e.Cursor)
		if !ok {
			c.fail(InvFeedExactlyOnce, "event #%d (%s %s) has cursor %q, not a feed cursor", i, e.Kind, e.Subject, e.Cursor)
			continue
		}
		seen[p]++
		if e.Kind == "transfer" {
			transferEvents[e.Subject]++
		}
		if seen[p] > 1 {
			c.fail(InvFeedExactlyOnce, "event %s (%s %s) received %d times (again as #%d)", e.Cursor, e.Kind, e.Subject, seen[p], i)
			continue
		}
		if i > 0 && !prev.less(p) {
			c.fail(InvFeedExactlyOnce, "event #%d %s (%s %s) came after %s: cursors must increase", i, e.Cursor, e.Kind, e.Subject, f.Events[i-1].Cursor)
		}
		prev = p
		switch d := dbEvents[p]; {
		case d == nil:
			c.fail(InvFeedExactlyOnce, "received event %s (%s %s) is not in the events table", e.Cursor, e.Kind, e.Subject)
		case d.Kind != e.Kind || d.Subject != e.Subject:
			c.fail(InvFeedExactlyOnce, "received event %s is %s %s, the events row is %s %s", e.Cursor, e.Kind, e.Subject, d.Kind, d.Subject)
		}
	}
	missing := 0
	for _, d := range c.db.Events {
		if seen[feedPos{d.XID, d.ID}] == 0 {
			missing++
			c.fail(InvFeedExactlyOnce, "events row c1.%d.%d (%s %s) was never received", d.XID, d.ID, d.Kind, d.Subject)
		}
	}
	for _, t := range c.db.Transfers {
		switch n := transferEvents[t.ID]; {
		case n == 0:
			c.fail(InvFeedExactlyOnce, "transfer %s (key %s) never came in the feed", t.ID, t.Key)
		case n > 1:
			c.fail(InvFeedExactlyOnce, "transfer %s came in the feed %d times", t.ID, n)
		}
	}
	for _, id := range sortedKeys(transferEvents) {
		if c.transfersByID[id] == nil {
			c.fail(InvFeedExactlyOnce, "the feed has transfer %s, which is not in transfers", id)
		}
	}
	r.Note = fmt.Sprintf("%d events received over %d Export calls (%d ended in an error), %d in the events table (%d never received), %d transfers",
		len(f.Events), f.Sessions, len(f.Errors), len(c.db.Events), missing, len(c.db.Transfers))
}

// checkReconcile requires the final Reconcile run to have completed with no
// findings.
func (c *checker) checkReconcile() {
	r := c.results[InvReconcileClean]
	rl := c.h.Reconcile
	if rl == nil {
		r.Skipped, r.Note = true, "Reconcile was not run"
		return
	}
	c.checked(InvReconcileClean, max(int(rl.AccountsChecked), 1))
	if rl.Error != "" {
		c.fail(InvReconcileClean, "Reconcile did not complete: %s", rl.Error)
	}
	for _, f := range rl.Findings {
		c.fail(InvReconcileClean, "finding %s", f)
	}
	if rl.Summary && rl.SummaryFindings != int64(len(rl.Findings)) {
		c.fail(InvReconcileClean, "the summary counts %d findings, %d were streamed", rl.SummaryFindings, len(rl.Findings))
	}
	r.Note = fmt.Sprintf("%d accounts checked, %d findings", rl.AccountsChecked, len(rl.Findings))
}
