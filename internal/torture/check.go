package torture

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// Invariant names. Tests and the JSON output use these; keep them stable.
const (
	InvKeysAtMostOnce        = "keys_applied_at_most_once"
	InvNoUnsentTransfers     = "no_unsent_transfers"
	InvAckedPresent          = "acked_ops_present"
	InvFinalAnswersMatchDB   = "final_answers_match_db"
	InvOpsAnswered           = "ops_answered"
	InvTransferEntries       = "transfer_entries_match"
	InvBalanceEqualsEntries  = "balance_equals_entry_sum"
	InvSequencesGapless      = "sequences_gapless"
	InvRunningBalance        = "running_balance"
	InvVersionsConsistent    = "versions_consistent"
	InvFloorRespected        = "floor_respected"
	InvCurrencySumsZero      = "currency_sums_zero"
	InvBalanceMatchesHistory = "balance_matches_history"
	InvReadsExisted          = "reads_existed"
	InvStrongReadsFresh      = "strong_reads_fresh"
	InvMinVersionReads       = "min_version_reads"
	InvCachedReadAge         = "cached_read_age_bound"
	InvCacheMatchesDB        = "cache_matches_db_after_heal"
	InvNoInternalAnswers     = "no_internal_answers"
	InvNoUnexpectedAnswers   = "no_unexpected_answers"
	InvNoTallydCrashes       = "no_tallyd_crashes"
	InvHeldMatchesHolds      = "held_matches_open_holds"
	InvHoldsOneFinalAction   = "holds_one_final_action"
	InvRefundsWithinCharge   = "refunds_within_charge"
	InvBatchesAllOrNothing   = "batches_all_or_nothing"
	InvLifecycleAnswers      = "lifecycle_answers"
	InvFeedExactlyOnce       = "feed_exactly_once"
	InvReconcileClean        = "reconcile_clean"
)

// invariantDescriptions says what each invariant means, in the order the
// summary prints them.
var invariantDescriptions = []struct{ name, desc string }{
	{InvKeysAtMostOnce, "every idempotency key produced at most one transfer or hold, and idempotency_keys agrees with transfers and holds"},
	{InvNoUnsentTransfers, "every transfer, hold, idempotency key and batch in Postgres belongs to a request some client sent"},
	{InvAckedPresent, "every acknowledged op is in Postgres with the acknowledged transfer or hold id, kind, accounts and amount, its key row, and the acknowledged (version, balance)"},
	{InvFinalAnswersMatchDB, "every definite answer matches Postgres: a success is there; a rejection left no transfer or hold and its key row holds that rejection; an item of an ATOMIC batch answered not applied left nothing, not even its key; two answers to one key agree"},
	{InvOpsAnswered, "after healing, every op got a definite answer before its deadline"},
	{InvTransferEntries, "every transfer has exactly one debit and one credit entry of its amount, in its currency"},
	{InvBalanceEqualsEntries, "each account's balance equals the sum of its entries and its last balance_after"},
	{InvSequencesGapless, "each account's entry sequences run 1..n without gaps, and last_sequence = n"},
	{InvRunningBalance, "each entry's balance_after equals the previous balance_after plus its amount"},
	{InvVersionsConsistent, "version_after strictly increases; created_at never goes back; the account's version is its entries plus holds created, holds released, lifecycle changes and expiry write-downs (between 1 and its number of expired holds, if any)"},
	{InvFloorRespected, "no FLOOR_NON_NEGATIVE account ever went below -credit_limit, nor ends with balance - held below it"},
	{InvCurrencySumsZero, "per currency, all balances (and all entries) sum to zero"},
	{InvBalanceMatchesHistory, "each balance equals acknowledged credits minus acknowledged debits, plus ops of unknown outcome that Postgres shows applied"},
	{InvReadsExisted, "every balance read is a (version, balance) pair that really existed: version at most the account's, and balance that of the last entry with version_after <= version"},
	{InvStrongReadsFresh, "a STRONG read came from Postgres and was never older than a write the same client had seen acknowledged"},
	{InvMinVersionReads, "a read with min_version never returned an older version (nor VERSION_NOT_REACHED for an acknowledged version)"},
	{InvCachedReadAge, "a cached read was never superseded for longer than the cache TTL (plus slack), hand-planted values aside"},
	{InvCacheMatchesDB, "after healing and one cache TTL, every balance cached in Redis equals Postgres (or is absent)"},
	{InvNoInternalAnswers, "the service never answered INTERNAL or UNKNOWN, faults or not"},
	{InvNoUnexpectedAnswers, "no valid request got a final answer other than success or a business rejection; no first answer was a replay; no two answers to one key both claim to have executed it"},
	{InvNoTallydCrashes, "no tallyd exited unless the nemesis killed it; a SIGTERM'ed tallyd drained and exited 0 in time"},
	{InvHeldMatchesHolds, "every account's held is non-negative, only on FLOOR_NON_NEGATIVE accounts, and equals the sum of its holds stored as open, in its currency"},
	{InvHoldsOneFinalAction, "every hold has a valid status and 0 <= captured_amount <= amount; a captured hold has exactly one capture (a CHARGE from its account naming it) of captured_amount, any other none; no two final actions on one hold were acknowledged"},
	{InvRefundsWithinCharge, "every REFUND reverses a CHARGE (debit its credit account, credit its debit account); per charge, the refunds sum to charge_refunds.refunded and never exceed it"},
	{InvBatchesAllOrNothing, "every stored batch was sent, with its mode; an ATOMIC batch applied all its items or left none of their keys; an INDEPENDENT one recorded every item; an acknowledged batch is stored as answered, an unanswered one without a row left no item"},
	{InvLifecycleAnswers, "every lifecycle call (freeze, unfreeze, update, close; no key, retried as is) got a definite expected answer (an update lowering the credit limit below what is in use: CREDIT_LIMIT_IN_USE); a closed account refused charges, credits, holds (ACCOUNT_NOT_ACTIVE or ACCOUNT_CLOSED), freezes and updates (ACCOUNT_CLOSED); ACCOUNT_NOT_ACTIVE only while one of the op's accounts was frozen or closed; every account ends ACTIVE but the closed ones"},
	{InvFeedExactlyOnce, "the change-feed follower (Export with follow, failing over between tallyds and resuming from its cursor) caught up and received every events row exactly once, in strictly increasing cursor order, and nothing that is not in Postgres; every transfer in Postgres came as exactly one transfer event"},
	{InvReconcileClean, "after healing, a Reconcile of every account and the ledger-wide sums completed and found nothing"},
}

