package ledger

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// Provider reconciliation check names.
const (
	CheckProviderPaymentWithoutTopUp = "provider_payment_without_topup"
	CheckProviderPaymentDuplicate    = "provider_payment_duplicate"
	CheckTopUpWithoutPayment         = "topup_without_payment"
)

// Limits of provider reconciliation.
const (
	// ProviderWindowDefault is the window compared when none is given.
	ProviderWindowDefault = 24 * time.Hour
	// ProviderWindowMax bounds the window.
	ProviderWindowMax = 31 * 24 * time.Hour
	// ProviderTopUpsMax bounds the top-ups one comparison reads.
	ProviderTopUpsMax = 100_000
	// providerGrace widens the window on both sides: a top-up is recorded
	// before its payment is made, and the provider counts in seconds.
	providerGrace = time.Hour
)

// ProviderPayment is one payment at the top-up provider.
type ProviderPayment struct {
	ID       string
	TopUpID  string
	Amount   int64
	Currency string
	// Succeeded: the money was taken.
	Succeeded bool
	Status    string
	Created   time.Time
}

// PaymentLister lists the provider's top-up payments created in [from, to).
type PaymentLister interface {
	ProviderPayments(ctx context.Context, from, to time.Time) ([]ProviderPayment, error)
}

// SetPaymentLister gives Reconcile the provider to compare top-ups with.
// Call it before serving.
func (l *Ledger) SetPaymentLister(p PaymentLister) { l.payments = p }

// reconcileProvider compares the provider's payments of [from, to) with
// the top-ups.
func (l *Ledger) reconcileProvider(ctx context.Context, from, to time.Time, report func(Finding) error) error {
	if l.payments == nil {
		return rejection(CodeFailedPrecondition, ReasonTopUpProviderNotConfigured,
			"no payment provider to compare with: start tallyd with --topup-provider")
	}
	if to.IsZero() {
		to = time.Now()
	}
	if from.IsZero() {
		from = to.Add(-ProviderWindowDefault)
	}
	if !from.Before(to) || to.Sub(from) > ProviderWindowMax {
		return invalid("provider_from", "the provider window must be non-empty and at most %s", ProviderWindowMax)
	}
	// Payments of the window's top-ups may be made after it ends; only
	// payments made inside it are reported as lacking a top-up.
	pays, err := l.payments.ProviderPayments(ctx, from, to.Add(providerGrace))
	if err != nil {
		return &Error{Code: CodeUnavailable, Reason: ReasonDatabaseUnavailable,
			Message: "the payment provider could not be read: " + err.Error(), cause: err}
	}
	// Top-ups are recorded before their payment: look a little earlier.
	xs, err := l.st.TopUpsCreated(ctx, from.Add(-providerGrace), to, ProviderTopUpsMax)
	if err != nil {
		return fromStore(err)
	}
	byID := map[uuid.UUID]store.TopUp{}
	for _, x := range xs {
		byID[x.ID] = x
	}
	paid := map[uuid.UUID][]ProviderPayment{}
	for _, p := range pays {
		if !p.Succeeded {
			continue
		}
		id, err := uuid.Parse(p.TopUpID)
		if err == nil {
			paid[id] = append(paid[id], p)
		}
		if !p.Created.IsZero() && !p.Created.Before(to) {
			continue // after the window: its top-up is another window's
		}
		if err := l.checkPayment(ctx, p, id, err == nil, byID, report); err != nil {
			return err
		}
	}
	for id, ps := range paid {
		if len(ps) > 1 {
			if err := report(Finding{Check: CheckProviderPaymentDuplicate, AccountID: byID[id].AccountID,
				Detail: fmt.Sprintf("top-up %s has %d succeeded payments (%s, %s, ...)", id, len(ps), ps[0].ID, ps[1].ID)}); err != nil {
				return err
			}
		}
	}
	for _, x := range xs {
		if x.Status != store.TopUpSucceeded || x.CreatedAt.Before(from) {
			continue
		}
		if !paysInclude(paid[x.ID], x.ProviderPaymentID) {
			if err := report(Finding{Check: CheckTopUpWithoutPayment, AccountID: x.AccountID, TransferID: x.CreditTransferID,
				Currency: x.Currency, Detail: fmt.Sprintf("top-up %s is SUCCEEDED with payment %q, which the provider does not list as succeeded",
					x.ID, x.ProviderPaymentID)}); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkPayment reports a succeeded payment that has no SUCCEEDED top-up of
// its amount naming it.
func (l *Ledger) checkPayment(ctx context.Context, p ProviderPayment, id uuid.UUID, parsed bool,
	byID map[uuid.UUID]store.TopUp, report func(Finding) error) error {
	x, ok := byID[id]
	if parsed && !ok {
		got, err := l.st.GetTopUp(ctx, id) // created outside the window
		if err != nil && !isNotFound(err) {
			return fromStore(err)
		}
		x, ok = got, err == nil
	}
	detail := ""
	switch {
	case !ok:
		detail = fmt.Sprintf("payment %s (%d %s) names top-up %q, which does not exist", p.ID, p.Amount, p.Currency, p.TopUpID)
	case x.Status != store.TopUpSucceeded:
		detail = fmt.Sprintf("payment %s succeeded, but top-up %s is %s (not credited)", p.ID, x.ID, TopUpStatus(x.Status))
	case x.ProviderPaymentID != p.ID || x.Amount != p.Amount:
		detail = fmt.Sprintf("payment %s of %d, but top-up %s records payment %q of %d", p.ID, p.Amount, x.ID, x.ProviderPaymentID, x.Amount)
	default:
		return nil
	}
	return report(Finding{Check: CheckProviderPaymentWithoutTopUp, AccountID: x.AccountID, Currency: x.Currency, Detail: detail})
}

func paysInclude(ps []ProviderPayment, id string) bool {
	for _, p := range ps {
		if p.ID == id {
			return true
		}
	}
	return false
}
