package ledger

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// Auto top-up: an account's rule says "when a debit leaves available below
// threshold, charge the customer's card up to target_balance". The trigger
// is decided in the committing transaction of the debit, from PostgreSQL's
// locked rows only (never from the cache), and records the top-up and
// enqueues its job before anyone calls the payment provider. Package topup
// runs the jobs.

// Defaults of auto top-up. Each has a tallyd flag.
const (
	// TopUpAttemptsMaxDefault bounds the job's attempts (River's
	// MaxAttempts). After the last one a top-up whose outcome is unknown
	// stays PENDING for a person.
	TopUpAttemptsMaxDefault = 8
	// TopUpFailuresMaxDefault is the number of consecutive declined top-ups
	// after which a rule is disabled.
	TopUpFailuresMaxDefault = 1
	// TopUpValueMaxDefault bounds a rule's threshold, target_balance,
	// amount_max and per_day_max.
	TopUpValueMaxDefault = int64(1_000_000_000_000_000)
	// TopUpIDBytesMax bounds provider_customer_id and payment_method_id.
	TopUpIDBytesMax = 255
)

// TopUpScope is the idempotency scope of top-up credits: no API client's
// scope (a client id, or "") can equal it.
const TopUpScope = store.TopUpScope

// Reasons of auto top-up errors.
const (
	ReasonTopUpProviderNotConfigured = "TOPUP_PROVIDER_NOT_CONFIGURED"
	ReasonTopUpRuleNotFound          = "TOPUP_RULE_NOT_FOUND"
	ReasonTopUpNeedsFloor            = "TOPUP_NEEDS_FLOOR"
	ReasonTopUpNotFound              = "TOPUP_NOT_FOUND"
)

// TopUpConfig configures auto top-up.
type TopUpConfig struct {
	// Provider names the payment provider ("stripe"); empty: none, and
	// SetAutoTopUp is FAILED_PRECONDITION TOPUP_PROVIDER_NOT_CONFIGURED.
	Provider string
	// AttemptsMax bounds each top-up job's attempts.
	AttemptsMax int
	// FailuresMax is how many consecutive declines disable a rule.
	FailuresMax int
	// ValueMax bounds the amounts of a rule.
	ValueMax int64
	// Queue is the River queue of top-up jobs (default store.TopUpQueue;
	// tests give each server its own).
	Queue string
}

func (c *TopUpConfig) fill() {
	if c.AttemptsMax <= 0 {
		c.AttemptsMax = TopUpAttemptsMaxDefault
	}
	if c.FailuresMax <= 0 {
		c.FailuresMax = TopUpFailuresMaxDefault
	}
	if c.ValueMax <= 0 {
		c.ValueMax = TopUpValueMaxDefault
	}
	if c.Queue == "" {
		c.Queue = store.TopUpQueue
	}
}

// TopUpStatus is a top-up's state.
type TopUpStatus int16

// Top-up statuses.
const (
	TopUpPending   TopUpStatus = TopUpStatus(store.TopUpPending)
	TopUpSucceeded TopUpStatus = TopUpStatus(store.TopUpSucceeded)
	TopUpFailed    TopUpStatus = TopUpStatus(store.TopUpFailed)
)

func (s TopUpStatus) String() string {
	switch s {
	case TopUpPending:
		return "PENDING"
	case TopUpSucceeded:
		return "SUCCEEDED"
	case TopUpFailed:
		return "FAILED"
	}
	return fmt.Sprintf("TopUpStatus(%d)", int16(s))
}

// AutoTopUp is an account's rule.
type AutoTopUp struct {
	AccountID           uuid.UUID
	Enabled             bool
	Threshold           int64
	TargetBalance       int64
	AmountMax           int64
	PerDayMax           int64
	ProviderCustomerID  string
	PaymentMethodID     string
	ConsecutiveFailures int32
	DisabledReason      string
	UpdatedAt           time.Time
}

// SetAutoTopUpRequest sets an account's rule; CreatedBy* are recorded in
// account_changes.
type SetAutoTopUpRequest struct {
	Rule            AutoTopUp
	CreatedByClient uuid.UUID
	CreatedByKey    string
	Restrict        Restrict
}

// TopUp is one top-up. Its fields mirror store.TopUp, whose JSON is the
// feed payload.
type TopUp struct {
	ID                 uuid.UUID
	AccountID          uuid.UUID
	Status             TopUpStatus
	Amount             int64
	Currency           string
	ProviderCustomerID string
	PaymentMethodID    string
	TriggerTransferID  uuid.UUID
	TriggerHoldID      uuid.UUID
	ProviderPaymentID  string
	CreditTransferID   uuid.UUID
	FailureCode        string
	FailureReason      string
	Attempts           int32
	CreatedAt          time.Time
	UpdatedAt          time.Time
	FinishedAt         *time.Time
}

