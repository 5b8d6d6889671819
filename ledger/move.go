package ledger

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// errSystemAccountMissing means the currency's default system account does
// not exist yet (accounts created before it); ensure it and try again.
var errSystemAccountMissing = errors.New("ledger: system account missing")

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

func (l *Ledger) validateMove(r MoveRequest) error {
	if r.AccountID == uuid.Nil {
		return invalid("account_id", "account_id is required")
	}
	if r.Kind == KindTransfer && r.Counterparty == uuid.Nil {
		return invalid("credit_account_id", "credit_account_id is required")
	}
	if r.Counterparty == r.AccountID {
		return invalid("account_id", "debit and credit accounts must differ")
	}
	if r.Amount <= 0 {
		return invalid("amount", "amount must be positive")
	}
	if err := validateKey(r.IdempotencyKey); err != nil {
		return err
	}
	if err := l.limits.validateDescription(r.Description); err != nil {
		return err
	}
	return l.limits.validateMetadata(r.Metadata)
}

// move runs one Charge, Credit or Transfer through group commit: it joins
// the next batch, and returns once that batch's transaction has committed (or
// failed). If the caller's context ends first, the call returns
// DEADLINE_EXCEEDED or CANCELED while the batch may still commit: the outcome
// is then unknown, and a retry with the same key replays it.
func (l *Ledger) move(ctx context.Context, r MoveRequest) (TransferResult, error) {
	if err := l.validateMove(r); err != nil {
		return TransferResult{}, err
	}
	fp := fingerprint(r)
	for attempt := 0; ; attempt++ {
		res, err := l.submit(ctx, r, fp)
		if !errors.Is(err, errSystemAccountMissing) {
			return res, err
		}
		if attempt > 0 {
			return TransferResult{}, fromStore(fmt.Errorf("system account still missing: %w", store.ErrInternal))
		}
		a, gerr := l.st.GetAccount(ctx, r.AccountID)
		if gerr != nil {
			return TransferResult{}, fromStore(gerr)
		}
		if err := l.ensureSystemAccounts(ctx, a.Currency); err != nil {
			return TransferResult{}, err
		}
	}
}

