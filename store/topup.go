package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
)

// Top-up statuses as stored.
const (
	TopUpPending   int16 = 1
	TopUpSucceeded int16 = 2
	TopUpFailed    int16 = 3
)

// TopUpQueue is the default River queue top-up jobs are inserted into and
// worked from.
const TopUpQueue = "tally_topup"

// EventTopUp is the change-feed kind of a top-up's state change.
const EventTopUp = "topup"

// TopUpJobArgs is the River job that carries a top-up to the payment
// provider. It names the top-up only: everything else is read from its row.
type TopUpJobArgs struct {
	TopUpID uuid.UUID `json:"topup_id"`
}

// Kind implements river.JobArgs.
func (TopUpJobArgs) Kind() string { return "tally_topup" }

// TopUpRule is a topup_rules row.
type TopUpRule struct {
	AccountID           uuid.UUID
	Currency            string
	Enabled             bool
	Threshold           int64
	TargetBalance       int64
	AmountMax           int64
	PerDayMax           int64
	ProviderCustomerID  string
	PaymentMethodID     string
	ConsecutiveFailures int32
	DisabledReason      string
	CreatedAt           time.Time
	UpdatedAt           time.Time
}

// Active reports whether the rule may start top-ups.
func (r TopUpRule) Active() bool { return r.Enabled && r.DisabledReason == "" }

