// Package torture is Tally's crash-safety torture test: a workload of
// clients that move money and read balances while a nemesis kills and
// partitions tallyd, PostgreSQL and Redis, and a checker that proves from
// the recorded history and the final database and cache state that no money
// was lost, doubled or invented and that every read kept its promise.
//
// The history and state types and the checker are plain data and functions
// so that tests can feed the checker damaged states and histories; Run (in
// run.go) drives a whole torture run and is what cmd/tally-torture calls.
package torture

import (
	"sync"
	"time"
)

// OpKind is the RPC an operation used.
type OpKind string

// Operation kinds, named like the transfers they produce.
const (
	KindCharge   OpKind = "CHARGE"
	KindCredit   OpKind = "CREDIT"
	KindTransfer OpKind = "TRANSFER"
	KindRefund   OpKind = "REFUND"
	KindHold     OpKind = "HOLD"
	KindCapture  OpKind = "CAPTURE_HOLD"
	KindRelease  OpKind = "RELEASE_HOLD"
)

// kindNumber is the transfers.kind / idempotency_keys.kind column value.
func (k OpKind) kindNumber() int16 {
	switch k {
	case KindCharge:
		return 1
	case KindCredit:
		return 2
	case KindTransfer:
		return 3
	case KindRefund:
		return 4
	case KindHold:
		return 5
	case KindCapture:
		return 6
	case KindRelease:
		return 7
	}
	return 0
}

// transferKind is the transfers.kind of the transfer an op of this kind
// makes (a capture makes a CHARGE), or 0 when it makes none (Hold and
// ReleaseHold).
func (k OpKind) transferKind() int16 {
	switch k {
	case KindCharge, KindCapture:
		return 1
	case KindCredit:
		return 2
	case KindTransfer:
		return 3
	case KindRefund:
		return 4
	}
	return 0
}

// makesTransfer reports whether a successful op of this kind makes a transfer.
func (k OpKind) makesTransfer() bool { return k.transferKind() != 0 }

// Outcome is what a client finally learned about an operation.
type Outcome string

// Outcomes.
const (
	// OutcomeAcked: the service answered success (the transfer committed).
	OutcomeAcked Outcome = "acked"
	// OutcomeRejected: a definite business rejection (FAILED_PRECONDITION
	// or OUT_OF_RANGE), recorded under the key.
	OutcomeRejected Outcome = "rejected"
	// OutcomeUnexpected: a final answer that a valid request should never
	// get (ALREADY_EXISTS, NOT_FOUND, INVALID_ARGUMENT, ...). The outcome
	// is resolved from the database like an unknown one.
	OutcomeUnexpected Outcome = "unexpected"
	// OutcomeUnknown: the client never got a definite answer before its
	// deadline; the checker resolves the outcome from the database.
	OutcomeUnknown Outcome = "unknown"
	// OutcomeNotApplied: an item of an ATOMIC batch that was acknowledged
	// as not applied (some item failed). Nothing of it may exist, not even
	// its key: FinalCode and FinalReason are its own item error.
	OutcomeNotApplied Outcome = "not_applied"
)