func init() { invariantDescriptions = append(invariantDescriptions, topUpInvariantDescriptions...) }

// InvariantResult is one invariant's verdict.
type InvariantResult struct {
	Name        string   `json:"name"`
	Description string   `json:"description"`
	Pass        bool     `json:"pass"`
	Skipped     bool     `json:"skipped,omitempty"`
	Checked     int      `json:"checked"`
	Violations  int      `json:"violations"`
	Note        string   `json:"note,omitempty"`
	Examples    []string `json:"examples,omitempty"`
}

// CheckOptions tunes the checker.
type CheckOptions struct {
	// CacheTTL is tallyd's --cache-ttl; required for the age bound.
	CacheTTL time.Duration
	// AgeSlack is added to CacheTTL for the age bound (commit latency,
	// injected Redis latency, clock reads); default 2s.
	AgeSlack time.Duration
	// ExamplesMax caps the examples listed per invariant; default 20.
	ExamplesMax int
}

type checker struct {
	h   *History
	db  *DBState
	cs  *CacheState
	opt CheckOptions

	results map[string]*InvariantResult

	opsByKey        map[string]*Op
	batchesByKey    map[string]*Batch
	transfersByKey  map[string][]*TransferRow
	holdsByKey      map[string][]*HoldRow
	holdsByID       map[string]*HoldRow
	capturesByHold  map[string][]*TransferRow
	refundsByCharge map[string][]*TransferRow
	chargeRefunds   map[string]*ChargeRefundRow
	dbBatchesByKey  map[string][]*BatchRow
	transfersByID   map[string]*TransferRow
	keysByKey       map[string][]*KeyRow
	entriesByXfer   map[string][]EntryRow
	entryByVersion  map[string]map[int64]*EntryRow // account -> version_after -> entry
	sysAccounts     map[string]string              // currency+"/"+role -> account id
	plantsByAccount map[string][]Plant
}

// Check runs every invariant over a finished run's history and the final
// database and cache state. cs may be nil, which skips the cache invariant.
// The results come in a fixed order.
func Check(h *History, db *DBState, cs *CacheState, opt CheckOptions) []InvariantResult {
	if opt.AgeSlack <= 0 {
		opt.AgeSlack = 2 * time.Second
	}
	if opt.ExamplesMax <= 0 {
		opt.ExamplesMax = 20
	}
	c := &checker{h: h, db: db, cs: cs, opt: opt, results: map[string]*InvariantResult{}}
	for _, d := range invariantDescriptions {
		c.results[d.name] = &InvariantResult{Name: d.name, Description: d.desc, Pass: true}
	}
	c.index()
	c.checkKeys()
	c.checkUnsent()
	c.checkAcked()
	c.checkFinalAnswers()
	c.checkAnswered()
	c.checkTransferEntries()
	c.checkStatements()
	c.checkCurrencySums()
	c.checkBalanceHistory()
	c.checkReads()
	c.checkCache()
	c.checkAnswers()
	c.checkCrashes()
	c.checkHeld()
	c.checkHolds()
	c.checkRefunds()
	c.checkBatches()
	c.checkLifecycle()
	c.checkFeed()
	c.checkReconcile()
	c.checkTopUps()

	out := make([]InvariantResult, 0, len(invariantDescriptions))
	for _, d := range invariantDescriptions {
		r := c.results[d.name]
		r.Pass = r.Violations == 0
		out = append(out, *r)
	}
	return out
}

func (c *checker) checked(name string, n int) { c.results[name].Checked += n }

func (c *checker) fail(name, format string, args ...any) {
	r := c.results[name]
	r.Violations++
	if len(r.Examples) < c.opt.ExamplesMax {
		r.Examples = append(r.Examples, fmt.Sprintf(format, args...))
	}
}

func (c *checker) index() {
	c.opsByKey = make(map[string]*Op, len(c.h.Ops))
	for _, o := range c.h.Ops {
		c.opsByKey[o.Key] = o
	}
	c.batchesByKey = make(map[string]*Batch, len(c.h.Batches))
	for _, b := range c.h.Batches {
		c.batchesByKey[b.Key] = b
	}
	c.transfersByKey = make(map[string][]*TransferRow, len(c.db.Transfers))
	c.transfersByID = make(map[string]*TransferRow, len(c.db.Transfers))
	c.capturesByHold = map[string][]*TransferRow{}
	c.refundsByCharge = map[string][]*TransferRow{}
	for i := range c.db.Transfers {
		t := &c.db.Transfers[i]
		c.transfersByKey[t.Key] = append(c.transfersByKey[t.Key], t)
		c.transfersByID[t.ID] = t
		if t.HoldID != "" {
			c.capturesByHold[t.HoldID] = append(c.capturesByHold[t.HoldID], t)
		}
		if t.RefundOf != "" {
			c.refundsByCharge[t.RefundOf] = append(c.refundsByCharge[t.RefundOf], t)
		}
	}
	c.holdsByKey = make(map[string][]*HoldRow, len(c.db.Holds))
	c.holdsByID = make(map[string]*HoldRow, len(c.db.Holds))
	for i := range c.db.Holds {
		h := &c.db.Holds[i]
		c.holdsByKey[h.Key] = append(c.holdsByKey[h.Key], h)
		c.holdsByID[h.ID] = h
	}
	c.chargeRefunds = make(map[string]*ChargeRefundRow, len(c.db.ChargeRefunds))
	for i := range c.db.ChargeRefunds {
		r := &c.db.ChargeRefunds[i]
		c.chargeRefunds[r.TransferID] = r
	}
	c.dbBatchesByKey = make(map[string][]*BatchRow, len(c.db.Batches))
	for i := range c.db.Batches {
		b := &c.db.Batches[i]
		c.dbBatchesByKey[b.Key] = append(c.dbBatchesByKey[b.Key], b)
	}
	c.keysByKey = make(map[string][]*KeyRow, len(c.db.Keys))
	for i := range c.db.Keys {
		k := &c.db.Keys[i]
		c.keysByKey[k.Key] = append(c.keysByKey[k.Key], k)
	}
	c.entriesByXfer = map[string][]EntryRow{}
	c.entryByVersion = map[string]map[int64]*EntryRow{}
	for acct, es := range c.db.Entries {
		m := make(map[int64]*EntryRow, len(es))
		for i := range es {
			e := &es[i]
			c.entriesByXfer[e.TransferID] = append(c.entriesByXfer[e.TransferID], *e)
			if _, dup := m[e.VersionAfter]; !dup {
				m[e.VersionAfter] = e
			}
		}
		c.entryByVersion[acct] = m
	}
	c.sysAccounts = map[string]string{}
	for _, a := range c.db.Accounts {
		if a.SystemRole != "" {
			c.sysAccounts[a.Currency+"/"+a.SystemRole] = a.ID
		}
	}
	c.plantsByAccount = map[string][]Plant{}
	for _, p := range c.h.Plants {
		if !p.Garbage {
			c.plantsByAccount[p.Account] = append(c.plantsByAccount[p.Account], p)
		}
	}
}

