package topup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertype"

	"github.com/tallyledger/tally/ledger"
	"github.com/tallyledger/tally/store"
)

// Defaults of the top-up workers. Each has a tallyd flag.
const (
	// WorkersMaxDefault is how many top-up jobs one tallyd works at once.
	WorkersMaxDefault = 4
	// RetryBackoffDefault is the first retry's delay; it doubles per
	// attempt up to RetryBackoffMaxDefault.
	RetryBackoffDefault    = time.Second
	RetryBackoffMaxDefault = 5 * time.Minute
	// JobTimeoutDefault bounds one attempt (a provider call, a look-up and
	// the credit).
	JobTimeoutDefault = time.Minute
	// RescueAfterDefault is how long a job may stay running before River
	// gives it to another worker (its tallyd died): more than JobTimeout.
	RescueAfterDefault = 2 * time.Minute
	// PollIntervalDefault is how often workers look for new jobs when
	// River cannot be woken by LISTEN/NOTIFY (behind a transaction pooler,
	// store.Store.TransactionPooler): a top-up then starts within about
	// this long of the charge that triggered it. One indexed query per
	// interval per process.
	PollIntervalDefault = 200 * time.Millisecond
)

// Config configures the top-up workers.
type Config struct {
	Ledger   *ledger.Ledger
	Store    *store.Store
	Provider Provider
	// WorkersMax bounds jobs worked at once by this process.
	WorkersMax int
	// RetryBackoff and RetryBackoffMax shape River's retry delays.
	RetryBackoff, RetryBackoffMax time.Duration
	// JobTimeout bounds one attempt; RescueAfter is when a running job of
	// a dead process is retried.
	JobTimeout, RescueAfter time.Duration
	// PollInterval is how often jobs are looked for when River polls
	// (behind a transaction pooler); with LISTEN/NOTIFY, River's own 1 s
	// fallback poll stays.
	PollInterval time.Duration
	Logger       *slog.Logger
}