// Op is one money-moving operation with one idempotency key, however many
// attempts it took.
type Op struct {
	Client int    `json:"client"` // -1 for the setup phase
	Key    string `json:"key"`
	Kind   OpKind `json:"kind"`
	// Account is the account the request named: the charged or credited
	// account, or the debit account of a Transfer; for a Hold, CaptureHold
	// or ReleaseHold the hold's account; for a Refund the refunded charge's
	// debit account (the customer, who gets the money back).
	Account string `json:"account"`
	// Counterparty is revenue_account_id (Charge, Hold, and a CaptureHold's
	// hold), funding_account_id (Credit), credit_account_id (Transfer), or
	// the refunded charge's credit account (Refund); "" means the
	// currency's default system account.
	Counterparty string `json:"counterparty,omitempty"`
	// Amount is what the op moves (a full capture's is the hold's amount;
	// a Hold's what it reserves; a ReleaseHold's the hold's amount, which
	// moves nothing).
	Amount int64 `json:"amount"`
	// HoldID is the hold a CaptureHold or ReleaseHold names, or the hold an
	// acknowledged Hold created.
	HoldID string `json:"hold_id,omitempty"`
	// ChargeID is the CHARGE a Refund names.
	ChargeID string `json:"charge_id,omitempty"`
	// CaptureAll: a CaptureHold sent with amount 0 (all of the hold).
	CaptureAll bool `json:"capture_all,omitempty"`
	// ExpiresIn is a Hold's expires_in_seconds.
	ExpiresIn int64 `json:"expires_in,omitempty"`
	// BatchKey is the batch_key of the SubmitBatch this op was an item of
	// ("" for an op sent on its own); BatchIndex its position.
	BatchKey   string `json:"batch_key,omitempty"`
	BatchIndex int    `json:"batch_index,omitempty"`
	Start      time.Time
	End        time.Time
	// Attempts is how many RPCs were sent with this key (1 = no retry).
	Attempts int `json:"attempts"`
	// Tallyds is how many different tallyd processes were tried.
	Tallyds int     `json:"tallyds"`
	Outcome Outcome `json:"outcome"`
	// FinalCode and FinalReason are the gRPC code name and ErrorInfo reason
	// of the final answer ("OK" for success).
	FinalCode   string `json:"final_code"`
	FinalReason string `json:"final_reason,omitempty"`
	// On success: what the service acknowledged.
	TransferID     string `json:"transfer_id,omitempty"`
	Replayed       bool   `json:"replayed,omitempty"`
	BalanceVersion int64  `json:"balance_version,omitempty"`
	BalanceAfter   int64  `json:"balance_after,omitempty"`
	// FirstReplayed is true when the first attempt that got an answer at
	// all was already a replay (only possible if an earlier attempt
	// committed without the client hearing back).
	FirstAnswerReplayed bool `json:"first_answer_replayed,omitempty"`
	// EarlierAnswers counts attempts that got no answer or a retryable one.
	EarlierAnswers int `json:"earlier_answers,omitempty"`
	// Hedged ops sent their first attempt twice at once; HedgeAnswers are
	// the definite answers other than the final one.
	Hedged       bool          `json:"hedged,omitempty"`
	HedgeAnswers []HedgeAnswer `json:"hedge_answers,omitempty"`
}

// HedgeAnswer is a further definite answer to the same op.
type HedgeAnswer struct {
	Code       string `json:"code"`
	Reason     string `json:"reason,omitempty"`
	TransferID string `json:"transfer_id,omitempty"`
	HoldID     string `json:"hold_id,omitempty"`
	Replayed   bool   `json:"replayed,omitempty"`
}

// Batch modes as recorded in the history.
const (
	BatchAtomic      = "ATOMIC"
	BatchIndependent = "INDEPENDENT"
)

// modeNumber is the batches.mode column value.
func modeNumber(mode string) int16 {
	switch mode {
	case BatchAtomic:
		return 1
	case BatchIndependent:
		return 2
	}
	return 0
}

// Batch is one SubmitBatch with one batch_key, however many attempts it
// took. Its items are recorded as Ops (with BatchKey set) with the outcome
// the batch's answer gave each of them.
type Batch struct {
	Client   int      `json:"client"`
	Key      string   `json:"key"`
	Mode     string   `json:"mode"`
	ItemKeys []string `json:"item_keys"`
	// DesignedToFail is the index of an item built to be rejected, or -1.
	DesignedToFail int       `json:"designed_to_fail"`
	Start          time.Time `json:"start"`
	End            time.Time `json:"end"`
	Attempts       int       `json:"attempts"`
	// Outcome is OutcomeAcked when the batch got an OK answer (Applied then
	// says whether it applied), OutcomeUnknown or OutcomeUnexpected.
	Outcome     Outcome `json:"outcome"`
	FinalCode   string  `json:"final_code"`
	FinalReason string  `json:"final_reason,omitempty"`
	Applied     bool    `json:"applied,omitempty"`
	FailedIndex int     `json:"failed_index"`
	Replayed    bool    `json:"replayed,omitempty"`
	// Hedged: the first attempt was sent twice at once.
	Hedged bool `json:"hedged,omitempty"`
}

// Retried reports whether the op needed more than one attempt (a hedged
// op's concurrent duplicate does not count).
func (o *Op) Retried() bool { return o.Attempts > o.firstRound() }