// logical is the account a row belongs to: the account itself, or for a
// shard row the account it is a shard of.
func (c *checker) logical(id string) string {
	if a, ok := c.db.Accounts[id]; ok && a.ShardOf != "" {
		return a.ShardOf
	}
	return id
}

// sides returns the debit and credit accounts an op's request means, with
// default system accounts resolved from the database.
func (c *checker) sides(o *Op) (debit, credit, currency string) {
	if a, ok := c.db.Accounts[o.Account]; ok {
		currency = a.Currency
	}
	switch o.Kind {
	case KindCharge:
		debit, credit = o.Account, o.Counterparty
		if credit == "" {
			credit = c.sysAccounts[currency+"/revenue"]
		}
	case KindCredit:
		debit, credit = o.Counterparty, o.Account
		if debit == "" {
			debit = c.sysAccounts[currency+"/funding"]
		}
	case KindTransfer:
		debit, credit = o.Account, o.Counterparty
	case KindRefund: // the charge's revenue account pays the customer back
		debit, credit = o.Counterparty, o.Account
		if debit == "" {
			debit = c.sysAccounts[currency+"/revenue"]
		}
	case KindCapture:
		debit, credit = o.Account, o.Counterparty
		if credit == "" {
			credit = c.sysAccounts[currency+"/revenue"]
		}
	}
	return debit, credit, currency
}

// keyApplied reports whether Postgres shows the op with this key applied:
// a transfer or hold under it, or a successful key row (a ReleaseHold
// leaves only that).
func (c *checker) keyApplied(key string) bool {
	if len(c.transfersByKey[key]) > 0 || len(c.holdsByKey[key]) > 0 {
		return true
	}
	for _, k := range c.keysByKey[key] {
		if k.TransferID != "" || k.HoldID != "" {
			return true
		}
	}
	return false
}

// keyLeftAnything reports whether anything at all is stored under key.
func (c *checker) keyLeftAnything(key string) bool {
	return len(c.transfersByKey[key]) > 0 || len(c.holdsByKey[key]) > 0 || len(c.keysByKey[key]) > 0
}

func (c *checker) checkKeys() {
	keys := map[string]bool{}
	for k := range c.transfersByKey {
		keys[k] = true
	}
	for k := range c.keysByKey {
		keys[k] = true
	}
	for k := range c.holdsByKey {
		keys[k] = true
	}
	c.checked(InvKeysAtMostOnce, len(keys))
	for _, key := range sortedKeys(keys) {
		ts := c.transfersByKey[key]
		ks := c.keysByKey[key]
		hs := c.holdsByKey[key]
		if len(ts) > 1 {
			ids := make([]string, len(ts))
			for i, t := range ts {
				ids[i] = t.ID
			}
			c.fail(InvKeysAtMostOnce, "key %s produced %d transfers: %s", key, len(ts), strings.Join(ids, ", "))
		}
		if len(hs) > 1 {
			c.fail(InvKeysAtMostOnce, "key %s produced %d holds", key, len(hs))
		}
		if len(ts) > 0 && len(hs) > 0 {
			c.fail(InvKeysAtMostOnce, "key %s produced both transfer %s and hold %s", key, ts[0].ID, hs[0].ID)
		}
		if len(ks) > 1 {
			c.fail(InvKeysAtMostOnce, "key %s has %d idempotency_keys rows", key, len(ks))
		}
		if len(ks) == 0 {
			switch {
			case len(ts) > 0:
				c.fail(InvKeysAtMostOnce, "key %s has transfer %s but no idempotency_keys row", key, ts[0].ID)
			case len(hs) > 0:
				c.fail(InvKeysAtMostOnce, "key %s has hold %s but no idempotency_keys row", key, hs[0].ID)
			}
			continue
		}
		k := ks[0]
		if k.TransferID == "" && k.HoldID == "" {
			switch {
			case len(ts) > 0:
				c.fail(InvKeysAtMostOnce, "key %s is recorded as rejected (%s) but has transfer %s", key, k.ErrorReason, ts[0].ID)
			case len(hs) > 0:
				c.fail(InvKeysAtMostOnce, "key %s is recorded as rejected (%s) but has hold %s", key, k.ErrorReason, hs[0].ID)
			}
			continue
		}
		if k.TransferID != "" {
			t, ok := c.transfersByID[k.TransferID]
			switch {
			case !ok:
				c.fail(InvKeysAtMostOnce, "key %s points to missing transfer %s", key, k.TransferID)
			case t.Key != key:
				c.fail(InvKeysAtMostOnce, "key %s points to transfer %s of key %s", key, t.ID, t.Key)
			case k.HoldID != "" && t.HoldID != k.HoldID:
				c.fail(InvKeysAtMostOnce, "key %s points to hold %s but its transfer %s captured hold %q", key, k.HoldID, t.ID, t.HoldID)
			}
		} else if len(ts) > 0 {
			c.fail(InvKeysAtMostOnce, "key %s has transfer %s but its idempotency_keys row names none", key, ts[0].ID)
		}
		if k.HoldID != "" {
			h, ok := c.holdsByID[k.HoldID]
			switch {
			case !ok:
				c.fail(InvKeysAtMostOnce, "key %s points to missing hold %s", key, k.HoldID)
			case k.Kind == KindHold.kindNumber() && h.Key != key:
				c.fail(InvKeysAtMostOnce, "Hold key %s points to hold %s of key %s", key, h.ID, h.Key)
			case k.Kind == KindRelease.kindNumber() && h.Status != HoldReleased:
				c.fail(InvKeysAtMostOnce, "ReleaseHold key %s succeeded but hold %s has status %d", key, h.ID, h.Status)
			}
		}
		if len(hs) > 0 && (k.Kind != KindHold.kindNumber() || k.HoldID != hs[0].ID) {
			c.fail(InvKeysAtMostOnce, "key %s created hold %s but its idempotency_keys row (kind %d) names hold %q", key, hs[0].ID, k.Kind, k.HoldID)
		}
		if k.Kind == KindHold.kindNumber() && len(hs) == 0 {
			c.fail(InvKeysAtMostOnce, "Hold key %s succeeded but created no hold", key)
		}
	}
}

