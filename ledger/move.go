package ledger

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/store"
)

// errReplay leaves the transaction of a request whose key was already used;
// the stored outcome is then read outside it.
var errReplay = errors.New("ledger: replay")

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

// move runs one Charge, Credit or Transfer in one PostgreSQL transaction.
//
// Order inside the transaction: serialize on the key and read its outcome,
// lock both accounts (in id order), decide, then write either the posting or
// the rejection together with the key. The result is acknowledged only after
// COMMIT; the cache is updated after that, and its failure changes nothing.
func (l *Ledger) move(ctx context.Context, r MoveRequest) (TransferResult, error) {
	if err := l.validateMove(r); err != nil {
		return TransferResult{}, err
	}
	fp := fingerprint(r)
	for attempt := 0; ; attempt++ {
		res, err := l.moveOnce(ctx, r, fp)
		if errors.Is(err, errSystemAccountMissing) && attempt == 0 {
			a, gerr := l.st.GetAccount(ctx, r.AccountID)
			if gerr != nil {
				return TransferResult{}, fromStore(gerr)
			}
			if err := l.ensureSystemAccounts(ctx, a.Currency); err != nil {
				return TransferResult{}, err
			}
			continue
		}
		if errors.Is(err, errSystemAccountMissing) {
			return TransferResult{}, fromStore(fmt.Errorf("system account still missing: %w", store.ErrInternal))
		}
		return res, err
	}
}

type decided struct {
	posting   *store.Posting
	rejection *Error
	replay    *store.KeyRecord
	accounts  map[uuid.UUID]store.Account
}

func (l *Ledger) moveOnce(ctx context.Context, r MoveRequest, fp []byte) (TransferResult, error) {
	var d decided
	lock := store.PostLock{Scope: r.Scope, Key: r.IdempotencyKey, Primary: r.AccountID}
	if r.Counterparty != uuid.Nil {
		lock.Counterparty = uuid.NullUUID{UUID: r.Counterparty, Valid: true}
	} else if r.Kind == KindCharge {
		lock.SystemRole = store.SystemRoleRevenue
	} else {
		lock.SystemRole = store.SystemRoleFunding
	}
	err := l.st.InTx(ctx, func(tx *store.Tx) error {
		locked, err := tx.LockForPosting(ctx, lock)
		if err != nil {
			return err
		}
		if locked.Key != nil {
			if string(locked.Key.Fingerprint) != string(fp) || locked.Key.Kind != int16(r.Kind) {
				return rejection(CodeAlreadyExists, ReasonIdempotencyKeyReused,
					"idempotency key was already used for a different request")
			}
			d.replay = locked.Key
			return errReplay
		}
		d, err = l.decide(r, fp, locked)
		if err != nil {
			return err
		}
		if d.rejection != nil {
			return tx.WriteRejection(ctx, rejectionRecord(r, fp, d.rejection))
		}
		return tx.WritePosting(ctx, *d.posting)
	})
	switch {
	case errors.Is(err, errReplay):
		return l.replay(ctx, r, d.replay)
	case err != nil:
		return TransferResult{}, fromStore(err)
	case d.rejection != nil:
		return TransferResult{}, d.rejection
	}
	// Committed. Update the cache for both accounts; a failure here is
	// harmless (reads fall back to PostgreSQL, entries expire by TTL).
	p := d.posting
	for _, u := range p.Updates {
		a := d.accounts[u.AccountID]
		l.cachePut(ctx, cache.Balance{
			AccountID: u.AccountID, Currency: a.Currency, Balance: u.Balance, CreditLimit: a.CreditLimit,
			Available: available(Floor(a.Floor), u.Balance, a.CreditLimit), Version: u.Version, AsOf: u.LastEntryAt,
		})
	}
	primary := d.accounts[r.AccountID]
	var bal store.AccountUpdate
	for _, u := range p.Updates {
		if u.AccountID == r.AccountID {
			bal = u
		}
	}
	return TransferResult{
		Transfer: toTransfer(p.Transfer),
		Balance: Balance{
			AccountID: r.AccountID, Currency: primary.Currency, Balance: bal.Balance, CreditLimit: primary.CreditLimit,
			Available: available(Floor(primary.Floor), bal.Balance, primary.CreditLimit), Version: bal.Version,
			Source: SourceStore, AsOf: bal.LastEntryAt,
		},
	}, nil
}