func (o *Op) firstRound() int {
	if o.Hedged {
		return 2
	}
	return 1
}

// Read consistency modes as recorded in observations.
const (
	ReadCached     = "CACHED"
	ReadStrong     = "STRONG"
	ReadMinVersion = "MIN_VERSION" // cached consistency with min_version > 0
)

// Balance sources as recorded in observations.
const (
	SourceCache = "CACHE"
	SourceStore = "STORE"
)

// Observation is one successful GetBalance.
type Observation struct {
	Client      int    `json:"client"`
	Account     string `json:"account"`
	Consistency string `json:"consistency"`
	MinVersion  int64  `json:"min_version,omitempty"`
	// LastAcked is the highest version of Account this client had seen
	// acknowledged (in a TransferResult) when the read started.
	LastAcked int64     `json:"last_acked"`
	Version   int64     `json:"version"`
	Balance   int64     `json:"balance"`
	Source    string    `json:"source"`
	Start     time.Time `json:"start"`
	End       time.Time `json:"end"`
	// Final marks the reads made after healing and waiting one cache TTL,
	// with no write in flight: they must return the current state.
	Final bool `json:"final,omitempty"`
}

// ReadFailure is a GetBalance that ended in an error after its retries.
type ReadFailure struct {
	Client      int    `json:"client"`
	Account     string `json:"account"`
	Consistency string `json:"consistency"`
	MinVersion  int64  `json:"min_version,omitempty"`
	Code        string `json:"code"`
	Reason      string `json:"reason,omitempty"`
	Message     string `json:"message,omitempty"`
}

// Answer is one attempt's answer that the service must never give under
// faults (INTERNAL or UNKNOWN).
type Answer struct {
	What    string    `json:"what"` // "op <key>" or "read <account>"
	Tallyd  int       `json:"tallyd"`
	Code    string    `json:"code"`
	Message string    `json:"message"`
	At      time.Time `json:"at"`
}

// Plant is a value written into Redis by hand by the nemesis.
type Plant struct {
	Account string        `json:"account"`
	Garbage bool          `json:"garbage,omitempty"`
	Version int64         `json:"version,omitempty"`
	Balance int64         `json:"balance,omitempty"`
	At      time.Time     `json:"at"`
	TTL     time.Duration `json:"ttl"`
}

// Crash is a tallyd process that exited without the nemesis killing it.
type Crash struct {
	Tallyd  int       `json:"tallyd"`
	At      time.Time `json:"at"`
	Status  string    `json:"status"`
	LogTail string    `json:"log_tail,omitempty"`
}

// AccountSpec is an account the workload created.
type AccountSpec struct {
	ID          string `json:"id"`
	Currency    string `json:"currency"`
	Type        string `json:"type"`  // CUSTOMER, REVENUE, FUNDING
	Floor       string `json:"floor"` // NON_NEGATIVE or NONE
	CreditLimit int64  `json:"credit_limit"`
	Role        string `json:"role"` // hot, small, limit, normal, revenue, funding
}

// History is everything the clients and the nemesis did and saw. Its
// methods are safe for concurrent use while a run records into it; the
// checker reads it after the run.
type History struct {
	mu           sync.Mutex
	Accounts     []AccountSpec
	Ops          []*Op
	Batches      []*Batch
	Observations []Observation
	ReadFailures []ReadFailure
	BadAnswers   []Answer
	Plants       []Plant
	Crashes      []Crash
	// AnswerCodes counts every attempt's answer by gRPC code name.
	AnswerCodes map[string]int
	// Lifecycle are the FreezeAccount, UnfreezeAccount, UpdateAccount and
	// CloseAccount calls the lifecycle client made.
	Lifecycle []LifecycleCall `json:"lifecycle,omitempty"`
	// Feed is what the change-feed follower received (nil: no follower).
	Feed *FeedLog `json:"feed,omitempty"`
	// Reconcile is the final Reconcile run (nil: not run).
	Reconcile *ReconcileLog `json:"reconcile,omitempty"`
}