func (c *checker) checkUnsent() {
	c.checked(InvNoUnsentTransfers, len(c.db.Transfers)+len(c.db.Keys)+len(c.db.Holds)+len(c.db.Batches))
	for _, t := range c.db.Transfers {
		if isTopUpCredit(&t) {
			continue // tallyd's own credit of a paid top-up: see topup_payment_credited_once
		}
		if _, ok := c.opsByKey[t.Key]; !ok {
			c.fail(InvNoUnsentTransfers, "transfer %s has key %q that no client sent (%d from %s to %s)", t.ID, t.Key, t.Amount, t.Debit, t.Credit)
		}
	}
	for _, k := range c.db.Keys {
		if k.Scope == topUpScope && strings.HasPrefix(k.Key, topUpCreditKeyPrefix) {
			continue
		}
		if _, ok := c.opsByKey[k.Key]; !ok {
			c.fail(InvNoUnsentTransfers, "idempotency key %q was never sent by a client", k.Key)
		}
	}
	for _, h := range c.db.Holds {
		if _, ok := c.opsByKey[h.Key]; !ok {
			c.fail(InvNoUnsentTransfers, "hold %s has key %q that no client sent (%d on %s)", h.ID, h.Key, h.Amount, h.Account)
		}
	}
	for _, b := range c.db.Batches {
		if _, ok := c.batchesByKey[b.Key]; !ok {
			c.fail(InvNoUnsentTransfers, "batch key %q was never sent by a client", b.Key)
		}
	}
}

// ackedProblems lists how Postgres disagrees with an acknowledged op.
func (c *checker) ackedProblems(o *Op) []string {
	var bad []string
	ks := c.keysByKey[o.Key]
	switch o.Kind {
	case KindHold:
		hs := c.holdsByKey[o.Key]
		if len(hs) == 0 {
			return []string{fmt.Sprintf("hold %s is not in holds", o.HoldID)}
		}
		h := hs[0]
		if h.ID != o.HoldID {
			bad = append(bad, fmt.Sprintf("hold id %s, acked %s", h.ID, o.HoldID))
		}
		if h.Account != o.Account || h.Amount != o.Amount || h.Revenue != o.Counterparty {
			bad = append(bad, fmt.Sprintf("hold of %d on %s (revenue %q), sent %d on %s (revenue %q)",
				h.Amount, h.Account, h.Revenue, o.Amount, o.Account, o.Counterparty))
		}
		if len(ks) == 0 {
			bad = append(bad, "no idempotency_keys row")
		} else if ks[0].HoldID != h.ID {
			bad = append(bad, fmt.Sprintf("idempotency_keys row points to hold %q", ks[0].HoldID))
		}
		if ok, why := c.pairExisted(o.Account, o.BalanceVersion, o.BalanceAfter, time.Time{}); !ok {
			bad = append(bad, fmt.Sprintf("acked balance (v%d, %d) never existed: %s", o.BalanceVersion, o.BalanceAfter, why))
		}
		return bad
	case KindRelease:
		h, ok := c.holdsByID[o.HoldID]
		if !ok {
			return []string{fmt.Sprintf("released hold %s is not in holds", o.HoldID)}
		}
		if h.Status != HoldReleased {
			bad = append(bad, fmt.Sprintf("hold %s has status %d, not released", h.ID, h.Status))
		}
		if len(ks) == 0 {
			bad = append(bad, "no idempotency_keys row")
		} else if ks[0].HoldID != h.ID || ks[0].TransferID != "" {
			bad = append(bad, fmt.Sprintf("idempotency_keys row points to hold %q transfer %q", ks[0].HoldID, ks[0].TransferID))
		}
		if ok, why := c.pairExisted(o.Account, o.BalanceVersion, o.BalanceAfter, time.Time{}); !ok {
			bad = append(bad, fmt.Sprintf("acked balance (v%d, %d) never existed: %s", o.BalanceVersion, o.BalanceAfter, why))
		}
		return bad
	}
	ts := c.transfersByKey[o.Key]
	if len(ts) == 0 {
		return []string{fmt.Sprintf("transfer %s (amount %d) is not in transfers", o.TransferID, o.Amount)}
	}
	t := ts[0]
	for _, x := range ts {
		if x.ID == o.TransferID {
			t = x
		}
	}
	debit, credit, currency := c.sides(o)
	if t.ID != o.TransferID {
		bad = append(bad, fmt.Sprintf("transfer id %s, acked %s", t.ID, o.TransferID))
	}
	if t.Kind != o.Kind.transferKind() {
		bad = append(bad, fmt.Sprintf("kind %d, sent %s", t.Kind, o.Kind))
	}
	if t.Amount != o.Amount {
		bad = append(bad, fmt.Sprintf("amount %d, sent %d", t.Amount, o.Amount))
	}
	if c.logical(t.Debit) != debit || c.logical(t.Credit) != credit {
		bad = append(bad, fmt.Sprintf("accounts %s->%s, sent %s->%s", t.Debit, t.Credit, debit, credit))
	}
	if t.Currency != currency {
		bad = append(bad, fmt.Sprintf("currency %s, account's is %s", t.Currency, currency))
	}
	switch o.Kind {
	case KindRefund:
		if t.RefundOf != o.ChargeID {
			bad = append(bad, fmt.Sprintf("refund_of %q, sent %s", t.RefundOf, o.ChargeID))
		}
	case KindCapture:
		if t.HoldID != o.HoldID {
			bad = append(bad, fmt.Sprintf("hold_id %q, sent %s", t.HoldID, o.HoldID))
		}
		if h, ok := c.holdsByID[o.HoldID]; !ok {
			bad = append(bad, fmt.Sprintf("captured hold %s is not in holds", o.HoldID))
		} else if h.Status != HoldCaptured || h.CapturedAmount != o.Amount || h.CaptureTransferID != t.ID {
			bad = append(bad, fmt.Sprintf("hold %s has status %d, captured %d by %q", h.ID, h.Status, h.CapturedAmount, h.CaptureTransferID))
		}
	}
	if len(ks) == 0 {
		bad = append(bad, "no idempotency_keys row")
	} else if ks[0].TransferID != t.ID {
		bad = append(bad, fmt.Sprintf("idempotency_keys row points to %q", ks[0].TransferID))
	}
	var named *EntryRow
	for _, e := range c.entriesByXfer[t.ID] {
		if e.Account == o.Account {
			e := e
			named = &e
		}
	}
	if named == nil {
		bad = append(bad, "no entry on the named account")
	} else if named.VersionAfter != o.BalanceVersion || named.BalanceAfter != o.BalanceAfter {
		bad = append(bad, fmt.Sprintf("acked balance (v%d, %d) but the entry has (v%d, %d)",
			o.BalanceVersion, o.BalanceAfter, named.VersionAfter, named.BalanceAfter))
	}
	return bad
}

