// Package topup runs auto top-up jobs inside tallyd: River workers that
// take a PENDING top-up (recorded by the committing transaction of the
// debit that started it), charge the customer's card at the payment
// provider under an idempotency key derived only from the top-up id, look
// the payment up before any retry whose outcome is unknown, and post the
// credit in the same transaction that marks the top-up SUCCEEDED. Nothing
// here reads the balance cache.
package topup

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallyledger/tally/ledger"
)

// Outcome is what the provider says happened to a payment.
type Outcome int

// Outcomes.
const (
	// Unknown: a timeout, a lost connection, a 5xx or 409, a payment still
	// processing. Never treated as failed, never retried with a new key.
	Unknown Outcome = iota
	// Succeeded: the money was taken.
	Succeeded
	// Declined: the card was declined (or the request was refused before
	// any payment was made); nothing was taken.
	Declined
)

// Result is one payment's outcome.
type Result struct {
	Outcome   Outcome
	PaymentID string
	// Code is the provider's decline code; Message says more.
	Code, Message string
}

// Payment is one payment at the provider, for reconciliation.
type Payment struct {
	ID       string
	TopUpID  string
	Amount   int64
	Currency string
	Status   string
	Created  time.Time
}

// Provider charges cards.
type Provider interface {
	// Charge creates and confirms the top-up's payment. Every call for one
	// top-up sends the same idempotency key.
	Charge(ctx context.Context, x ledger.TopUp) (Result, error)
	// Find looks the top-up's payment up at the provider (found false when
	// the provider has none).
	Find(ctx context.Context, x ledger.TopUp) (Result, bool, error)
	// Payments lists the payments created in [from, to) that carry a
	// top-up id (for tally reconcile --stripe).
	Payments(ctx context.Context, customer string, from, to time.Time) ([]Payment, error)
}

// StripeAPIURLDefault is Stripe's API.
const StripeAPIURLDefault = "https://api.stripe.com"

// StripeTimeoutDefault bounds one call to Stripe.
const StripeTimeoutDefault = 20 * time.Second

// StripeConfig configures the Stripe provider.
type StripeConfig struct {
	APIKey string
	// URL is the API's base URL (default StripeAPIURLDefault; tests point
	// it at internal/stripetest).
	URL string
	// Timeout bounds each call (default StripeTimeoutDefault).
	Timeout time.Duration
}

// Stripe is the Provider of stripe-go v82.
type Stripe struct{ c *stripe.Client }

// NewStripe returns a Stripe provider. stripe-go's own network retries are
// off: the worker retries, after a look-up.
func NewStripe(cfg StripeConfig) *Stripe {
	if cfg.URL == "" {
		cfg.URL = StripeAPIURLDefault
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = StripeTimeoutDefault
	}
	backends := stripe.NewBackendsWithConfig(&stripe.BackendConfig{
		URL: stripe.String(cfg.URL), HTTPClient: &http.Client{Timeout: cfg.Timeout},
		MaxNetworkRetries: stripe.Int64(0), EnableTelemetry: stripe.Bool(false),
		LeveledLogger: &stripe.LeveledLogger{Level: stripe.LevelNull},
	})
	return &Stripe{c: stripe.NewClient(cfg.APIKey, stripe.WithBackends(backends))}
}

// IdempotencyKey is the key of every payment request of a top-up: derived
// from its id only, so every retry sends the same one.
func IdempotencyKey(x ledger.TopUp) string { return "tally-topup-" + x.ID.String() }

// Charge implements Provider.
func (s *Stripe) Charge(ctx context.Context, x ledger.TopUp) (Result, error) {
	p := &stripe.PaymentIntentCreateParams{
		Amount: stripe.Int64(x.Amount), Currency: stripe.String(strings.ToLower(x.Currency)),
		Customer: stripe.String(x.ProviderCustomerID), PaymentMethod: stripe.String(x.PaymentMethodID),
		Confirm: stripe.Bool(true), OffSession: stripe.Bool(true),
	}
	p.AddMetadata("tally_topup_id", x.ID.String())
	p.SetIdempotencyKey(IdempotencyKey(x))
	pi, err := s.c.V1PaymentIntents.Create(ctx, p)
	if err != nil {
		return classify(err), err
	}
	return intentResult(pi), nil
}

