package ledger

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// systemMissingError means the currency's default system account does not
// exist yet (accounts created before it); ensure it and try again.
type systemMissingError struct{ currency string }

func (e *systemMissingError) Error() string {
	return "ledger: default system accounts of " + e.currency + " missing"
}

// Charge debits r.AccountID and credits a revenue account.
func (l *Ledger) Charge(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindCharge
	return l.move(ctx, r)
}

// Credit debits a funding account and credits r.AccountID.
func (l *Ledger) Credit(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindCredit
	return l.move(ctx, r)
}

// Transfer moves money from r.AccountID to r.Counterparty.
func (l *Ledger) Transfer(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindTransfer
	return l.move(ctx, r)
}

// Apply runs one money-moving request of the kind r.Kind says (Charge to
// ReleaseHold), exactly as the method of that name would.
func (l *Ledger) Apply(ctx context.Context, r MoveRequest) (TransferResult, error) {
	if !r.Kind.keyed() {
		return TransferResult{}, invalid("kind", "not a money-moving operation")
	}
	return l.move(ctx, r)
}

// Refund reverses all or part of a charge (r.ChargeID) back to its account.
// Amount 0 refunds all that remains refundable.
func (l *Ledger) Refund(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindRefund
	return l.move(ctx, r)
}

// Hold reserves r.Amount on r.AccountID until it is captured, released or
// expires. r.Counterparty optionally names the revenue account to capture to.
func (l *Ledger) Hold(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindHold
	return l.move(ctx, r)
}

// CaptureHold charges r.Amount (0: all) of hold r.HoldID and releases the rest.
func (l *Ledger) CaptureHold(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindCapture
	return l.move(ctx, r)
}

// ReleaseHold frees all of hold r.HoldID.
func (l *Ledger) ReleaseHold(ctx context.Context, r MoveRequest) (TransferResult, error) {
	r.Kind = KindRelease
	return l.move(ctx, r)
}

// ChangeAccount freezes, unfreezes, closes or updates an account (r.Kind
// says which), recording who did it. r needs no idempotency key.
func (l *Ledger) ChangeAccount(ctx context.Context, r MoveRequest) (Account, error) {
	switch r.Kind {
	case KindFreeze, KindUnfreeze, KindClose, KindUpdate:
	default:
		panic(fmt.Sprintf("ledger: ChangeAccount with kind %d", r.Kind))
	}
	if len(r.Reason) > l.limits.DescriptionBytesMax || !validText(r.Reason) {
		return Account{}, invalid("reason", "reason must be valid UTF-8, at most %d bytes", l.limits.DescriptionBytesMax)
	}
	res, err := l.move(ctx, r)
	if err != nil {
		return Account{}, err
	}
	return *res.Account, nil
}

// ExpireHolds writes down the expiry of an account's expired holds (for the
// sweeper; reads never need it).
func (l *Ledger) ExpireHolds(ctx context.Context, id uuid.UUID) error {
	_, err := l.move(ctx, MoveRequest{Kind: KindExpire, AccountID: id})
	return err
}