func (c *checker) checkAcked() {
	retried, inBatches := 0, 0
	for _, o := range c.h.Ops {
		if o.Outcome != OutcomeAcked {
			continue
		}
		c.checked(InvAckedPresent, 1)
		if o.Retried() {
			retried++
		}
		if o.BatchKey != "" {
			inBatches++
		}
		if bad := c.ackedProblems(o); len(bad) > 0 {
			c.fail(InvAckedPresent, "acked %s key %s account %s: %s", o.Kind, o.Key, o.Account, strings.Join(bad, "; "))
		}
	}
	c.results[InvAckedPresent].Note = fmt.Sprintf("%d of them retried, %d batch items", retried, inBatches)
}

// ackedFound reports whether the acknowledged transfer or hold is in Postgres.
func (c *checker) ackedFound(o *Op) bool {
	switch o.Kind {
	case KindHold:
		for _, h := range c.holdsByKey[o.Key] {
			if h.ID == o.HoldID {
				return true
			}
		}
		return false
	case KindRelease:
		for _, k := range c.keysByKey[o.Key] {
			if k.HoldID == o.HoldID && k.ErrorReason == "" {
				return true
			}
		}
		return false
	}
	for _, t := range c.transfersByKey[o.Key] {
		if t.ID == o.TransferID {
			return true
		}
	}
	return false
}

func (c *checker) checkFinalAnswers() {
	retried, rejections, notApplied := 0, 0, 0
	for _, o := range c.h.Ops {
		if o.Outcome != OutcomeAcked && o.Outcome != OutcomeRejected && o.Outcome != OutcomeNotApplied {
			continue
		}
		c.checked(InvFinalAnswersMatchDB, 1)
		if o.Retried() {
			retried++
		}
		ts := c.transfersByKey[o.Key]
		hs := c.holdsByKey[o.Key]
		ks := c.keysByKey[o.Key]
		wantHold := ""
		if o.Outcome == OutcomeAcked {
			wantHold = o.HoldID
		}
		for _, h := range o.HedgeAnswers {
			if h.Code != o.FinalCode || h.Reason != o.FinalReason || h.TransferID != o.TransferID || h.HoldID != wantHold {
				c.fail(InvFinalAnswersMatchDB, "key %s sent twice at once got different answers: %s %s %s%s and %s %s %s%s",
					o.Key, o.FinalCode, o.FinalReason, o.TransferID, wantHold, h.Code, h.Reason, h.TransferID, h.HoldID)
			}
		}
		switch o.Outcome {
		case OutcomeAcked:
			if !c.ackedFound(o) {
				c.fail(InvFinalAnswersMatchDB, "%s key %s answered success (transfer %q, hold %q, %d attempts) but that is not in Postgres",
					o.Kind, o.Key, o.TransferID, o.HoldID, o.Attempts)
			}
			continue
		case OutcomeNotApplied:
			notApplied++
			if c.keyLeftAnything(o.Key) {
				c.fail(InvFinalAnswersMatchDB, "%s key %s, item %d of ATOMIC batch %s answered not applied (%s %s), left %d transfers, %d holds, %d key rows",
					o.Kind, o.Key, o.BatchIndex, o.BatchKey, o.FinalCode, o.FinalReason, len(ts), len(hs), len(ks))
			}
			continue
		}
		rejections++
		if len(ts) > 0 {
			c.fail(InvFinalAnswersMatchDB, "key %s answered %s %s (%d attempts) but transfer %s exists", o.Key, o.FinalCode, o.FinalReason, o.Attempts, ts[0].ID)
		}
		if len(hs) > 0 {
			c.fail(InvFinalAnswersMatchDB, "key %s answered %s %s (%d attempts) but hold %s exists", o.Key, o.FinalCode, o.FinalReason, o.Attempts, hs[0].ID)
		}
		if len(ks) == 0 {
			c.fail(InvFinalAnswersMatchDB, "key %s answered %s %s (%d attempts) but no idempotency_keys row records it", o.Key, o.FinalCode, o.FinalReason, o.Attempts)
			continue
		}
		if ks[0].TransferID != "" || ks[0].HoldID != "" || ks[0].ErrorReason != o.FinalReason || ks[0].ErrorCode != o.FinalCode {
			c.fail(InvFinalAnswersMatchDB, "key %s answered %s %s (%d attempts) but idempotency_keys holds transfer=%q hold=%q %s %s",
				o.Key, o.FinalCode, o.FinalReason, o.Attempts, ks[0].TransferID, ks[0].HoldID, ks[0].ErrorCode, ks[0].ErrorReason)
		}
	}
	c.results[InvFinalAnswersMatchDB].Note = fmt.Sprintf("%d rejections; %d ATOMIC batch items not applied; %d retried ops", rejections, notApplied, retried)
}