func (l *Ledger) submit(ctx context.Context, r MoveRequest, fp []byte) (TransferResult, error) {
	it := &item{r: r, fp: fp, out: make(chan itemResult, 1)}
	select {
	case l.batch.in <- it:
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

// decide applies the rules of money to one item, against the batch's working
// copy of the locked accounts (which it updates), and appends what the item
// writes to w. It returns the posting's result, or a business rejection
// (recorded under the key), or an error that records nothing (NOT_FOUND).
func (l *Ledger) decide(r MoveRequest, fp []byte, accts map[uuid.UUID]*store.Account,
	system map[string]map[string]uuid.UUID, now time.Time, w *store.BatchWrite) (TransferResult, *Error, error) {
	primary, ok := accts[r.AccountID]
	if !ok {
		return TransferResult{}, nil, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", r.AccountID)
	}
	var counter *store.Account
	if r.Counterparty != uuid.Nil {
		if counter, ok = accts[r.Counterparty]; !ok {
			return TransferResult{}, nil, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", r.Counterparty)
		}
	} else {
		role := store.SystemRoleRevenue
		if r.Kind == KindCredit {
			role = store.SystemRoleFunding
		}
		id, ok := system[primary.Currency][role]
		if !ok {
			return TransferResult{}, nil, errSystemAccountMissing
		}
		if counter, ok = accts[id]; !ok {
			panic(fmt.Sprintf("ledger: system account %s was not locked", id))
		}
	}
	debit, credit := primary, counter
	if r.Kind == KindCredit {
		debit, credit = counter, primary
	}
	reject := func(code Code, reason, format string, args ...any) (TransferResult, *Error, error) {
		e := rejection(code, reason, format, args...)
		w.Keys = append(w.Keys, rejectionRecord(r, fp, e))
		return TransferResult{}, e, nil
	}
	if debit.Currency != credit.Currency {
		return reject(CodeFailedPrecondition, ReasonCurrencyMismatch,
			"accounts have different currencies (%s, %s)", debit.Currency, credit.Currency)
	}
	switch {
	case r.Kind == KindCharge && AccountType(counter.Type) != AccountTypeRevenue:
		return reject(CodeFailedPrecondition, ReasonAccountTypeMismatch, "revenue_account_id must be a REVENUE account")
	case r.Kind == KindCredit && AccountType(counter.Type) != AccountTypeFunding:
		return reject(CodeFailedPrecondition, ReasonAccountTypeMismatch, "funding_account_id must be a FUNDING account")
	}
	if Status(debit.Status) != StatusActive {
		return reject(CodeFailedPrecondition, ReasonAccountNotActive, "account %s does not accept debits", debit.ID)
	}
	if Status(credit.Status) == StatusClosed {
		return reject(CodeFailedPrecondition, ReasonAccountNotActive, "account %s is closed", credit.ID)
	}
	if debit.Balance < math.MinInt64+r.Amount {
		return reject(CodeOutOfRange, ReasonBalanceOverflow, "debit would overflow the balance of %s", debit.ID)
	}
	debitAfter := debit.Balance - r.Amount
	if credit.Balance > math.MaxInt64-r.Amount || credit.Balance+r.Amount > math.MaxInt64-credit.CreditLimit {
		return reject(CodeOutOfRange, ReasonBalanceOverflow, "credit would overflow the balance of %s", credit.ID)
	}
	creditAfter := credit.Balance + r.Amount
	if Floor(debit.Floor) == FloorNonNegative && debitAfter < -debit.CreditLimit {
		return reject(CodeFailedPrecondition, ReasonInsufficientFunds,
			"insufficient funds: available %d, amount %d", debit.Balance+debit.CreditLimit, r.Amount)
	}

	// Entries are never dated before the account's previous entry, even if
	// the database clock steps back.
	at := now
	for _, a := range []*store.Account{debit, credit} {
		if a.LastEntryAt != nil && a.LastEntryAt.After(at) {
			at = *a.LastEntryAt
		}
	}
	id, err := uuid.NewV7()
	if err != nil {
		return TransferResult{}, nil, fromStore(err)
	}
	tr := store.Transfer{
		ID: id, Scope: r.Scope, Key: r.IdempotencyKey, Kind: int16(r.Kind),
		DebitAccountID: debit.ID, CreditAccountID: credit.ID, Amount: r.Amount, Currency: debit.Currency,
		Description: r.Description, Metadata: r.Metadata, CreatedAt: at,
		CreatedByClient: r.CreatedByClient, CreatedByKey: r.CreatedByKey,
	}
	before := [2]store.Account{*debit, *credit}
	var entries [2]store.Entry
	for i, side := range []struct {
		a     *store.Account
		amt   int64
		after int64
	}{{debit, -r.Amount, debitAfter}, {credit, r.Amount, creditAfter}} {
		entries[i] = store.Entry{
			TransferID: id, AccountID: side.a.ID, Sequence: side.a.LastSequence + 1, Amount: side.amt,
			BalanceAfter: side.after, VersionAfter: side.a.Version + 1, CreatedAt: at,
		}
		side.a.Balance, side.a.Version, side.a.LastSequence = side.after, side.a.Version+1, side.a.LastSequence+1
		atCopy := at
		side.a.LastEntryAt = &atCopy
	}
	assertPosting(tr, entries, before)
	w.Transfers = append(w.Transfers, tr)
	w.Entries = append(w.Entries, entries[:]...)
	w.Keys = append(w.Keys, store.KeyRecord{
		Scope: r.Scope, Key: r.IdempotencyKey, Fingerprint: fp, Kind: int16(r.Kind),
		TransferID: uuid.NullUUID{UUID: id, Valid: true}, AccountID: r.AccountID,
	})
	named := entries[0]
	if entries[1].AccountID == r.AccountID {
		named = entries[1]
	}
	return TransferResult{
		Transfer: toTransfer(tr),
		Balance: Balance{
			AccountID: r.AccountID, Currency: primary.Currency, Balance: named.BalanceAfter, CreditLimit: primary.CreditLimit,
			Available: available(Floor(primary.Floor), named.BalanceAfter, primary.CreditLimit), Version: named.VersionAfter,
			Source: SourceStore, AsOf: at,
		},
	}, nil, nil
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
// named account's balance as of that transfer, or the same rejection.
func (l *Ledger) replay(ctx context.Context, r MoveRequest, k *store.KeyRecord) (TransferResult, error) {
	if !k.TransferID.Valid {
		return TransferResult{}, storedRejection(*k)
	}
	t, err := l.st.GetTransfer(ctx, k.TransferID.UUID)
	if err != nil {
		return TransferResult{}, fromStore(err)
	}
	e, err := l.st.GetEntry(ctx, t.ID, r.AccountID)
	if err != nil {
		return TransferResult{}, fromStore(err)
	}
	a, err := l.st.GetAccount(ctx, r.AccountID)
	if err != nil {
		return TransferResult{}, fromStore(err)
	}
	return TransferResult{
		Transfer: toTransfer(t),
		Balance: Balance{
			AccountID: r.AccountID, Currency: a.Currency, Balance: e.BalanceAfter, CreditLimit: a.CreditLimit,
			Available: available(Floor(a.Floor), e.BalanceAfter, a.CreditLimit), Version: e.VersionAfter,
			Source: SourceStore, AsOf: e.CreatedAt,
		},
		Replayed: true,
	}, nil
}

func timeKey(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339Nano)
}