// LifecycleCall is one account lifecycle call (no idempotency key: retried
// as is until a definite answer) or one probe of a closed account.
type LifecycleCall struct {
	// Action is freeze, unfreeze, update or close.
	Action  string    `json:"action"`
	Account string    `json:"account"`
	Start   time.Time `json:"start"`
	End     time.Time `json:"end"`
	// Attempts is how many RPCs were sent (a retry may apply it again:
	// freezing is idempotent, an update an overwrite).
	Attempts int `json:"attempts"`
	// Definite is false when no definite answer came before the deadline.
	Definite bool   `json:"definite"`
	Code     string `json:"code"`
	Reason   string `json:"reason,omitempty"`
	// Expect lists the acceptable final answers ("OK" or a reason).
	Expect []string `json:"expect"`
	// Status is the account's status in an OK answer.
	Status string `json:"status,omitempty"`
}

// FeedEvent is one change-feed event the follower received.
type FeedEvent struct {
	Cursor string `json:"cursor"`
	// Kind is transfer, hold, account_change or low_balance.
	Kind string `json:"kind"`
	// Subject is the transfer id, the hold id, the account id (an account
	// change) or the transfer or hold id (a low-balance crossing): the
	// events row's subject_id.
	Subject string `json:"subject"`
}

// FeedLog is what the follower received, in order.
type FeedLog struct {
	Events []FeedEvent `json:"events"`
	// Sessions counts the Export calls (one more after each failover).
	Sessions int `json:"sessions"`
	// CaughtUp: the follower had received as many events as the events
	// table holds before it was stopped.
	CaughtUp bool `json:"caught_up"`
	// Errors are the errors that ended Export calls (the follower moved
	// on to another tallyd with its cursor).
	Errors []string `json:"errors,omitempty"`
}

// ReconcileLog is the outcome of the final Reconcile run.
type ReconcileLog struct {
	AccountsChecked int64    `json:"accounts_checked"`
	Summary         bool     `json:"summary"` // the run ended with its summary
	SummaryFindings int64    `json:"summary_findings"`
	Findings        []string `json:"findings,omitempty"`
	Error           string   `json:"error,omitempty"`
}

// AddLifecycle records a lifecycle call.
func (h *History) AddLifecycle(c LifecycleCall) {
	h.mu.Lock()
	h.Lifecycle = append(h.Lifecycle, c)
	h.mu.Unlock()
}

// NewHistory returns an empty history.
func NewHistory() *History { return &History{AnswerCodes: map[string]int{}} }

// AddOp records a finished operation.
func (h *History) AddOp(o *Op) {
	h.mu.Lock()
	h.Ops = append(h.Ops, o)
	h.mu.Unlock()
}

// AddBatch records a finished SubmitBatch (its items are added with AddOp).
func (h *History) AddBatch(b *Batch) {
	h.mu.Lock()
	h.Batches = append(h.Batches, b)
	h.mu.Unlock()
}

// AddObservation records a successful read.
func (h *History) AddObservation(o Observation) {
	h.mu.Lock()
	h.Observations = append(h.Observations, o)
	h.mu.Unlock()
}

// AddReadFailure records a read that failed.
func (h *History) AddReadFailure(f ReadFailure) {
	h.mu.Lock()
	h.ReadFailures = append(h.ReadFailures, f)
	h.mu.Unlock()
}

// AddBadAnswer records an INTERNAL or UNKNOWN answer.
func (h *History) AddBadAnswer(a Answer) {
	h.mu.Lock()
	h.BadAnswers = append(h.BadAnswers, a)
	h.mu.Unlock()
}

// AddPlant records a value planted in Redis.
func (h *History) AddPlant(p Plant) {
	h.mu.Lock()
	h.Plants = append(h.Plants, p)
	h.mu.Unlock()
}

// AddCrash records an unexpected tallyd exit.
func (h *History) AddCrash(c Crash) {
	h.mu.Lock()
	h.Crashes = append(h.Crashes, c)
	h.mu.Unlock()
}

// CountAnswer counts one attempt's answer code.
func (h *History) CountAnswer(code string) {
	h.mu.Lock()
	if h.AnswerCodes == nil {
		h.AnswerCodes = map[string]int{}
	}
	h.AnswerCodes[code]++
	h.mu.Unlock()
}

// AddAccount records an account the workload created.
func (h *History) AddAccount(a AccountSpec) {
	h.mu.Lock()
	h.Accounts = append(h.Accounts, a)
	h.mu.Unlock()
}