func (c *checker) checkAnswered() {
	c.checked(InvOpsAnswered, len(c.h.Ops))
	for _, o := range c.h.Ops {
		if o.Outcome == OutcomeUnknown {
			applied := "not applied"
			if c.keyApplied(o.Key) {
				applied = "applied"
			} else if len(c.keysByKey[o.Key]) > 0 {
				applied = "rejected"
			}
			c.fail(InvOpsAnswered, "%s key %s account %s: no definite answer after %d attempts over %s (last %s; Postgres: %s)",
				o.Kind, o.Key, o.Account, o.Attempts, o.End.Sub(o.Start).Round(time.Millisecond), o.FinalCode, applied)
		}
	}
}

func (c *checker) checkTransferEntries() {
	c.checked(InvTransferEntries, len(c.db.Transfers))
	for _, t := range c.db.Transfers {
		es := c.entriesByXfer[t.ID]
		if len(es) != 2 {
			c.fail(InvTransferEntries, "transfer %s (key %s) has %d entries", t.ID, t.Key, len(es))
			continue
		}
		var debitOK, creditOK bool
		for _, e := range es {
			switch {
			case e.Account == t.Debit && e.Amount == -t.Amount:
				debitOK = true
			case e.Account == t.Credit && e.Amount == t.Amount:
				creditOK = true
			}
		}
		if !debitOK || !creditOK {
			c.fail(InvTransferEntries, "transfer %s (key %s, %d from %s to %s) has entries %+v", t.ID, t.Key, t.Amount, t.Debit, t.Credit, es)
		}
		for _, acct := range []string{t.Debit, t.Credit} {
			if a, ok := c.db.Accounts[acct]; !ok || a.Currency != t.Currency {
				c.fail(InvTransferEntries, "transfer %s (key %s) in %s touches account %s of another currency", t.ID, t.Key, t.Currency, acct)
			}
		}
	}
	for xfer, es := range c.entriesByXfer {
		if _, ok := c.transfersByID[xfer]; !ok {
			c.fail(InvTransferEntries, "entries %+v belong to no transfer", es)
		}
	}
}

// versionBumps counts, per account, what advanced its version besides
// entries: holds created and released, and (as a range) expiry write-downs.
type versionBumps struct {
	created, released, expired int64
}

func (c *checker) checkStatements() {
	bumps := map[string]*versionBumps{}
	for _, h := range c.db.Holds {
		b := bumps[h.Account]
		if b == nil {
			b = &versionBumps{}
			bumps[h.Account] = b
		}
		b.created++
		switch h.Status {
		case HoldReleased:
			b.released++
		case HoldExpired:
			b.expired++
		}
	}
	for _, id := range sortedKeys(c.db.Accounts) {
		a := c.db.Accounts[id]
		es := c.db.Entries[id]
		for _, n := range []string{InvBalanceEqualsEntries, InvSequencesGapless, InvRunningBalance, InvVersionsConsistent, InvFloorRespected} {
			c.checked(n, 1)
		}
		var sum, prevBal, prevVer int64
		var prevAt time.Time
		seqBad, runBad, verBad, floorBad := false, false, false, false
		floored := a.Floor == 1
		// The limit an entry is held to: credit limits go up and down, so
		// an old entry may have used a limit since lowered.
		entryLimit := max(a.CreditLimit, a.MaxCreditLimit)
		for i, e := range es {
			sum += e.Amount
			if e.Sequence != int64(i+1) && !seqBad {
				seqBad = true
				c.fail(InvSequencesGapless, "account %s: entry #%d has sequence %d", id, i+1, e.Sequence)
			}
			if e.BalanceAfter != prevBal+e.Amount && !runBad {
				runBad = true
				c.fail(InvRunningBalance, "account %s: sequence %d has balance_after %d, expected %d + %d = %d",
					id, e.Sequence, e.BalanceAfter, prevBal, e.Amount, prevBal+e.Amount)
			}
			if e.VersionAfter <= prevVer && !verBad {
				verBad = true
				c.fail(InvVersionsConsistent, "account %s: sequence %d has version_after %d after %d", id, e.Sequence, e.VersionAfter, prevVer)
			}
			if e.CreatedAt.Before(prevAt) && !verBad {
				verBad = true
				c.fail(InvVersionsConsistent, "account %s: sequence %d created_at %s before the previous entry's %s", id, e.Sequence, e.CreatedAt, prevAt)
			}
			if floored && e.BalanceAfter < -entryLimit && !floorBad {
				floorBad = true
				c.fail(InvFloorRespected, "account %s (credit_limit at most %d): sequence %d left balance %d", id, entryLimit, e.Sequence, e.BalanceAfter)
			}
			prevBal, prevVer, prevAt = e.BalanceAfter, e.VersionAfter, e.CreatedAt
		}
		if floored && a.Balance-a.Held < -a.CreditLimit && !floorBad {
			c.fail(InvFloorRespected, "account %s (credit_limit %d) has balance %d with %d held", id, a.CreditLimit, a.Balance, a.Held)
		}
		if a.Balance != sum || a.Balance != prevBal {
			c.fail(InvBalanceEqualsEntries, "account %s: balance %d, sum of %d entries %d, last balance_after %d", id, a.Balance, len(es), sum, prevBal)
		}
		if a.LastSequence != int64(len(es)) && !seqBad {
			c.fail(InvSequencesGapless, "account %s: last_sequence %d but %d entries", id, a.LastSequence, len(es))
		}
		if a.Version < prevVer && !verBad {
			verBad = true
			c.fail(InvVersionsConsistent, "account %s: version %d but last version_after %d", id, a.Version, prevVer)
		}
		// Every version step is an entry, a hold created or released, a
		// lifecycle change, or one transaction's write-down of expired holds.
		b := bumps[id]
		if b == nil {
			b = &versionBumps{}
		}
		base := int64(len(es)) + b.created + b.released + c.db.AccountChanges[id]
		lo, hi := base, base+b.expired
		if b.expired > 0 {
			lo++
		}
		if (a.Version < lo || a.Version > hi) && !verBad {
			c.fail(InvVersionsConsistent, "account %s: version %d, but %d entries, %d holds created, %d released, %d lifecycle changes and %d expired allow %d..%d",
				id, a.Version, len(es), b.created, b.released, c.db.AccountChanges[id], b.expired, lo, hi)
		}
	}
}

func (c *checker) checkCurrencySums() {
	bal := map[string]int64{}
	ent := map[string]int64{}
	for _, a := range c.db.Accounts {
		bal[a.Currency] += a.Balance
		for _, e := range c.db.Entries[a.ID] {
			ent[a.Currency] += e.Amount
		}
	}
	c.checked(InvCurrencySumsZero, len(bal))
	for _, cur := range sortedKeys(bal) {
		if bal[cur] != 0 || ent[cur] != 0 {
			c.fail(InvCurrencySumsZero, "currency %s: balances sum to %d, entries to %d", cur, bal[cur], ent[cur])
		}
	}
}