func toTopUp(x store.TopUp) TopUp {
	return TopUp{
		ID: x.ID, AccountID: x.AccountID, Status: TopUpStatus(x.Status), Amount: x.Amount, Currency: x.Currency,
		ProviderCustomerID: x.ProviderCustomerID, PaymentMethodID: x.PaymentMethodID,
		TriggerTransferID: x.TriggerTransferID, TriggerHoldID: x.TriggerHoldID, ProviderPaymentID: x.ProviderPaymentID,
		CreditTransferID: x.CreditTransferID, FailureCode: x.FailureCode, FailureReason: x.FailureReason,
		Attempts: x.Attempts, CreatedAt: x.CreatedAt, UpdatedAt: x.UpdatedAt, FinishedAt: x.FinishedAt,
	}
}

func toAutoTopUp(r store.TopUpRule) AutoTopUp {
	return AutoTopUp{
		AccountID: r.AccountID, Enabled: r.Enabled, Threshold: r.Threshold, TargetBalance: r.TargetBalance,
		AmountMax: r.AmountMax, PerDayMax: r.PerDayMax, ProviderCustomerID: r.ProviderCustomerID,
		PaymentMethodID: r.PaymentMethodID, ConsecutiveFailures: r.ConsecutiveFailures,
		DisabledReason: r.DisabledReason, UpdatedAt: r.UpdatedAt,
	}
}

// TopUpConfig returns the auto top-up configuration in force.
func (l *Ledger) TopUpConfig() TopUpConfig { return l.topup }

func (l *Ledger) validateRule(r AutoTopUp) error {
	if l.topup.Provider == "" {
		return rejection(CodeFailedPrecondition, ReasonTopUpProviderNotConfigured,
			"auto top-up needs a payment provider: start tallyd with --topup-provider")
	}
	vm := l.topup.ValueMax
	switch {
	case r.Threshold < -vm || r.Threshold > vm:
		return invalid("threshold", "threshold must be between %d and %d", -vm, vm)
	case r.TargetBalance > vm:
		return invalid("target_balance", "target_balance must be at most %d", vm)
	case r.Threshold >= r.TargetBalance:
		return invalid("threshold", "threshold must be below target_balance")
	case r.AmountMax <= 0 || r.AmountMax > vm:
		return invalid("amount_max", "amount_max must be between 1 and %d", vm)
	case r.PerDayMax <= 0 || r.PerDayMax > vm:
		return invalid("per_day_max", "per_day_max must be between 1 and %d", vm)
	}
	if err := validProviderID("provider_customer_id", r.ProviderCustomerID); err != nil {
		return err
	}
	return validProviderID("payment_method_id", r.PaymentMethodID)
}

func validProviderID(field, v string) error {
	if v == "" || len(v) > TopUpIDBytesMax {
		return invalid(field, "%s must be 1-%d characters", field, TopUpIDBytesMax)
	}
	for i := 0; i < len(v); i++ {
		if v[i] < 0x21 || v[i] > 0x7e {
			return invalid(field, "%s must be printable ASCII without spaces", field)
		}
	}
	return nil
}

// SetAutoTopUp creates or replaces an account's rule, under the account's
// row lock, and records the change in account_changes (and the feed).
// Enabling a rule clears its failures and disabled reason.
func (l *Ledger) SetAutoTopUp(ctx context.Context, req SetAutoTopUpRequest) (AutoTopUp, error) {
	r := req.Rule
	if err := l.validateRule(r); err != nil {
		return AutoTopUp{}, err
	}
	var out store.TopUpRule
	err := l.st.InTx(ctx, func(tx *store.Tx) error {
		a, err := tx.LockAccount(ctx, r.AccountID)
		if err != nil {
			return notFoundOr(err, ReasonAccountNotFound, "account %s not found", r.AccountID)
		}
		if err := ruleAccount(a, req.Restrict); err != nil {
			return err
		}
		old, found, err := tx.TopUpRule(ctx, a.ID)
		if err != nil {
			return fromStore(err)
		}
		next := store.TopUpRule{
			AccountID: a.ID, Currency: a.Currency, Enabled: r.Enabled, Threshold: r.Threshold,
			TargetBalance: r.TargetBalance, AmountMax: r.AmountMax, PerDayMax: r.PerDayMax,
			ProviderCustomerID: r.ProviderCustomerID, PaymentMethodID: r.PaymentMethodID,
		}
		if found && !r.Enabled {
			next.ConsecutiveFailures, next.DisabledReason = old.ConsecutiveFailures, old.DisabledReason
		}
		if out, err = tx.PutTopUpRule(ctx, next); err != nil {
			return fromStore(err)
		}
		var before map[string]any
		if found {
			before = ruleState(old)
		}
		return fromStore(tx.WriteBatch(ctx, ruleChange(a, before, ruleState(out), req.CreatedByClient, req.CreatedByKey, out.UpdatedAt)))
	})
	if err != nil {
		return AutoTopUp{}, fromStore(err)
	}
	return toAutoTopUp(out), nil
}