func (c *Config) fill() {
	if c.WorkersMax <= 0 {
		c.WorkersMax = WorkersMaxDefault
	}
	if c.RetryBackoff <= 0 {
		c.RetryBackoff = RetryBackoffDefault
	}
	if c.RetryBackoffMax < c.RetryBackoff {
		c.RetryBackoffMax = max(RetryBackoffMaxDefault, c.RetryBackoff)
	}
	if c.JobTimeout <= 0 {
		c.JobTimeout = JobTimeoutDefault
	}
	if c.RescueAfter <= c.JobTimeout {
		c.RescueAfter = max(RescueAfterDefault, 2*c.JobTimeout)
	}
	if c.PollInterval <= 0 {
		c.PollInterval = PollIntervalDefault
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Stats counts what the workers did in this process.
type Stats struct {
	Succeeded, Failed, Retried int64
	// Unresolved counts top-ups left PENDING after their last attempt
	// (an unknown outcome or a refused credit): each needs a person.
	Unresolved int64
}

// Service is the running workers.
type Service struct {
	cfg    Config
	client *river.Client[pgx.Tx]
	stats  struct{ succeeded, failed, retried, unresolved atomic.Int64 }
}

// Start starts River's workers for the top-up queue on the store's pool.
func Start(ctx context.Context, cfg Config) (*Service, error) {
	cfg.fill()
	s := &Service{cfg: cfg}
	workers := river.NewWorkers()
	if err := river.AddWorkerSafely(workers, &worker{s: s}); err != nil {
		return nil, err
	}
	rcfg := &river.Config{
		Queues:               map[string]river.QueueConfig{cfg.Ledger.TopUpConfig().Queue: {MaxWorkers: cfg.WorkersMax}},
		Workers:              workers,
		JobTimeout:           cfg.JobTimeout,
		RescueStuckJobsAfter: cfg.RescueAfter,
		RetryPolicy:          &backoff{base: cfg.RetryBackoff, max: cfg.RetryBackoffMax},
		MaxAttempts:          cfg.Ledger.TopUpConfig().AttemptsMax,
		Logger:               cfg.Logger,
	}
	if cfg.Store.TransactionPooler() {
		// River's notifier holds a connection in LISTEN for as long as it
		// runs; a transaction pooler hands that server connection to other
		// clients after the LISTEN statement, so no notification would
		// come (and leadership changes would go unnoticed). Poll instead,
		// often enough that a top-up does not wait long.
		rcfg.PollOnly = true
		rcfg.FetchPollInterval = cfg.PollInterval
		rcfg.FetchCooldown = min(river.FetchCooldownDefault, cfg.PollInterval)
	}
	c, err := river.NewClient(riverpgxv5.New(cfg.Store.Pool()), rcfg)
	if err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	s.client = c
	cfg.Ledger.SetPaymentLister(Lister{Provider: cfg.Provider})
	return s, nil
}

// Stop stops fetching jobs and waits for the running ones (until ctx ends).
func (s *Service) Stop(ctx context.Context) error { return s.client.Stop(ctx) }

// Stats returns the workers' counters.
func (s *Service) Stats() Stats {
	return Stats{Succeeded: s.stats.succeeded.Load(), Failed: s.stats.failed.Load(),
		Retried: s.stats.retried.Load(), Unresolved: s.stats.unresolved.Load()}
}

// backoff is River's retry policy: base * 2^(attempt-1), at most max.
type backoff struct{ base, max time.Duration }

// NextRetry implements river.ClientRetryPolicy.
func (b *backoff) NextRetry(job *rivertype.JobRow) time.Time {
	d := time.Duration(float64(b.base) * math.Pow(2, float64(max(job.Attempt-1, 0))))
	if d > b.max || d <= 0 {
		d = b.max
	}
	return time.Now().Add(d)
}

type worker struct {
	river.WorkerDefaults[store.TopUpJobArgs]
	s *Service
}

// errUnknown is an attempt whose payment outcome is not known yet.
var errUnknown = errors.New("topup: payment outcome unknown")

// Work runs one attempt of a top-up: count the attempt, look the payment
// up when an earlier attempt may have reached the provider, else charge;
// then act on the outcome. An error makes River retry (bounded attempts).
func (w *worker) Work(ctx context.Context, job *river.Job[store.TopUpJobArgs]) error {
	s := w.s
	l := s.cfg.Ledger
	x, err := l.BeginTopUpAttempt(ctx, job.Args.TopUpID)
	if err != nil {
		s.cfg.Logger.Warn("top-up attempt not started", "topup_id", job.Args.TopUpID.String(), "err", causeText(err))
		return err
	}
	if x.Status != ledger.TopUpPending {
		return nil // finished by an earlier attempt
	}
	res, err := w.pay(ctx, x, job.Attempt)
	switch res.Outcome {
	case Succeeded:
		return w.credit(ctx, x, res, job)
	case Declined:
		if _, err := l.FailTopUp(ctx, x.ID, res.Code, res.Message); err != nil {
			return err
		}
		s.stats.failed.Add(1)
		s.cfg.Logger.Warn("top-up declined", "topup_id", x.ID.String(), "code", res.Code)
		return nil
	}
	reason := "payment outcome unknown: " + res.Message
	if err != nil {
		reason = "payment outcome unknown: " + err.Error()
	}
	return w.unresolved(ctx, x, job, reason)
}

// pay looks the payment up first whenever an earlier attempt may have
// reached the provider, and only charges when the provider has none. The
// charge reuses the key, so even a lost look-up cannot charge twice while
// Stripe keeps the key (24 hours).
func (w *worker) pay(ctx context.Context, x ledger.TopUp, attempt int) (Result, error) {
	p := w.s.cfg.Provider
	if x.Attempts > 1 || attempt > 1 {
		res, found, err := p.Find(ctx, x)
		if err != nil {
			return Result{Outcome: Unknown, Message: "look-up failed: " + err.Error()}, err
		}
		if found {
			return res, nil
		}
	}
	return p.Charge(ctx, x)
}

func (w *worker) credit(ctx context.Context, x ledger.TopUp, res Result, job *river.Job[store.TopUpJobArgs]) error {
	s := w.s
	done, err := s.cfg.Ledger.CompleteTopUp(ctx, x.ID, res.PaymentID)
	if err == nil && done.Status == ledger.TopUpSucceeded {
		s.stats.succeeded.Add(1)
		return nil
	}
	var le *ledger.Error
	if errors.As(err, &le) && le.Code != ledger.CodeUnavailable && le.Code != ledger.CodeTimeout &&
		le.Code != ledger.CodeResourceExhausted && le.Code != ledger.CodeCanceled {
		// The credit itself was refused (for example a closed account):
		// its key keeps that outcome, so retrying cannot help. Paid, not
		// credited: a person must act.
		s.stats.unresolved.Add(1)
		s.cfg.Logger.Error("top-up paid but its credit was refused; needs a person", "topup_id", x.ID.String(),
			"payment_id", res.PaymentID, "reason", le.Reason)
		_ = s.cfg.Ledger.NoteTopUpProblem(ctx, x.ID, "paid ("+res.PaymentID+") but the credit was refused: "+le.Message)
		return river.JobCancel(err)
	}
	if err == nil {
		err = fmt.Errorf("topup %s is %s after its credit", x.ID, done.Status)
	}
	return w.unresolved(ctx, x, job, "paid ("+res.PaymentID+"), credit not posted yet: "+err.Error())
}

// unresolved records why the top-up is still PENDING and asks River to
// retry; after the last attempt it stays PENDING for a person (the
// partial unique index keeps any other top-up of the account from
// starting meanwhile) and the alert counter goes up.
func (w *worker) unresolved(ctx context.Context, x ledger.TopUp, job *river.Job[store.TopUpJobArgs], reason string) error {
	s := w.s
	last := job.Attempt >= job.MaxAttempts
	if last {
		reason = fmt.Sprintf("needs a person: still unresolved after %d attempts: %s", job.Attempt, reason)
		s.stats.unresolved.Add(1)
		s.cfg.Logger.Error("top-up unresolved after its last attempt", "topup_id", x.ID.String(), "reason", reason)
	} else {
		s.stats.retried.Add(1)
	}
	if err := s.cfg.Ledger.NoteTopUpProblem(ctx, x.ID, reason); err != nil {
		s.cfg.Logger.Warn("recording a top-up's problem", "topup_id", x.ID.String(), "err", err.Error())
	}
	return fmt.Errorf("%w: %s", errUnknown, reason)
}

// causeText unwraps ledger and store errors to the driver's message, for
// the server's log only.
func causeText(err error) string {
	type causer interface{ Cause() error }
	var c causer
	if errors.As(err, &c) && c.Cause() != nil {
		return err.Error() + ": " + c.Cause().Error()
	}
	return err.Error()
}