func (c *checker) checkBalanceHistory() {
	expected := map[string]int64{}
	resolvedApplied, resolvedNot := 0, 0
	for _, o := range c.h.Ops {
		applied := false
		switch o.Outcome {
		case OutcomeAcked:
			applied = true
		case OutcomeRejected:
		case OutcomeNotApplied:
		default:
			applied = c.keyApplied(o.Key)
			if applied {
				resolvedApplied++
			} else {
				resolvedNot++
			}
		}
		if !applied || !o.Kind.makesTransfer() {
			continue
		}
		debit, credit, _ := c.sides(o)
		expected[debit] -= o.Amount
		expected[credit] += o.Amount
	}
	// tallyd's own top-up credits move money too; whether each was due
	// is topup_payment_credited_once's business.
	for i := range c.db.Transfers {
		if t := &c.db.Transfers[i]; isTopUpCredit(t) {
			expected[c.logical(t.Debit)] -= t.Amount
			expected[c.logical(t.Credit)] += t.Amount
		}
	}
	// A sharded account's balance is the sum of its shards' rows.
	actual := map[string]int64{}
	for id, a := range c.db.Accounts {
		actual[c.logical(id)] += a.Balance
	}
	c.checked(InvBalanceMatchesHistory, len(actual))
	for _, id := range sortedKeys(actual) {
		if actual[id] != expected[id] {
			c.fail(InvBalanceMatchesHistory, "account %s: balance %d, history says %d (off by %d)", id, actual[id], expected[id], actual[id]-expected[id])
		}
	}
	for id := range expected {
		if _, ok := c.db.Accounts[id]; !ok && id != "" {
			c.fail(InvBalanceMatchesHistory, "history moves money on account %s which does not exist", id)
		}
	}
	c.results[InvBalanceMatchesHistory].Note = fmt.Sprintf("ops without a definite answer resolved from Postgres: %d applied, %d not applied", resolvedApplied, resolvedNot)
}

// pairExisted reports whether (version, balance) is a state account acct
// really had: a version it reached, with the balance of its last entry at
// or before that version (versions also advance without entries: holds,
// expiry write-downs, lifecycle changes).
func (c *checker) pairExisted(acct string, version, balance int64, start time.Time) (bool, string) {
	a, ok := c.db.Accounts[acct]
	if !ok {
		return false, "no such account"
	}
	if v, _, sharded := c.summed(acct); sharded && !start.Before(c.shardedSince(acct)) {
		// The pair of a sharded account is a sum over its shards' rows,
		// read in one snapshot: its version can only be one the sum
		// reached by the end. (Before its first shard existed, it was an
		// account like any other: checked below.)
		if version < 0 || version > v {
			return false, fmt.Sprintf("version %d never existed (the shards sum to version %d)", version, v)
		}
		return true, ""
	}
	if version < 0 || version > a.Version {
		return false, fmt.Sprintf("version %d never existed (account is at version %d)", version, a.Version)
	}
	es := c.db.Entries[acct]
	i := sort.Search(len(es), func(i int) bool { return es[i].VersionAfter > version })
	var bal int64
	if i > 0 {
		bal = es[i-1].BalanceAfter
	}
	if bal != balance {
		return false, fmt.Sprintf("at version %d the balance was %d", version, bal)
	}
	return true, ""
}

// summed returns the version and balance of acct as readers see it: for
// an account with shards, the sums over its shards' rows.
func (c *checker) summed(acct string) (version, balance int64, sharded bool) {
	for id, a := range c.db.Accounts {
		if id == acct || a.ShardOf == acct {
			version += a.Version
			balance += a.Balance
			sharded = sharded || a.ShardOf == acct
		}
	}
	return version, balance, sharded
}

// shardedSince is when acct's first shard row was created (the far future
// for an account without shards).
func (c *checker) shardedSince(acct string) time.Time {
	since := time.Unix(1<<40, 0)
	for _, a := range c.db.Accounts {
		if a.ShardOf == acct && a.CreatedAt.Before(since) {
			since = a.CreatedAt
		}
	}
	return since
}

// nextEntry returns the first entry of acct after version: the earliest
// known time a state of that version was superseded (a hold or lifecycle
// change may have superseded it earlier; entries are what carry a version
// and a time).
func (c *checker) nextEntry(acct string, version int64) (*EntryRow, bool) {
	es := c.db.Entries[acct]
	i := sort.Search(len(es), func(i int) bool { return es[i].VersionAfter > version })
	if i == len(es) {
		return nil, false
	}
	return &es[i], true
}

func (c *checker) planted(o Observation) bool {
	for _, p := range c.plantsByAccount[o.Account] {
		if p.Version == o.Version && p.Balance == o.Balance &&
			!o.Start.Before(p.At.Add(-time.Second)) && o.Start.Before(p.At.Add(p.TTL+c.opt.AgeSlack)) {
			return true
		}
	}
	return false
}