func isNotFound(err error) bool { return errors.Is(err, store.ErrNotFound) }

// ruleAccount checks that a rule may be set on account a.
func ruleAccount(a store.Account, rs Restrict) error {
	switch {
	case AccountType(a.Type) != AccountTypeCustomer && rs.CustomerAccounts:
		return rejection(CodePermissionDenied, ReasonPermissionDenied, "only admin may change a %s account", AccountType(a.Type))
	case AccountType(a.Type) != AccountTypeCustomer:
		return rejection(CodeFailedPrecondition, ReasonAccountTypeMismatch, "auto top-up is only for CUSTOMER accounts")
	case Floor(a.Floor) != FloorNonNegative:
		return rejection(CodeFailedPrecondition, ReasonTopUpNeedsFloor, "auto top-up needs an account with FLOOR_NON_NEGATIVE")
	case Status(a.Status) == StatusClosed:
		return rejection(CodeFailedPrecondition, ReasonAccountClosed, "account %s is closed", a.ID)
	case !isoCurrency(a.Currency):
		return rejection(CodeFailedPrecondition, ReasonCurrencyMismatch,
			"auto top-up needs an ISO 4217 currency (three letters) the card can be charged in; the account's is %s", a.Currency)
	}
	return nil
}

func isoCurrency(c string) bool {
	if len(c) != 3 {
		return false
	}
	for i := 0; i < 3; i++ {
		if c[i] < 'A' || c[i] > 'Z' {
			return false
		}
	}
	return true
}

func ruleState(r store.TopUpRule) map[string]any {
	return map[string]any{
		"enabled": r.Enabled, "threshold": r.Threshold, "target_balance": r.TargetBalance, "amount_max": r.AmountMax,
		"per_day_max": r.PerDayMax, "provider_customer_id": r.ProviderCustomerID, "payment_method_id": r.PaymentMethodID,
		"consecutive_failures": r.ConsecutiveFailures, "disabled_reason": r.DisabledReason,
	}
}

// ruleChange is the account_changes row (and its feed event) of a rule
// change; by is uuid.Nil for a change tallyd made itself (a rule disabled
// after declines).
func ruleChange(a store.Account, before, after map[string]any, by uuid.UUID, key string, at time.Time) store.BatchWrite {
	if before == nil {
		before = map[string]any{}
	}
	c := store.AccountChange{
		AccountID: a.ID, Action: "auto_topup", VersionAfter: a.Version, Before: before, After: after,
		CreatedByClient: by, CreatedByKey: key, CreatedAt: at,
	}
	b, err := json.Marshal(AccountChangeEvent{
		AccountID: c.AccountID, Action: c.Action, VersionAfter: c.VersionAfter, Before: c.Before, After: c.After,
		CreatedByClient: c.CreatedByClient, CreatedByKey: c.CreatedByKey, CreatedAt: c.CreatedAt,
	})
	if err != nil {
		panic(fmt.Sprintf("ledger: encoding an account change: %v", err))
	}
	return store.BatchWrite{
		Changes: []store.AccountChange{c},
		Events:  []store.EventRow{{Kind: EventAccountChange, SubjectID: a.ID, AccountID: a.ID, Payload: b, CreatedAt: at}},
	}
}

// GetAutoTopUp returns an account's rule.
func (l *Ledger) GetAutoTopUp(ctx context.Context, accountID uuid.UUID) (AutoTopUp, error) {
	r, err := l.st.GetTopUpRule(ctx, accountID)
	if err == nil {
		return toAutoTopUp(r), nil
	}
	if _, aerr := l.st.GetAccount(ctx, accountID); aerr != nil {
		return AutoTopUp{}, notFoundOr(aerr, ReasonAccountNotFound, "account %s not found", accountID)
	}
	return AutoTopUp{}, notFoundOr(err, ReasonTopUpRuleNotFound, "account %s has no auto top-up rule", accountID)
}