// TopUp is a topups row. Its JSON encoding (Go field names) is the payload
// of its change-feed events.
type TopUp struct {
	ID                 uuid.UUID
	AccountID          uuid.UUID
	Status             int16
	Amount             int64
	Currency           string
	Day                time.Time
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

// TopUpStart asks for a top-up of an account that a committed debit left
// with Available below its rule's threshold.
type TopUpStart struct {
	AccountID         uuid.UUID
	Available         int64
	TriggerTransferID uuid.UUID
	TriggerHoldID     uuid.UUID
	At                time.Time
}

// TopUpSuccess marks a top-up SUCCEEDED with its payment and credit.
type TopUpSuccess struct {
	TopUpID           uuid.UUID
	ProviderPaymentID string
	CreditTransferID  uuid.UUID
}

const ruleCols = `account_id, currency, enabled, threshold, target_balance, amount_max, per_day_max,
	provider_customer_id, payment_method_id, consecutive_failures, disabled_reason, created_at, updated_at`

func scanRule(r rowScanner) (TopUpRule, error) {
	var x TopUpRule
	err := r.Scan(&x.AccountID, &x.Currency, &x.Enabled, &x.Threshold, &x.TargetBalance, &x.AmountMax, &x.PerDayMax,
		&x.ProviderCustomerID, &x.PaymentMethodID, &x.ConsecutiveFailures, &x.DisabledReason, &x.CreatedAt, &x.UpdatedAt)
	return x, err
}

const topupCols = `topup_id, account_id, status, amount, currency, day, provider_customer_id, payment_method_id,
	trigger_transfer_id, trigger_hold_id, provider_payment_id, credit_transfer_id, failure_code, failure_reason,
	attempts, created_at, updated_at, finished_at`

func scanTopUp(r rowScanner) (TopUp, error) {
	var x TopUp
	var trig, hold, credit uuid.NullUUID
	err := r.Scan(&x.ID, &x.AccountID, &x.Status, &x.Amount, &x.Currency, &x.Day, &x.ProviderCustomerID, &x.PaymentMethodID,
		&trig, &hold, &x.ProviderPaymentID, &credit, &x.FailureCode, &x.FailureReason,
		&x.Attempts, &x.CreatedAt, &x.UpdatedAt, &x.FinishedAt)
	x.TriggerTransferID, x.TriggerHoldID, x.CreditTransferID = trig.UUID, hold.UUID, credit.UUID
	return x, err
}

func collectTopUps(rows pgx.Rows, err error) ([]TopUp, error) {
	if err != nil {
		return nil, translate(err)
	}
	defer rows.Close()
	var out []TopUp
	for rows.Next() {
		x, err := scanTopUp(rows)
		if err != nil {
			return nil, translate(err)
		}
		out = append(out, x)
	}
	return out, translate(rows.Err())
}

// LockAccount locks an account row for the rest of the transaction and
// returns it.
func (t *Tx) LockAccount(ctx context.Context, id uuid.UUID) (Account, error) {
	a, err := scanAccount(t.tx.QueryRow(ctx, `SELECT `+accountCols+` FROM accounts WHERE account_id = $1 FOR UPDATE`, id))
	return a, translate(err)
}

// TopUpRule returns an account's rule (found false when it has none).
// Lock the account first: rules change only under its lock.
func (t *Tx) TopUpRule(ctx context.Context, accountID uuid.UUID) (TopUpRule, bool, error) {
	r, err := scanRule(t.tx.QueryRow(ctx, `SELECT `+ruleCols+` FROM topup_rules WHERE account_id = $1`, accountID))
	if errors.Is(err, pgx.ErrNoRows) {
		return TopUpRule{}, false, nil
	}
	return r, err == nil, translate(err)
}

// PutTopUpRule stores a rule (insert or overwrite) and mirrors its
// threshold onto the account row while it is active. Lock the account
// first.
func (t *Tx) PutTopUpRule(ctx context.Context, r TopUpRule) (TopUpRule, error) {
	out, err := scanRule(t.tx.QueryRow(ctx, `INSERT INTO topup_rules (account_id, currency, enabled, threshold,
		target_balance, amount_max, per_day_max, provider_customer_id, payment_method_id, consecutive_failures,
		disabled_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
		ON CONFLICT (account_id) DO UPDATE SET currency = excluded.currency, enabled = excluded.enabled,
		    threshold = excluded.threshold, target_balance = excluded.target_balance, amount_max = excluded.amount_max,
		    per_day_max = excluded.per_day_max, provider_customer_id = excluded.provider_customer_id,
		    payment_method_id = excluded.payment_method_id, consecutive_failures = excluded.consecutive_failures,
		    disabled_reason = excluded.disabled_reason, updated_at = clock_timestamp()
		RETURNING `+ruleCols, r.AccountID, r.Currency, r.Enabled, r.Threshold, r.TargetBalance, r.AmountMax, r.PerDayMax,
		r.ProviderCustomerID, r.PaymentMethodID, r.ConsecutiveFailures, r.DisabledReason))
	if err != nil {
		return TopUpRule{}, translate(err)
	}
	var mirror *int64
	if out.Active() {
		th := out.Threshold
		mirror = &th
	}
	_, err = t.tx.Exec(ctx, `UPDATE accounts SET topup_threshold = $2 WHERE account_id = $1`, r.AccountID, mirror)
	return out, translate(err)
}

// LockTopUp locks a top-up's account row (the lock order of the write
// path: account before top-up), then reads the top-up.
func (t *Tx) LockTopUp(ctx context.Context, id uuid.UUID) (Account, TopUp, error) {
	a, err := scanAccount(t.tx.QueryRow(ctx, `SELECT `+accountCols+` FROM accounts
		WHERE account_id = (SELECT account_id FROM topups WHERE topup_id = $1) FOR UPDATE`, id))
	if err != nil {
		return Account{}, TopUp{}, translate(err)
	}
	x, err := scanTopUp(t.tx.QueryRow(ctx, `SELECT `+topupCols+` FROM topups WHERE topup_id = $1`, id))
	return a, x, translate(err)
}

// UpdateTopUp writes a PENDING top-up's new status, failure and attempts
// (and finished_at for a final status) and its feed event. Lock it first
// with LockTopUp.
func (t *Tx) UpdateTopUp(ctx context.Context, x TopUp) (TopUp, error) {
	out, err := scanTopUp(t.tx.QueryRow(ctx, `UPDATE topups SET status = $2::int2, failure_code = $3, failure_reason = $4,
		    attempts = $5, provider_payment_id = $6, updated_at = clock_timestamp(),
		    finished_at = CASE WHEN $2::int2 = 1 THEN NULL ELSE clock_timestamp() END
		WHERE topup_id = $1 AND status = 1 RETURNING `+topupCols,
		x.ID, x.Status, x.FailureCode, x.FailureReason, x.Attempts, x.ProviderPaymentID))
	if err != nil {
		return TopUp{}, translate(err)
	}
	if out.Status == TopUpPending {
		return out, nil // an attempt, not a state change
	}
	return out, t.insertTopUpEvents(ctx, []TopUp{out})
}

// GetTopUpRule returns an account's rule.
func (s *Store) GetTopUpRule(ctx context.Context, accountID uuid.UUID) (TopUpRule, error) {
	r, err := scanRule(s.pool.QueryRow(ctx, `SELECT `+ruleCols+` FROM topup_rules WHERE account_id = $1`, accountID))
	return r, translate(err)
}

// GetTopUp returns a top-up by id.
func (s *Store) GetTopUp(ctx context.Context, id uuid.UUID) (TopUp, error) {
	x, err := scanTopUp(s.pool.QueryRow(ctx, `SELECT `+topupCols+` FROM topups WHERE topup_id = $1`, id))
	return x, translate(err)
}

// ListTopUps returns up to limit top-ups of an account, newest first
// (topup_id is a UUIDv7), after the top-up before when it is set.
func (s *Store) ListTopUps(ctx context.Context, accountID, before uuid.UUID, limit int) ([]TopUp, error) {
	return collectTopUps(s.pool.Query(ctx, `SELECT `+topupCols+` FROM topups
		WHERE account_id = $1 AND ($2::uuid IS NULL OR topup_id < $2)
		ORDER BY topup_id DESC LIMIT $3`, accountID, nullID(before), limit))
}

// topUpJobs is the insert-only River client of a store: it inserts top-up
// jobs inside the caller's transaction (InsertManyTx). Workers run in
// package topup with a client of their own.
type topUpJobs struct {
	once   sync.Once
	client *river.Client[pgx.Tx]
	err    error
}

func (s *Store) jobs() (*river.Client[pgx.Tx], error) {
	s.topup.once.Do(func() {
		// Insert-only: it works no jobs, so it never LISTENs, and the
		// NOTIFY River sends with an insert is part of the transaction,
		// which a transaction pooler keeps on one server connection.
		s.topup.client, s.topup.err = river.NewClient(riverpgxv5.New(s.pool), &river.Config{Logger: s.log, PollOnly: s.TransactionPooler()})
	})
	return s.topup.client, s.topup.err
}

// StartTopUps runs inside a write batch's transaction, after its writes:
// for every start whose account has an active rule with the threshold
// above Available, no top-up in flight (topups_one_in_flight) and room
// left under per_day_max on the start's UTC day, it inserts a PENDING
// top-up of min(target_balance - available, amount_max, what the day
// allows), adds it to the day's total (topup_days_within_cap), enqueues its
// River job in the same transaction and writes its feed event. It returns
// the top-ups started. The account rows are locked by the batch, so the
// rules read here cannot change before commit.
func (s *Store) StartTopUps(ctx context.Context, t *Tx, starts []TopUpStart, queue string, attemptsMax int) ([]TopUp, error) {
	n := len(starts)
	accts := make([]uuid.UUID, n)
	avail := make([]int64, n)
	trig := make([]*string, n)
	holds := make([]*string, n)
	ats := make([]time.Time, n)
	newIDs := make([]uuid.UUID, n)
	for i, st := range starts {
		accts[i], avail[i], ats[i] = st.AccountID, st.Available, st.At
		trig[i], holds[i] = nullID(st.TriggerTransferID), nullID(st.TriggerHoldID)
		id, err := uuid.NewV7()
		if err != nil {
			return nil, &Error{Kind: ErrInternal, cause: err}
		}
		newIDs[i] = id
	}
	// The amount is computed in numeric, so no value of available can
	// overflow; least() with amount_max brings it back into bigint range.
	started, err := collectTopUps(t.tx.Query(ctx, `
		WITH c AS (
		  SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[]::uuid[], $4::text[]::uuid[], $5::timestamptz[], $6::uuid[])
		    AS c(account_id, available, trig, hold, at, id)),
		r AS (
		  SELECT c.*, r.currency, r.target_balance, r.amount_max, r.per_day_max, r.provider_customer_id,
		         r.payment_method_id, (c.at AT TIME ZONE 'UTC')::date AS day
		  FROM c JOIN topup_rules r ON r.account_id = c.account_id
		  WHERE r.enabled AND r.disabled_reason = '' AND c.available < r.threshold
		    AND NOT EXISTS (SELECT 1 FROM topups p WHERE p.account_id = c.account_id AND p.status = 1)),
		a AS (
		  SELECT r.*, least(r.target_balance::numeric - r.available, r.amount_max,
		         r.per_day_max - coalesce((SELECT d.amount FROM topup_days d
		                                   WHERE d.account_id = r.account_id AND d.day = r.day), 0))::bigint AS amount
		  FROM r),
		ins AS (
		  INSERT INTO topups (topup_id, account_id, status, amount, currency, day, provider_customer_id,
		                      payment_method_id, trigger_transfer_id, trigger_hold_id, created_at, updated_at)
		  SELECT id, account_id, 1, amount, currency, day, provider_customer_id, payment_method_id, trig, hold, at, at
		  FROM a WHERE amount > 0
		  ON CONFLICT (account_id) WHERE status = 1 DO NOTHING
		  RETURNING `+topupCols+`),
		days AS (
		  INSERT INTO topup_days AS d (account_id, day, amount, per_day_max)
		  SELECT ins.account_id, ins.day, ins.amount, a.per_day_max FROM ins JOIN a ON a.id = ins.topup_id
		  ON CONFLICT (account_id, day) DO UPDATE SET amount = d.amount + excluded.amount, per_day_max = excluded.per_day_max)
		SELECT * FROM ins`, accts, avail, trig, holds, ats, newIDs))
	if err != nil || len(started) == 0 {
		return nil, err
	}
	jobs, err := s.jobs()
	if err != nil {
		return nil, &Error{Kind: ErrInternal, cause: err}
	}
	params := make([]river.InsertManyParams, len(started))
	for i, x := range started {
		params[i] = river.InsertManyParams{Args: TopUpJobArgs{TopUpID: x.ID},
			InsertOpts: &river.InsertOpts{Queue: queue, MaxAttempts: attemptsMax}}
	}
	if _, err := jobs.InsertManyTx(ctx, t.tx, params); err != nil {
		return nil, translate(err)
	}
	return started, t.insertTopUpEvents(ctx, started)
}

// insertTopUpEvents writes one change-feed event per top-up state.
func (t *Tx) insertTopUpEvents(ctx context.Context, xs []TopUp) error {
	n := len(xs)
	subjects := make([]uuid.UUID, n)
	accts := make([]uuid.UUID, n)
	payloads := make([]string, n)
	ats := make([]time.Time, n)
	for i, x := range xs {
		b, err := json.Marshal(x)
		if err != nil {
			return &Error{Kind: ErrInternal, cause: err}
		}
		subjects[i], accts[i], payloads[i], ats[i] = x.ID, x.AccountID, string(b), x.UpdatedAt
	}
	_, err := t.tx.Exec(ctx, `INSERT INTO events (kind, subject_id, account_id, payload, created_at)
		SELECT 'topup', e.subject, e.acct, e.payload::jsonb, e.at
		FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[]) WITH ORDINALITY AS e(subject, acct, payload, at, n)
		ORDER BY e.n`, subjects, accts, payloads, ats)
	return translate(err)
}

// SucceedTopUps runs inside the write batch that posted the top-ups'
// credits: it marks each SUCCEEDED with its payment and credit transfer,
// resets its rule's consecutive failures and writes the feed events. A
// top-up that is not PENDING aborts the transaction (the credit's key
// would have replayed instead).
func (t *Tx) SucceedTopUps(ctx context.Context, ss []TopUpSuccess, at time.Time) error {
	n := len(ss)
	ids := make([]uuid.UUID, n)
	pays := make([]string, n)
	credits := make([]uuid.UUID, n)
	for i, x := range ss {
		ids[i], pays[i], credits[i] = x.TopUpID, x.ProviderPaymentID, x.CreditTransferID
	}
	done, err := collectTopUps(t.tx.Query(ctx, `
		WITH u AS (
		  UPDATE topups p SET status = 2, provider_payment_id = s.pay, credit_transfer_id = s.credit,
		         failure_code = '', failure_reason = '', updated_at = $4, finished_at = $4
		  FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS s(id, pay, credit)
		  WHERE p.topup_id = s.id AND p.status = 1
		  RETURNING p.*),
		r AS (
		  UPDATE topup_rules r SET consecutive_failures = 0 FROM u WHERE r.account_id = u.account_id)
		SELECT `+topupCols+` FROM u`, ids, pays, credits, at))
	if err != nil {
		return err
	}
	if len(done) != n {
		return &Error{Kind: ErrInternal, cause: fmt.Errorf("marked %d top-ups SUCCEEDED, want %d", len(done), n)}
	}
	return t.insertTopUpEvents(ctx, done)
}

// TopUpsCreated returns the top-ups created in [from, to), at most limit
// (more is ErrOutOfRange).
func (s *Store) TopUpsCreated(ctx context.Context, from, to time.Time, limit int) ([]TopUp, error) {
	xs, err := collectTopUps(s.pool.Query(ctx, `SELECT `+topupCols+` FROM topups
		WHERE created_at >= $1 AND created_at < $2 ORDER BY topup_id LIMIT $3`, from, to, limit+1))
	if err == nil && len(xs) > limit {
		return nil, &Error{Kind: ErrOutOfRange, cause: fmt.Errorf("more than %d top-ups in the window", limit)}
	}
	return xs, err
}