func (c *checker) checkReads() {
	bound := c.opt.CacheTTL + c.opt.AgeSlack
	ageSkipped := c.opt.CacheTTL <= 0
	plantedServed := 0
	var maxAge time.Duration
	for _, o := range c.h.Observations {
		c.checked(InvReadsExisted, 1)
		if ok, why := c.pairExisted(o.Account, o.Version, o.Balance, o.Start); !ok {
			c.fail(InvReadsExisted, "client %d read account %s (%s, source %s) = (v%d, %d): %s",
				o.Client, o.Account, o.Consistency, o.Source, o.Version, o.Balance, why)
		}
		switch o.Consistency {
		case ReadStrong:
			c.checked(InvStrongReadsFresh, 1)
			if o.Version < o.LastAcked || o.Source != SourceStore {
				c.fail(InvStrongReadsFresh, "client %d STRONG read of account %s returned v%d from %s after it saw v%d acknowledged",
					o.Client, o.Account, o.Version, o.Source, o.LastAcked)
			}
		case ReadMinVersion:
			c.checked(InvMinVersionReads, 1)
			if o.Version < o.MinVersion {
				c.fail(InvMinVersionReads, "client %d read of account %s with min_version %d returned v%d from %s",
					o.Client, o.Account, o.MinVersion, o.Version, o.Source)
			}
		}
		if o.Source != SourceCache {
			continue
		}
		if _, _, sharded := c.summed(o.Account); sharded && !o.Start.Before(c.shardedSince(o.Account)) {
			c.fail(InvReadsExisted, "client %d read sharded account %s from the cache (v%d, %d) at %s, after its shards existed: no one row holds its balance",
				o.Client, o.Account, o.Version, o.Balance, o.Start.Format("15:04:05.000"))
			continue
		}
		if c.planted(o) {
			plantedServed++
		}
		if ageSkipped {
			continue
		}
		c.checked(InvCachedReadAge, 1)
		next, ok := c.nextEntry(o.Account, o.Version)
		if !ok {
			continue // still current at the end, or never existed (reported above)
		}
		age := o.Start.Sub(next.CreatedAt)
		if age > maxAge && !c.planted(o) {
			maxAge = age
		}
		if age > bound {
			if c.planted(o) {
				continue
			}
			c.fail(InvCachedReadAge, "client %d cached read of account %s at %s returned v%d, superseded %s earlier (bound %s)",
				o.Client, o.Account, o.Start.Format("15:04:05.000"), o.Version, age.Round(time.Millisecond), bound)
		}
	}
	for _, f := range c.h.ReadFailures {
		if f.Consistency == ReadMinVersion && f.Reason == "VERSION_NOT_REACHED" {
			c.checked(InvMinVersionReads, 1)
			c.fail(InvMinVersionReads, "client %d read of account %s with acknowledged min_version %d got VERSION_NOT_REACHED: %s",
				f.Client, f.Account, f.MinVersion, f.Message)
		}
	}
	if ageSkipped {
		c.results[InvCachedReadAge].Skipped = true
		c.results[InvCachedReadAge].Note = "skipped: no cache TTL given"
	} else {
		c.results[InvCachedReadAge].Note = fmt.Sprintf("bound %s, oldest %s; %d cached reads served a hand-planted stale pair (allowed within its TTL)",
			bound, maxAge.Round(time.Millisecond), plantedServed)
	}
}

func (c *checker) checkCache() {
	r := c.results[InvCacheMatchesDB]
	if c.cs == nil {
		r.Skipped = true
		r.Note = "skipped: no cache snapshot"
		return
	}
	finals := 0
	for _, o := range c.h.Observations {
		if !o.Final {
			continue
		}
		finals++
		c.checked(InvCacheMatchesDB, 1)
		if v, b, _ := c.summed(o.Account); v != o.Version || b != o.Balance {
			c.fail(InvCacheMatchesDB, "after healing, a %s read of account %s returned (v%d, %d) from %s but Postgres has (v%d, %d)",
				o.Consistency, o.Account, o.Version, o.Balance, o.Source, v, b)
		}
	}
	c.checked(InvCacheMatchesDB, len(c.cs.Values))
	for _, v := range c.cs.Values {
		a, ok := c.db.Accounts[v.Account]
		switch {
		case !v.OK:
			c.fail(InvCacheMatchesDB, "%s holds an unparsable value %q (pttl %s)", v.Key, v.Raw, v.PTTL)
		case !ok:
			c.fail(InvCacheMatchesDB, "%s caches an account that does not exist", v.Key)
		case v.Version != a.Version || v.Balance != a.Balance:
			c.fail(InvCacheMatchesDB, "%s caches (v%d, %d) but Postgres has (v%d, %d) (pttl %s)", v.Key, v.Version, v.Balance, a.Version, a.Balance, v.PTTL)
		case c.opt.CacheTTL > 0 && (v.PTTL < 0 || v.PTTL > c.opt.CacheTTL):
			c.fail(InvCacheMatchesDB, "%s has pttl %s, outside (0, %s]", v.Key, v.PTTL, c.opt.CacheTTL)
		}
	}
	r.Note = fmt.Sprintf("%d cached values in Redis, %d cached reads after healing", len(c.cs.Values), finals)
}

func (c *checker) checkAnswers() {
	codes := 0
	for _, n := range c.h.AnswerCodes {
		codes += n
	}
	c.checked(InvNoInternalAnswers, codes)
	for _, a := range c.h.BadAnswers {
		c.fail(InvNoInternalAnswers, "%s: tallyd %d answered %s: %s", a.What, a.Tallyd, a.Code, a.Message)
	}
	c.checked(InvNoUnexpectedAnswers, len(c.h.Ops)+len(c.h.ReadFailures))
	for _, o := range c.h.Ops {
		if o.Outcome == OutcomeUnexpected {
			c.fail(InvNoUnexpectedAnswers, "%s key %s account %s: final answer %s %s", o.Kind, o.Key, o.Account, o.FinalCode, o.FinalReason)
		}
		firsts := 0
		if o.Outcome == OutcomeAcked && !o.Replayed {
			firsts++
		}
		for _, h := range o.HedgeAnswers {
			if h.Code == "OK" && !h.Replayed {
				firsts++
			}
		}
		if firsts > 1 {
			c.fail(InvNoUnexpectedAnswers, "%s key %s: %d answers claim to have executed it (replayed=false)", o.Kind, o.Key, firsts)
		}
		if o.FirstAnswerReplayed && o.EarlierAnswers == 0 && o.Attempts == 1 {
			c.fail(InvNoUnexpectedAnswers, "%s key %s: the first and only attempt was answered as a replay", o.Kind, o.Key)
		}
	}
	for _, f := range c.h.ReadFailures {
		switch f.Code {
		case "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN":
			// Retryable codes that ran out of attempts are not wrong answers;
			// INTERNAL/UNKNOWN are counted by no_internal_answers.
		default:
			if f.Reason == "VERSION_NOT_REACHED" {
				continue // min_version_reads
			}
			c.fail(InvNoUnexpectedAnswers, "client %d %s read of account %s: %s %s %s", f.Client, f.Consistency, f.Account, f.Code, f.Reason, f.Message)
		}
	}
}

func (c *checker) checkCrashes() {
	for _, cr := range c.h.Crashes {
		c.fail(InvNoTallydCrashes, "tallyd %d at %s: %s; log tail: %s", cr.Tallyd, cr.At.Format(time.RFC3339), cr.Status, cr.LogTail)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