func notFoundOr(err error, reason, format string, args ...any) error {
	if isNotFound(err) {
		return rejection(CodeNotFound, reason, format, args...)
	}
	return fromStore(err)
}

// GetTopUp returns one top-up.
func (l *Ledger) GetTopUp(ctx context.Context, id uuid.UUID) (TopUp, error) {
	x, err := l.st.GetTopUp(ctx, id)
	if err != nil {
		return TopUp{}, notFoundOr(err, ReasonTopUpNotFound, "top-up %s not found", id)
	}
	return toTopUp(x), nil
}

// ListTopUps returns a page of an account's top-ups, newest first, and the
// token of the next page ("" at the end).
func (l *Ledger) ListTopUps(ctx context.Context, accountID uuid.UUID, pageSize int, pageToken string) ([]TopUp, string, error) {
	if pageSize <= 0 {
		pageSize = l.limits.PageSizeDefault
	}
	if pageSize > l.limits.PageSizeMax {
		return nil, "", invalid("page_size", "page_size must be at most %d", l.limits.PageSizeMax)
	}
	query := "topups:" + accountID.String()
	before := uuid.Nil
	if pageToken != "" {
		var err error
		if before, err = accountsCursor(query, pageToken); err != nil {
			return nil, "", err
		}
	}
	if _, err := l.st.GetAccount(ctx, accountID); err != nil {
		return nil, "", notFoundOr(err, ReasonAccountNotFound, "account %s not found", accountID)
	}
	rows, err := l.st.ListTopUps(ctx, accountID, before, pageSize+1)
	if err != nil {
		return nil, "", fromStore(err)
	}
	next := ""
	if len(rows) > pageSize {
		rows = rows[:pageSize]
		next = encodeToken(query, pageCursor{After: rows[len(rows)-1].ID.String()})
	}
	out := make([]TopUp, len(rows))
	for i, x := range rows {
		out[i] = toTopUp(x)
	}
	return out, next, nil
}

// topUpStep runs in a write batch's transaction after its writes (the one
// call commitItems makes): it marks the top-ups whose credits this batch
// posted SUCCEEDED, then starts a top-up for every account with an active
// rule that a debit of this batch left below its threshold. A batch that
// neither posts a top-up credit nor leaves a ruled account below its
// threshold runs no statement here.
func (l *Ledger) topUpStep(ctx context.Context, tx *store.Tx, d *decided, items []*item) error {
	wk := d.wk
	if wk == nil {
		return nil // an ATOMIC batch that wrote nothing
	}
	var done []store.TopUpSuccess
	for i, it := range items {
		res := d.results[i]
		if it.r.TopUpID == uuid.Nil || res.err != nil || res.res.Replayed || res.res.Transfer.ID == uuid.Nil {
			continue
		}
		done = append(done, store.TopUpSuccess{TopUpID: it.r.TopUpID, ProviderPaymentID: it.r.TopUpPaymentID,
			CreditTransferID: res.res.Transfer.ID})
	}
	if len(done) > 0 {
		if err := tx.SucceedTopUps(ctx, done, wk.now); err != nil {
			return err
		}
	}
	starts := wk.topUpStarts()
	if len(starts) == 0 {
		return nil
	}
	_, err := l.st.StartTopUps(ctx, tx, starts, l.topup.Queue, l.topup.AttemptsMax)
	return err
}

// topUpStarts finds, from the batch's final account states, every account
// with an active rule (its threshold mirrored on the locked row) that a
// debit of this batch (a transfer from it, or a hold on it) left with
// available below the threshold. The latest such debit is the trigger.
func (wk *work) topUpStarts() []store.TopUpStart {
	trig := map[uuid.UUID]store.TopUpStart{}
	ruled := func(id uuid.UUID) bool {
		a := wk.accts[id]
		return a != nil && a.TopUpThreshold != nil && availableOf(a) < *a.TopUpThreshold
	}
	for _, tr := range wk.w.Transfers {
		if ruled(tr.DebitAccountID) {
			trig[tr.DebitAccountID] = store.TopUpStart{AccountID: tr.DebitAccountID, TriggerTransferID: tr.ID}
		}
	}
	for _, h := range wk.w.Holds {
		if ruled(h.AccountID) {
			trig[h.AccountID] = store.TopUpStart{AccountID: h.AccountID, TriggerHoldID: h.ID}
		}
	}
	if len(trig) == 0 {
		return nil
	}
	out := make([]store.TopUpStart, 0, len(trig))
	for id, s := range trig {
		s.Available, s.At = availableOf(wk.accts[id]), wk.now
		out = append(out, s)
	}
	return out
}