func (l *Ledger) validateMove(r MoveRequest) error {
	needAccount := true
	switch r.Kind {
	case KindCapture, KindRelease:
		if r.HoldID == uuid.Nil {
			return invalid("hold_id", "hold_id is required")
		}
		needAccount = false
	case KindRefund:
		if r.ChargeID == uuid.Nil {
			return invalid("transfer_id", "transfer_id of the charge is required")
		}
		needAccount = false
	}
	if needAccount && r.AccountID == uuid.Nil {
		return invalid("account_id", "account_id is required")
	}
	if !r.Kind.keyed() {
		if r.Kind == KindUpdate {
			if r.NewCreditLimit != nil && (*r.NewCreditLimit < 0 || *r.NewCreditLimit > l.limits.CreditLimitMax) {
				return invalid("credit_limit", "credit_limit must be between 0 and %d", l.limits.CreditLimitMax)
			}
			if r.NewThreshold != nil && (*r.NewThreshold < -CreditLimitMax || *r.NewThreshold > CreditLimitMax) {
				return invalid("low_balance_threshold", "low_balance_threshold must be between %d and %d", -CreditLimitMax, CreditLimitMax)
			}
			if r.NewMetadata != nil {
				if err := l.limits.validateMetadata(r.NewMetadata); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if r.Kind == KindTransfer && r.Counterparty == uuid.Nil {
		return invalid("credit_account_id", "credit_account_id is required")
	}
	if r.Counterparty != uuid.Nil && r.Counterparty == r.AccountID {
		return selfPosting(r.AccountID)
	}
	switch r.Kind {
	case KindCapture, KindRefund:
		// 0 means "all": all of the hold, all that remains refundable.
		if r.Amount < 0 {
			return invalid("amount", "amount must not be negative")
		}
	case KindRelease:
		if r.Amount != 0 {
			return invalid("amount", "a release takes no amount")
		}
	default:
		if r.Amount <= 0 {
			return invalid("amount", "amount must be positive")
		}
	}
	if r.Kind == KindHold {
		if r.ExpiresAt != nil && r.ExpiresIn != 0 {
			return invalid("expires_in", "set expires_at or expires_in, not both")
		}
		if r.ExpiresIn < 0 || r.ExpiresIn > l.limits.HoldExpiryMax {
			return invalid("expires_in", "expires_in must be between 0 and %s", l.limits.HoldExpiryMax)
		}
	}
	if err := validateKey(r.IdempotencyKey); err != nil {
		return err
	}
	descField := "description"
	if r.Kind == KindRefund {
		descField = "reason" // RefundRequest.reason
	}
	if err := l.limits.validateDescription(descField, r.Description); err != nil {
		return err
	}
	return l.limits.validateMetadata(r.Metadata)
}

// move runs one operation through group commit: it joins the next batch,
// and returns once that batch's transaction has committed (or failed). If
// the caller's context ends first, the call returns DEADLINE_EXCEEDED or
// CANCELED while the batch may still commit: the outcome is then unknown,
// and a retry with the same key replays it.
func (l *Ledger) move(ctx context.Context, r MoveRequest) (TransferResult, error) {
	if err := l.validateMove(r); err != nil {
		return TransferResult{}, err
	}
	var fp []byte
	if r.Kind.keyed() {
		fp = fingerprint(r)
	}
	for attempt := 0; ; attempt++ {
		res, err := l.submit(ctx, r, fp)
		var missing *systemMissingError
		if !errors.As(err, &missing) {
			return res, err
		}
		if attempt > 0 {
			return TransferResult{}, fromStore(fmt.Errorf("system account still missing: %w", store.ErrInternal))
		}
		if err := l.ensureSystemAccounts(ctx, missing.currency); err != nil {
			return TransferResult{}, err
		}
	}
}

func (l *Ledger) submit(ctx context.Context, r MoveRequest, fp []byte) (TransferResult, error) {
	it := &item{r: r, fp: fp, out: make(chan itemResult, 1)}
	select {
	case l.batch.route(r) <- it:
	default:
		return TransferResult{}, rejection(CodeResourceExhausted, ReasonOverloaded,
			"too many calls waiting for a batch; retry with the same idempotency key after a backoff")
	}
	select {
	case res := <-it.out:
		return res.res, res.err
	case <-ctx.Done():
		return TransferResult{}, fromStore(ctx.Err())
	}
}

// assertPosting checks the double-entry invariants of a posting against the
// accounts as they were before it. A failure is a bug in decide: panic, so
// the batch is never committed.
func assertPosting(tr store.Transfer, e [2]store.Entry, before [2]store.Account) {
	if e[0].Amount+e[1].Amount != 0 || e[0].Amount >= 0 || e[1].Amount != tr.Amount {
		panic(fmt.Sprintf("ledger: unbalanced posting %+v", e))
	}
	if e[0].AccountID == e[1].AccountID || tr.DebitAccountID != e[0].AccountID || tr.CreditAccountID != e[1].AccountID {
		panic("ledger: posting sides do not match the transfer")
	}
	for i := range e {
		b := before[i]
		if e[i].AccountID != b.ID || e[i].Sequence != b.LastSequence+1 || e[i].VersionAfter != b.Version+1 ||
			e[i].BalanceAfter != b.Balance+e[i].Amount {
			panic(fmt.Sprintf("ledger: entry %+v does not follow account state %+v", e[i], b))
		}
	}
}

func rejectionRecord(r MoveRequest, fp []byte, e *Error) store.KeyRecord {
	code := codeNameFailedPrecondition
	if e.Code == CodeOutOfRange {
		code = codeNameOutOfRange
	}
	if e.Code != CodeFailedPrecondition && e.Code != CodeOutOfRange {
		panic(fmt.Sprintf("ledger: recording a non-business rejection %v", e))
	}
	return store.KeyRecord{
		Scope: r.Scope, Key: r.IdempotencyKey, Fingerprint: fp, Kind: int16(r.Kind), AccountID: r.AccountID,
		ErrorCode: code, ErrorReason: e.Reason, ErrorMessage: e.Message,
	}
}

// replay returns the stored outcome of a key: the same transfer with the
// named account's balance as of that transfer, or the same hold (with the
// account's current balance: a hold changes no entry to date it by), or the
// same rejection.
func (l *Ledger) replay(ctx context.Context, k *store.KeyRecord) (TransferResult, error) {
	if !k.TransferID.Valid && !k.HoldID.Valid {
		return TransferResult{}, storedRejection(*k)
	}
	var res TransferResult
	if k.HoldID.Valid {
		h, err := l.st.GetHold(ctx, k.HoldID.UUID)
		if err != nil {
			return TransferResult{}, fromStore(err)
		}
		b, err := l.st.GetBalance(ctx, k.AccountID)
		if err != nil {
			return TransferResult{}, fromStore(err)
		}
		hold := toHold(h, b.ReadAt)
		res.Hold = &hold
		res.Balance = balanceFromRow(b)
	}
	if k.TransferID.Valid {
		t, err := l.st.GetTransfer(ctx, k.TransferID.UUID)
		if err != nil {
			return TransferResult{}, fromStore(err)
		}
		e, err := l.st.GetEntry(ctx, t.ID, k.AccountID)
		if err != nil {
			return TransferResult{}, fromStore(err)
		}
		a, err := l.st.GetAccount(ctx, k.AccountID)
		if err != nil {
			return TransferResult{}, fromStore(err)
		}
		res.Transfer = toTransfer(t)
		res.Balance = Balance{
			AccountID: k.AccountID, Currency: a.Currency, Balance: e.BalanceAfter, CreditLimit: a.CreditLimit,
			Available: available(Floor(a.Floor), e.BalanceAfter, 0, a.CreditLimit), Version: e.VersionAfter,
			Source: SourceStore, AsOf: e.CreatedAt, Final: true,
		}
		res.ThresholdCrossed = t.ThresholdCrossed && t.DebitAccountID == k.AccountID
	}
	res.Replayed = true
	return res, nil
}

func timeKey(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// sweepAccountsMax bounds the accounts one sweep writes down.
const sweepAccountsMax = 500

// SweepHolds writes down expired holds every interval until ctx ends. It is
// tidying only: every read and write already treats an expired hold as
// expired, by PostgreSQL's clock, whether or not the sweeper ran.
func (l *Ledger) SweepHolds(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ids, err := l.st.ExpiringAccounts(ctx, sweepAccountsMax)
		if err != nil {
			l.log.Debug("hold sweep: listing accounts failed", "err", err)
			continue
		}
		for _, id := range ids {
			if err := l.ExpireHolds(ctx, id); err != nil {
				l.log.Debug("hold sweep: account failed", "account", id, "err", err)
			}
		}
	}
}