// classify turns a Stripe error into an outcome: only a card error (or a
// request refused as invalid, which Stripe never executes) is a decline.
func classify(err error) Result {
	var se *stripe.Error
	if !errors.As(err, &se) {
		return Result{Outcome: Unknown, Message: err.Error()}
	}
	r := Result{Outcome: Unknown, Code: string(se.Code), Message: se.Msg}
	if se.PaymentIntent != nil {
		r.PaymentID = se.PaymentIntent.ID
	}
	switch {
	case se.Type == stripe.ErrorTypeCard:
		r.Outcome = Declined
		if se.DeclineCode != "" {
			r.Code = string(se.DeclineCode)
		}
	case se.Type == stripe.ErrorTypeInvalidRequest && se.HTTPStatusCode == http.StatusBadRequest:
		r.Outcome = Declined
		if r.Code == "" {
			r.Code = "invalid_request"
		}
	}
	return r
}

func intentResult(pi *stripe.PaymentIntent) Result {
	r := Result{PaymentID: pi.ID, Outcome: Unknown, Message: "payment " + string(pi.Status)}
	switch pi.Status {
	case stripe.PaymentIntentStatusSucceeded:
		r.Outcome = Succeeded
	case stripe.PaymentIntentStatusRequiresPaymentMethod, stripe.PaymentIntentStatusCanceled:
		r.Outcome = Declined
		r.Code = string(pi.Status)
		if e := pi.LastPaymentError; e != nil {
			r.Code, r.Message = string(e.Code), e.Msg
			if e.DeclineCode != "" {
				r.Code = string(e.DeclineCode)
			}
		}
	}
	return r
}

// Find implements Provider: it lists the customer's PaymentIntents created
// since shortly before the top-up and matches metadata[tally_topup_id].
func (s *Stripe) Find(ctx context.Context, x ledger.TopUp) (Result, bool, error) {
	ps, err := s.list(ctx, x.ProviderCustomerID, x.CreatedAt.Add(-time.Hour), time.Time{}, x.ID.String())
	if err != nil || len(ps) == 0 {
		return Result{}, false, err
	}
	// Several could exist only if something else used our key space; a
	// succeeded one wins.
	best := ps[0]
	for _, p := range ps {
		if p.Status == stripe.PaymentIntentStatusSucceeded {
			best = p
		}
	}
	return intentResult(best), true, nil
}

// findPagesMax bounds one look-up's pages (100 PaymentIntents each).
const findPagesMax = 50

func (s *Stripe) list(ctx context.Context, customer string, from, to time.Time, topupID string) ([]*stripe.PaymentIntent, error) {
	lp := &stripe.PaymentIntentListParams{}
	if customer != "" {
		lp.Customer = stripe.String(customer)
	}
	// Stripe counts in seconds: the window is widened to whole seconds.
	rq := &stripe.RangeQueryParams{GreaterThanOrEqual: from.Unix()}
	if !to.IsZero() {
		rq.LesserThan = to.Add(time.Second - 1).Unix()
	}
	lp.CreatedRange = rq
	lp.Limit = stripe.Int64(100)
	var out []*stripe.PaymentIntent
	n := 0
	for pi, err := range s.c.V1PaymentIntents.List(ctx, lp) {
		if err != nil {
			return nil, err
		}
		if n++; n > findPagesMax*100 {
			return nil, fmt.Errorf("stripe: more than %d PaymentIntents to look through", findPagesMax*100)
		}
		if id := pi.Metadata["tally_topup_id"]; id != "" && (topupID == "" || id == topupID) {
			out = append(out, pi)
		}
	}
	return out, nil
}

// Payments implements Provider.
func (s *Stripe) Payments(ctx context.Context, customer string, from, to time.Time) ([]Payment, error) {
	ps, err := s.list(ctx, customer, from, to, "")
	if err != nil {
		return nil, err
	}
	out := make([]Payment, len(ps))
	for i, p := range ps {
		out[i] = Payment{ID: p.ID, TopUpID: p.Metadata["tally_topup_id"], Amount: p.Amount,
			Currency: string(p.Currency), Status: string(p.Status), Created: time.Unix(p.Created, 0)}
	}
	return out, nil
}

// Lister adapts a Provider to ledger.PaymentLister (tally reconcile
// --stripe compares its payments with the top-ups).
type Lister struct{ Provider Provider }

// ProviderPayments implements ledger.PaymentLister.
func (l Lister) ProviderPayments(ctx context.Context, from, to time.Time) ([]ledger.ProviderPayment, error) {
	ps, err := l.Provider.Payments(ctx, "", from, to)
	if err != nil {
		return nil, err
	}
	out := make([]ledger.ProviderPayment, len(ps))
	for i, p := range ps {
		out[i] = ledger.ProviderPayment{ID: p.ID, TopUpID: p.TopUpID, Amount: p.Amount, Currency: p.Currency,
			Status: p.Status, Succeeded: p.Status == string(stripe.PaymentIntentStatusSucceeded), Created: p.Created}
	}
	return out, nil
}