// BeginTopUpAttempt counts one more attempt of a PENDING top-up before the
// provider is called, and returns it (as it is, when no longer PENDING).
func (l *Ledger) BeginTopUpAttempt(ctx context.Context, id uuid.UUID) (TopUp, error) {
	var out store.TopUp
	err := l.st.InTx(ctx, func(tx *store.Tx) error {
		_, x, err := tx.LockTopUp(ctx, id)
		if err != nil || x.Status != store.TopUpPending {
			out = x
			return err
		}
		x.Attempts++
		out, err = tx.UpdateTopUp(ctx, x)
		return err
	})
	if err != nil {
		return TopUp{}, notFoundOr(err, ReasonTopUpNotFound, "top-up %s not found", id)
	}
	return toTopUp(out), nil
}

// NoteTopUpProblem records why a PENDING top-up is not finished yet (an
// unknown provider outcome, a refused credit); it stays PENDING.
func (l *Ledger) NoteTopUpProblem(ctx context.Context, id uuid.UUID, reason string) error {
	return fromStore(l.st.InTx(ctx, func(tx *store.Tx) error {
		_, x, err := tx.LockTopUp(ctx, id)
		if err != nil || x.Status != store.TopUpPending {
			return err
		}
		x.FailureReason = truncate(reason, 500)
		_, err = tx.UpdateTopUp(ctx, x)
		return err
	}))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// FailTopUp marks a PENDING top-up FAILED (the provider declined: nothing
// was charged) and counts the failure on its rule; after FailuresMax
// consecutive failures the rule is disabled with a reason (recorded in
// account_changes) and starts nothing until someone enables it again.
func (l *Ledger) FailTopUp(ctx context.Context, id uuid.UUID, code, reason string) (TopUp, error) {
	var out store.TopUp
	err := l.st.InTx(ctx, func(tx *store.Tx) error {
		a, x, err := tx.LockTopUp(ctx, id)
		if err != nil || x.Status != store.TopUpPending {
			out = x
			return err
		}
		x.Status, x.FailureCode, x.FailureReason = store.TopUpFailed, truncate(code, 100), truncate(reason, 500)
		if out, err = tx.UpdateTopUp(ctx, x); err != nil {
			return err
		}
		rule, found, err := tx.TopUpRule(ctx, a.ID)
		if err != nil || !found {
			return err
		}
		before := ruleState(rule)
		rule.ConsecutiveFailures++
		if int(rule.ConsecutiveFailures) >= l.topup.FailuresMax && rule.DisabledReason == "" {
			rule.DisabledReason = truncate(fmt.Sprintf("disabled after %d consecutive failed top-ups (last: %s)",
				rule.ConsecutiveFailures, code), 500)
		}
		next, err := tx.PutTopUpRule(ctx, rule)
		if err != nil || next.DisabledReason == "" || before["disabled_reason"] != "" {
			return err
		}
		return tx.WriteBatch(ctx, ruleChange(a, before, ruleState(next), uuid.Nil, "", next.UpdatedAt))
	})
	if err != nil {
		return TopUp{}, notFoundOr(err, ReasonTopUpNotFound, "top-up %s not found", id)
	}
	return toTopUp(out), nil
}

// CompleteTopUp posts the credit of a paid top-up: a CREDIT from the
// currency's funding account under a key derived from the top-up id, in
// the same transaction that marks the top-up SUCCEEDED with the payment id
// and the credit. Called again (a retried job), the key replays and nothing
// more is posted.
func (l *Ledger) CompleteTopUp(ctx context.Context, id uuid.UUID, paymentID string) (TopUp, error) {
	x, err := l.GetTopUp(ctx, id)
	if err != nil || x.Status != TopUpPending {
		return x, err
	}
	_, err = l.move(ctx, MoveRequest{
		Kind: KindCredit, Scope: TopUpScope, AccountID: x.AccountID, Amount: x.Amount,
		IdempotencyKey: "topup:" + id.String(), Description: "auto top-up",
		Metadata: map[string]string{"tally_topup_id": id.String()},
		TopUpID:  id, TopUpPaymentID: paymentID,
	})
	if err != nil {
		return x, err
	}
	return l.GetTopUp(ctx, id)
}