// decide applies the rules of money to the locked accounts. It returns a
// posting to write, a business rejection to record, or an error that records
// nothing (NOT_FOUND).
func (l *Ledger) decide(r MoveRequest, fp []byte, locked store.Locked) (decided, error) {
	d := decided{accounts: make(map[uuid.UUID]store.Account, 2)}
	for _, a := range locked.Accounts {
		d.accounts[a.ID] = a
	}
	primary, ok := d.accounts[r.AccountID]
	if !ok {
		return d, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", r.AccountID)
	}
	var counter store.Account
	switch {
	case r.Counterparty != uuid.Nil:
		counter, ok = d.accounts[r.Counterparty]
		if !ok {
			return d, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", r.Counterparty)
		}
	default:
		for _, a := range locked.Accounts {
			if a.ID != r.AccountID {
				counter, ok = a, true
			}
		}
		if !ok {
			return d, errSystemAccountMissing
		}
	}
	if len(locked.Accounts) != 2 {
		panic(fmt.Sprintf("ledger: locked %d accounts for a two-account posting", len(locked.Accounts)))
	}

	debit, credit := primary, counter
	if r.Kind == KindCredit {
		debit, credit = counter, primary
	}
	reject := func(code Code, reason, format string, args ...any) (decided, error) {
		d.rejection = rejection(code, reason, format, args...)
		return d, nil
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
	at := locked.Now
	for _, a := range []store.Account{debit, credit} {
		if a.LastEntryAt != nil && a.LastEntryAt.After(at) {
			at = *a.LastEntryAt
		}
	}
	id, err := uuid.NewV7()
	if err != nil {
		return d, fromStore(err)
	}
	p := &store.Posting{
		Transfer: store.Transfer{
			ID: id, Scope: r.Scope, Key: r.IdempotencyKey, Kind: int16(r.Kind),
			DebitAccountID: debit.ID, CreditAccountID: credit.ID, Amount: r.Amount, Currency: debit.Currency,
			Description: r.Description, Metadata: r.Metadata, CreatedAt: at,
		},
		Key: store.KeyRecord{
			Scope: r.Scope, Key: r.IdempotencyKey, Fingerprint: fp, Kind: int16(r.Kind),
			TransferID: uuid.NullUUID{UUID: id, Valid: true}, AccountID: r.AccountID,
		},
	}
	for i, side := range []struct {
		a     store.Account
		amt   int64
		after int64
	}{{debit, -r.Amount, debitAfter}, {credit, r.Amount, creditAfter}} {
		p.Entries[i] = store.Entry{
			TransferID: id, AccountID: side.a.ID, Sequence: side.a.LastSequence + 1, Amount: side.amt,
			BalanceAfter: side.after, VersionAfter: side.a.Version + 1, CreatedAt: at,
		}
		p.Updates[i] = store.AccountUpdate{
			AccountID: side.a.ID, PrevVersion: side.a.Version, Balance: side.after, Version: side.a.Version + 1,
			LastSequence: side.a.LastSequence + 1, LastEntryAt: at,
		}
	}
	assertPosting(p)
	d.posting = p
	return d, nil
}

// assertPosting checks the double-entry invariants of a posting before it is
// written. A failure is a bug in decide: panic, so nothing is committed.
func assertPosting(p *store.Posting) {
	e0, e1 := p.Entries[0], p.Entries[1]
	if e0.Amount+e1.Amount != 0 || e0.Amount >= 0 || e1.Amount != p.Transfer.Amount {
		panic(fmt.Sprintf("ledger: unbalanced posting %+v", p.Entries))
	}
	if e0.AccountID == e1.AccountID {
		panic("ledger: posting to one account on both sides")
	}
	for i, e := range p.Entries {
		u := p.Updates[i]
		if e.Sequence < 1 || u.LastSequence != e.Sequence || u.Balance != e.BalanceAfter || u.Version != e.VersionAfter || u.Version != u.PrevVersion+1 {
			panic(fmt.Sprintf("ledger: entry and account update disagree: %+v %+v", e, u))
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
