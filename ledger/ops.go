package ledger

import (
	"fmt"
	"math"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// work is one transaction's working copy of everything it locked. Items are
// decided one after another against it, so each sees the effects of the ones
// before it, exactly as if they had run one by one.
type work struct {
	accts  map[uuid.UUID]*store.Account
	system map[string]map[string]uuid.UUID
	// alias maps a sharded account a posting names to the shard this batch
	// posts to; shardsOf are the shards of accounts whose lifecycle an item
	// may change (lockPlan).
	alias    map[uuid.UUID]uuid.UUID
	shardsOf map[uuid.UUID][]uuid.UUID
	now      time.Time
	holds    map[uuid.UUID]*store.Hold
	charges  map[uuid.UUID]store.Transfer
	refunded map[uuid.UUID]int64 // charge → refunded so far (working)
	// holdsChanged are accounts whose set of open holds changed, so their
	// next_hold_expiry must be recomputed, and nextExpiry an early bound of
	// it (for the cache): never later than the true next expiry.
	holdsChanged map[uuid.UUID]bool
	nextExpiry   map[uuid.UUID]*time.Time
	// metaChanged are accounts whose metadata an UpdateAccount replaced.
	metaChanged map[uuid.UUID]bool
	// lowBalance are the threshold crossings decided so far, for the feed.
	lowBalance []LowBalanceEvent
	w          store.BatchWrite
}

func newWork(locked store.BatchLocked, p *lockPlan) *work {
	wk := &work{
		accts:        make(map[uuid.UUID]*store.Account, len(locked.Accounts)),
		system:       p.system,
		alias:        p.alias,
		shardsOf:     p.shardsOf,
		now:          locked.Now,
		holds:        make(map[uuid.UUID]*store.Hold, len(locked.Holds)),
		charges:      locked.Charges,
		refunded:     map[uuid.UUID]int64{},
		holdsChanged: map[uuid.UUID]bool{},
		nextExpiry:   map[uuid.UUID]*time.Time{},
	}
	for id, a := range locked.Accounts {
		a := a
		wk.accts[id] = &a
		wk.nextExpiry[id] = a.NextHoldExpiry
	}
	for id, h := range locked.Holds {
		h := h
		wk.holds[id] = &h
	}
	for id, c := range locked.Charges {
		wk.refunded[id] = c.Refunded
	}
	return wk
}

// writeDownExpiries records the expiry of every hold that is stored as open
// but whose expires_at has passed by the transaction's clock. Reads already
// treated them as expired; this makes the stored state agree, and advances
// the account's version once.
func (wk *work) writeDownExpiries() {
	bumped := map[uuid.UUID]bool{}
	for _, h := range wk.holds {
		if h.Status != store.HoldOpen || h.ExpiresAt.After(wk.now) {
			continue
		}
		a, ok := wk.accts[h.AccountID]
		if !ok {
			panic(fmt.Sprintf("ledger: hold %s of an unlocked account %s", h.ID, h.AccountID))
		}
		wk.finalizeHold(a, h, store.HoldExpired, 0, uuid.Nil, h.ExpiresAt)
		if !bumped[a.ID] {
			a.Version++
			bumped[a.ID] = true
		}
	}
}

func (wk *work) finalizeHold(a *store.Account, h *store.Hold, status int16, captured int64, transfer uuid.UUID, at time.Time) {
	if h.Status != store.HoldOpen || a.Held < h.Amount {
		panic(fmt.Sprintf("ledger: finalizing hold %+v on account held %d", h, a.Held))
	}
	a.Held -= h.Amount
	h.Status, h.CapturedAmount, h.CaptureTransferID = status, captured, transfer
	fin := at
	h.FinalizedAt = &fin
	wk.holdsChanged[a.ID] = true
	wk.w.HoldChanges = append(wk.w.HoldChanges, store.HoldChange{
		HoldID: h.ID, Status: status, CapturedAmount: captured, CaptureTransferID: transfer, FinalizedAt: fin,
	})
}

// spendable is what an account may still debit or hold: unbounded without
// a floor.
func spendable(a *store.Account) int64 {
	if Floor(a.Floor) == FloorNone {
		return math.MaxInt64
	}
	return availableOf(a)
}

// availableOf is the available amount shown to callers.
func availableOf(a *store.Account) int64 {
	return available(Floor(a.Floor), a.Balance, a.Held, a.CreditLimit)
}

// crossed reports whether a change of account a's available amount from
// before to its current value crossed its low-balance threshold downward.
func crossed(a *store.Account, before int64) bool {
	if a.LowBalanceThreshold == nil {
		return false
	}
	t := *a.LowBalanceThreshold
	return before >= t && availableOf(a) < t
}

func (wk *work) entryTime(as ...*store.Account) time.Time {
	// Entries are never dated before an account's previous entry, even if
	// the database clock steps back.
	at := wk.now
	for _, a := range as {
		if a.LastEntryAt != nil && a.LastEntryAt.After(at) {
			at = *a.LastEntryAt
		}
	}
	return at
}

func (wk *work) balanceOf(a *store.Account, at time.Time) Balance {
	return Balance{
		AccountID: a.ID, Currency: a.Currency, Balance: a.Balance, CreditLimit: a.CreditLimit,
		Available: availableOf(a), Held: a.Held, Version: a.Version, Source: SourceStore, AsOf: at, Final: true,
	}
}

// post appends a two-entry posting of amount from debit to credit.
func (wk *work) post(r MoveRequest, kind Kind, debit, credit *store.Account, amount int64,
	refundOf, holdID uuid.UUID) (store.Transfer, [2]store.Entry, error) {
	at := wk.entryTime(debit, credit)
	id, err := uuid.NewV7()
	if err != nil {
		return store.Transfer{}, [2]store.Entry{}, fromStore(err)
	}
	tr := store.Transfer{
		ID: id, Scope: r.Scope, Key: r.IdempotencyKey, Kind: int16(kind),
		DebitAccountID: debit.ID, CreditAccountID: credit.ID, Amount: amount, Currency: debit.Currency,
		Description: r.Description, Metadata: r.Metadata, CreatedAt: at,
		CreatedByClient: r.CreatedByClient, CreatedByKey: r.CreatedByKey, RefundOf: refundOf, HoldID: holdID,
		DebitAccountType: debit.Type, CreditAccountType: credit.Type,
		DebitShardOf: debit.ShardOf, CreditShardOf: credit.ShardOf,
	}
	before := [2]store.Account{*debit, *credit}
	var entries [2]store.Entry
	for i, side := range []struct {
		a   *store.Account
		amt int64
	}{{debit, -amount}, {credit, amount}} {
		after := side.a.Balance + side.amt
		entries[i] = store.Entry{
			TransferID: id, AccountID: side.a.ID, Sequence: side.a.LastSequence + 1, Amount: side.amt,
			BalanceAfter: after, VersionAfter: side.a.Version + 1, CreatedAt: at,
		}
		side.a.Balance, side.a.Version, side.a.LastSequence = after, side.a.Version+1, side.a.LastSequence+1
		atCopy := at
		side.a.LastEntryAt = &atCopy
	}
	assertPosting(tr, entries, before)
	assertFloor(debit)
	wk.w.Entries = append(wk.w.Entries, entries[:]...)
	return tr, entries, nil
}

// assertFloor checks the floor with holds after a change. Callers check it
// first and reject; reaching a violation here is a bug.
func assertFloor(a *store.Account) {
	if a.Held < 0 || (Floor(a.Floor) == FloorNonNegative && a.Balance < a.Held-a.CreditLimit) ||
		(Floor(a.Floor) == FloorNone && a.Held != 0) {
		panic(fmt.Sprintf("ledger: account %s breaks its floor: balance %d held %d credit_limit %d",
			a.ID, a.Balance, a.Held, a.CreditLimit))
	}
}

// checkOverflow rejects a posting that would take either balance out of range.
func checkOverflow(debit, credit *store.Account, amount int64) *Error {
	low, high := int64(math.MinInt64), int64(math.MaxInt64)
	if debit.Sharded() {
		low = -store.ShardBalanceMax
	}
	if credit.Sharded() {
		high = store.ShardBalanceMax
	}
	if debit.Balance < low+amount {
		return rejection(CodeOutOfRange, ReasonBalanceOverflow, "debit would overflow the balance of %s", debit.ID)
	}
	if credit.Balance > high-amount || credit.Balance+amount > math.MaxInt64-credit.CreditLimit {
		return rejection(CodeOutOfRange, ReasonBalanceOverflow, "credit would overflow the balance of %s", credit.ID)
	}
	return nil
}

// decide applies the rules of money to one item against the working copy,
// and appends what it writes to wk.w. It returns the result, or a business
// rejection (recorded under the key), or an error that records nothing
// (NOT_FOUND, INVALID_ARGUMENT).
func (l *Ledger) decide(r MoveRequest, fp []byte, wk *work) (TransferResult, *Error, error) {
	var (
		res TransferResult
		rej *Error
		err error
	)
	switch r.Kind {
	case KindCharge, KindCredit, KindTransfer:
		res, rej, err = l.decideMove(r, wk)
	case KindRefund:
		res, rej, err = l.decideRefund(r, wk)
	case KindHold:
		res, rej, err = l.decideHold(r, wk)
	case KindCapture, KindRelease:
		res, rej, err = l.decideFinalize(r, wk)
	case KindFreeze, KindUnfreeze, KindClose, KindUpdate, KindExpire:
		return l.decideAccount(r, wk)
	default:
		panic(fmt.Sprintf("ledger: unknown operation kind %d", r.Kind))
	}
	if err != nil {
		return TransferResult{}, nil, err
	}
	if rej != nil {
		wk.w.Keys = append(wk.w.Keys, rejectionRecord(r, fp, rej))
		return TransferResult{}, rej, nil
	}
	k := store.KeyRecord{
		Scope: r.Scope, Key: r.IdempotencyKey, Fingerprint: fp, Kind: int16(r.Kind), AccountID: res.Balance.AccountID,
	}
	if res.Transfer.ID != uuid.Nil {
		k.TransferID = uuid.NullUUID{UUID: res.Transfer.ID, Valid: true}
	}
	if res.Hold != nil {
		k.HoldID = uuid.NullUUID{UUID: res.Hold.ID, Valid: true}
	}
	if !k.TransferID.Valid && !k.HoldID.Valid {
		panic("ledger: a successful operation produced neither a transfer nor a hold")
	}
	wk.w.Keys = append(wk.w.Keys, k)
	return res, nil, nil
}

// moveTypes applies the account-type rules of Charge, Credit and Transfer
// to every caller: only a CUSTOMER account is charged (to a REVENUE
// account) or credited (from a FUNDING account). Transfer is admin's and
// may move money between accounts of any types.
func moveTypes(k Kind, primary, counter *store.Account) *Error {
	switch k {
	case KindCharge:
		if e := wantType(primary, AccountTypeCustomer, "only a CUSTOMER account can be charged"); e != nil {
			return e
		}
		return wantType(counter, AccountTypeRevenue, "revenue_account_id must be a REVENUE account")
	case KindCredit:
		if e := wantType(primary, AccountTypeCustomer, "only a CUSTOMER account can be credited"); e != nil {
			return e
		}
		return wantType(counter, AccountTypeFunding, "funding_account_id must be a FUNDING account")
	}
	return nil
}

// wantType rejects an account that is not of type t.
func wantType(a *store.Account, t AccountType, msg string) *Error {
	if AccountType(a.Type) == t {
		return nil
	}
	return rejection(CodeFailedPrecondition, ReasonAccountTypeMismatch, "%s (account %s is %s)", msg, a.ID, AccountType(a.Type))
}

// selfPosting refuses a posting whose two sides are one account. It is
// INVALID_ARGUMENT and records nothing, like the same id named twice.
func selfPosting(id uuid.UUID) *Error {
	return &Error{Code: CodeInvalid, Reason: ReasonSelfPosting, Field: "account_id",
		Message: fmt.Sprintf("account %s would be both the debit and the credit side", id)}
}

func (wk *work) account(id uuid.UUID) (*store.Account, *Error) {
	a, ok := wk.accts[id]
	if !ok {
		return nil, rejection(CodeNotFound, ReasonAccountNotFound, "account %s not found", id)
	}
	return a, nil
}

// posting returns the row a posting to account id changes: the account, or
// the shard of it this batch posts to. Naming a shard itself is refused:
// callers name the account.
func (wk *work) posting(id uuid.UUID) (*store.Account, *Error) {
	if s, ok := wk.alias[id]; ok {
		a, ok := wk.accts[s]
		if !ok {
			panic(fmt.Sprintf("ledger: shard %s of %s was not locked", s, id))
		}
		return a, nil
	}
	a, nf := wk.account(id)
	if nf != nil {
		return nil, nf
	}
	if a.ShardOf != uuid.Nil {
		return nil, shardNamed(a)
	}
	return a, nil
}

func shardNamed(a *store.Account) *Error {
	return rejection(CodeFailedPrecondition, ReasonShardAccount,
		"account %s is a shard of account %s: name that account", a.ID, a.ShardOf)
}

func (wk *work) systemAccount(currency, role string) (*store.Account, error) {
	id, ok := wk.system[currency][role]
	if !ok {
		return nil, &systemMissingError{currency: currency}
	}
	a, ok := wk.accts[id]
	if !ok {
		panic(fmt.Sprintf("ledger: system account %s was not locked", id))
	}
	return a, nil
}

func (l *Ledger) decideMove(r MoveRequest, wk *work) (TransferResult, *Error, error) {
	primary, nf := wk.posting(r.AccountID)
	if nf != nil {
		return TransferResult{}, nil, nf
	}
	var counter *store.Account
	if r.Counterparty != uuid.Nil {
		if counter, nf = wk.posting(r.Counterparty); nf != nil {
			return TransferResult{}, nil, nf
		}
	} else {
		role := store.SystemRoleRevenue
		if r.Kind == KindCredit {
			role = store.SystemRoleFunding
		}
		var err error
		if counter, err = wk.systemAccount(primary.Currency, role); err != nil {
			return TransferResult{}, nil, err
		}
	}
	debit, credit := primary, counter
	if r.Kind == KindCredit {
		debit, credit = counter, primary
	}
	if debit.ID == credit.ID {
		// Only through a default system account: validateMove refused the
		// same id named twice. Nothing is written and the key stays unused.
		return TransferResult{}, nil, selfPosting(debit.ID)
	}
	if debit.Currency != credit.Currency {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonCurrencyMismatch,
			"accounts have different currencies (%s, %s)", debit.Currency, credit.Currency), nil
	}
	if e := moveTypes(r.Kind, primary, counter); e != nil {
		return TransferResult{}, e, nil
	}
	if Status(debit.Status) != StatusActive {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s does not accept debits", debit.ID), nil
	}
	if Status(credit.Status) == StatusClosed {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s is closed", credit.ID), nil
	}
	if e := checkOverflow(debit, credit, r.Amount); e != nil {
		return TransferResult{}, e, nil
	}
	if sp := spendable(debit); r.Amount > sp {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonInsufficientFunds,
			"insufficient funds: available %d, amount %d", sp, r.Amount), nil
	}
	debitBefore := availableOf(debit)
	tr, entries, err := wk.post(r, r.Kind, debit, credit, r.Amount, uuid.Nil, uuid.Nil)
	if err != nil {
		return TransferResult{}, nil, err
	}
	tr.ThresholdCrossed = crossed(debit, debitBefore)
	if tr.ThresholdCrossed {
		wk.lowBalance = append(wk.lowBalance, LowBalanceEvent{AccountID: debit.ID, TransferID: tr.ID,
			Available: availableOf(debit), Threshold: *debit.LowBalanceThreshold, CreatedAt: tr.CreatedAt})
	}
	wk.w.Transfers = append(wk.w.Transfers, tr)
	res := TransferResult{Transfer: toTransfer(tr), Balance: wk.balanceOf(primary, entries[0].CreatedAt)}
	res.ThresholdCrossed = tr.ThresholdCrossed && debit == primary
	return res, nil, nil
}

func (l *Ledger) decideRefund(r MoveRequest, wk *work) (TransferResult, *Error, error) {
	charge, ok := wk.charges[r.ChargeID]
	if !ok || (r.Restrict.OwnObjects && charge.CreatedByClient != r.CreatedByClient) {
		return TransferResult{}, nil, rejection(CodeNotFound, ReasonTransferNotFound, "transfer %s not found", r.ChargeID)
	}
	if Kind(charge.Kind) != KindCharge {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonNotACharge, "transfer %s is not a CHARGE", r.ChargeID), nil
	}
	customer, revenue := wk.accts[charge.DebitAccountID], wk.accts[charge.CreditAccountID]
	if customer == nil || revenue == nil {
		panic(fmt.Sprintf("ledger: accounts of charge %s were not locked", charge.ID))
	}
	// A charge stored before the account-type rules may have debited a
	// system account: refunds go back to customers only.
	if e := wantType(customer, AccountTypeCustomer, "only a CUSTOMER account can be refunded to"); e != nil {
		return TransferResult{}, e, nil
	}
	if e := wantType(revenue, AccountTypeRevenue, "only a charge credited to a REVENUE account can be refunded"); e != nil {
		return TransferResult{}, e, nil
	}
	remaining := charge.Amount - wk.refunded[charge.ID]
	amount := r.Amount
	if amount == 0 {
		amount = remaining
	}
	if amount <= 0 || amount > remaining {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonRefundExceedsCharge,
			"refund of %d exceeds what remains refundable of charge %s (%d of %d)", r.Amount, charge.ID, remaining, charge.Amount), nil
	}
	// The revenue account gives the money back; a frozen customer account
	// still receives it, a closed one receives nothing.
	if Status(revenue.Status) != StatusActive {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s does not accept debits", revenue.ID), nil
	}
	if Status(customer.Status) == StatusClosed {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s is closed", customer.ID), nil
	}
	if e := checkOverflow(revenue, customer, amount); e != nil {
		return TransferResult{}, e, nil
	}
	if sp := spendable(revenue); amount > sp {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonInsufficientFunds,
			"insufficient funds on %s: available %d, amount %d", revenue.ID, sp, amount), nil
	}
	tr, entries, err := wk.post(r, KindRefund, revenue, customer, amount, charge.ID, uuid.Nil)
	if err != nil {
		return TransferResult{}, nil, err
	}
	wk.refunded[charge.ID] += amount
	if wk.refunded[charge.ID] > charge.Amount {
		panic(fmt.Sprintf("ledger: refunds of %s exceed it", charge.ID))
	}
	wk.addRefund(charge, amount)
	wk.w.Transfers = append(wk.w.Transfers, tr)
	return TransferResult{Transfer: toTransfer(tr), Balance: wk.balanceOf(customer, entries[1].CreatedAt)}, nil, nil
}

// addRefund adds to the batch's one refund-total row for the charge (an
// upsert may touch a row only once per statement).
func (wk *work) addRefund(charge store.Transfer, amount int64) {
	for i := range wk.w.Refunds {
		if wk.w.Refunds[i].ChargeID == charge.ID {
			wk.w.Refunds[i].Amount += amount
			return
		}
	}
	wk.w.Refunds = append(wk.w.Refunds, store.RefundAdd{ChargeID: charge.ID, ChargeAmount: charge.Amount, Amount: amount})
}

func (l *Ledger) decideHold(r MoveRequest, wk *work) (TransferResult, *Error, error) {
	a, nf := wk.account(r.AccountID)
	if nf != nil {
		return TransferResult{}, nil, nf
	}
	if e := wantType(a, AccountTypeCustomer, "only a CUSTOMER account can be held"); e != nil {
		return TransferResult{}, e, nil
	}
	if r.Counterparty != uuid.Nil {
		rev, nf := wk.account(r.Counterparty)
		if nf != nil {
			return TransferResult{}, nil, nf
		}
		if rev.ShardOf != uuid.Nil {
			return TransferResult{}, shardNamed(rev), nil
		}
		if AccountType(rev.Type) != AccountTypeRevenue {
			return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountTypeMismatch, "revenue_account_id must be a REVENUE account"), nil
		}
		if rev.Currency != a.Currency {
			return TransferResult{}, rejection(CodeFailedPrecondition, ReasonCurrencyMismatch,
				"accounts have different currencies (%s, %s)", a.Currency, rev.Currency), nil
		}
	}
	if Floor(a.Floor) != FloorNonNegative {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonHoldNotAllowed,
			"holds need a FLOOR_NON_NEGATIVE account"), nil
	}
	if Status(a.Status) != StatusActive {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s does not accept holds", a.ID), nil
	}
	expires := wk.now.Add(l.limits.HoldExpiryDefault)
	switch {
	case r.ExpiresAt != nil:
		expires = *r.ExpiresAt
	case r.ExpiresIn > 0:
		expires = wk.now.Add(r.ExpiresIn)
	}
	if !expires.After(wk.now) {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonHoldExpired, "expires_at is not in the future"), nil
	}
	if expires.Sub(wk.now) > l.limits.HoldExpiryMax {
		return TransferResult{}, nil, invalid("expires_at", "a hold may last at most %s", l.limits.HoldExpiryMax)
	}
	if sp := spendable(a); r.Amount > sp {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonInsufficientFunds,
			"insufficient funds: available %d, amount %d", sp, r.Amount), nil
	}
	id, err := uuid.NewV7()
	if err != nil {
		return TransferResult{}, nil, fromStore(err)
	}
	before := availableOf(a)
	h := store.Hold{
		ID: id, Scope: r.Scope, Key: r.IdempotencyKey, AccountID: a.ID, RevenueAccountID: r.Counterparty,
		Amount: r.Amount, Currency: a.Currency, Status: store.HoldOpen, ExpiresAt: expires,
		Description: r.Description, Metadata: r.Metadata, CreatedAt: wk.now,
		CreatedByClient: r.CreatedByClient, CreatedByKey: r.CreatedByKey, AccountType: a.Type,
	}
	if r.Counterparty != uuid.Nil {
		h.RevenueAccountType = wk.accts[r.Counterparty].Type
	}
	a.Held += r.Amount
	a.Version++
	assertFloor(a)
	wk.holdsChanged[a.ID] = true
	if ne := wk.nextExpiry[a.ID]; ne == nil || expires.Before(*ne) {
		e := expires
		wk.nextExpiry[a.ID] = &e
	}
	wk.holds[id] = &h
	wk.w.Holds = append(wk.w.Holds, h)
	hold := toHold(h, wk.now)
	x := crossed(a, before)
	if x {
		wk.lowBalance = append(wk.lowBalance, LowBalanceEvent{AccountID: a.ID, HoldID: h.ID,
			Available: availableOf(a), Threshold: *a.LowBalanceThreshold, CreatedAt: wk.now})
	}
	return TransferResult{Hold: &hold, Balance: wk.balanceOf(a, wk.now), ThresholdCrossed: x}, nil, nil
}

func (l *Ledger) decideFinalize(r MoveRequest, wk *work) (TransferResult, *Error, error) {
	h, ok := wk.holds[r.HoldID]
	if !ok || (r.Restrict.OwnObjects && h.CreatedByClient != r.CreatedByClient) {
		return TransferResult{}, nil, rejection(CodeNotFound, ReasonHoldNotFound, "hold %s not found", r.HoldID)
	}
	a := wk.accts[h.AccountID]
	if a == nil {
		panic(fmt.Sprintf("ledger: account of hold %s was not locked", h.ID))
	}
	switch h.Status {
	case store.HoldOpen:
	case store.HoldExpired:
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonHoldExpired, "hold %s expired at %s",
			h.ID, h.ExpiresAt.UTC().Format(time.RFC3339Nano)), nil
	default:
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonHoldFinalized, "hold %s was already %s",
			h.ID, HoldStatus(h.Status)), nil
	}
	if !h.ExpiresAt.After(wk.now) {
		panic(fmt.Sprintf("ledger: hold %s past its expiry was not written down", h.ID))
	}
	if r.Kind == KindRelease {
		wk.finalizeHold(a, h, store.HoldReleased, 0, uuid.Nil, wk.now)
		a.Version++
		hold := toHold(*h, wk.now)
		return TransferResult{Hold: &hold, Balance: wk.balanceOf(a, wk.now)}, nil, nil
	}
	amount := r.Amount
	if amount == 0 {
		amount = h.Amount
	}
	if amount > h.Amount {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonHoldAmountExceeded,
			"capture of %d exceeds the held %d", amount, h.Amount), nil
	}
	if Status(a.Status) != StatusActive {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s does not accept debits", a.ID), nil
	}
	if e := wantType(a, AccountTypeCustomer, "only a CUSTOMER account can be captured from"); e != nil {
		return TransferResult{}, e, nil
	}
	var revenue *store.Account
	if h.RevenueAccountID != uuid.Nil {
		rev := h.RevenueAccountID
		if s, ok := wk.alias[rev]; ok {
			rev = s // the shard this batch posts to
		}
		revenue = wk.accts[rev]
		if revenue == nil {
			panic(fmt.Sprintf("ledger: revenue account of hold %s was not locked", h.ID))
		}
	} else {
		var err error
		if revenue, err = wk.systemAccount(a.Currency, store.SystemRoleRevenue); err != nil {
			return TransferResult{}, nil, err
		}
	}
	if revenue.ID == a.ID {
		return TransferResult{}, nil, selfPosting(a.ID)
	}
	if e := wantType(revenue, AccountTypeRevenue, "a capture is credited to a REVENUE account only"); e != nil {
		return TransferResult{}, e, nil
	}
	if Status(revenue.Status) == StatusClosed {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotActive, "account %s is closed", revenue.ID), nil
	}
	if e := checkOverflow(a, revenue, amount); e != nil {
		return TransferResult{}, e, nil
	}
	// Release the whole hold first, then charge what was used: the charge
	// always fits, since it spends at most what the hold reserved.
	rq := r
	rq.Description, rq.Metadata = h.Description, h.Metadata
	if r.Description != "" {
		rq.Description = r.Description
	}
	if len(r.Metadata) > 0 {
		rq.Metadata = r.Metadata
	}
	// The posting is checked against the account with the hold released;
	// finalizeHold then releases it for good.
	a.Held -= h.Amount
	tr, entries, err := wk.post(rq, KindCharge, a, revenue, amount, uuid.Nil, h.ID)
	a.Held += h.Amount
	if err != nil {
		return TransferResult{}, nil, err
	}
	wk.finalizeHold(a, h, store.HoldCaptured, amount, tr.ID, tr.CreatedAt)
	wk.w.Transfers = append(wk.w.Transfers, tr)
	hold := toHold(*h, wk.now)
	return TransferResult{Transfer: toTransfer(tr), Hold: &hold, Balance: wk.balanceOf(a, entries[0].CreatedAt)}, nil, nil
}

// decideAccount applies a lifecycle change. These carry no idempotency key:
// freezing a frozen account (or closing a closed one) succeeds and changes
// nothing, and an update is a plain overwrite.
func (l *Ledger) decideAccount(r MoveRequest, wk *work) (TransferResult, *Error, error) {
	a, nf := wk.account(r.AccountID)
	if nf != nil {
		return TransferResult{}, nil, nf
	}
	result := func() (TransferResult, *Error, error) {
		sum := wk.summed(a)
		acct := toAccount(sum)
		return TransferResult{Account: &acct, Balance: wk.balanceOf(&sum, wk.now)}, nil, nil
	}
	if r.Kind == KindExpire {
		return result()
	}
	if a.ShardOf != uuid.Nil {
		return TransferResult{}, shardNamed(a), nil
	}
	if r.Restrict.CustomerAccounts && AccountType(a.Type) != AccountTypeCustomer {
		return TransferResult{}, nil, rejection(CodePermissionDenied, ReasonPermissionDenied,
			"only admin may change a %s account", AccountType(a.Type))
	}
	status := Status(a.Status)
	if status == StatusClosed && r.Kind != KindClose {
		return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountClosed, "account %s is closed", a.ID), nil
	}
	before := accountState(a)
	action := ""
	switch r.Kind {
	case KindFreeze:
		if status == StatusFrozen {
			return result()
		}
		a.Status, action = int16(StatusFrozen), "freeze"
	case KindUnfreeze:
		if status == StatusActive {
			return result()
		}
		a.Status, action = int16(StatusActive), "unfreeze"
	case KindClose:
		if status == StatusClosed {
			return result()
		}
		if a.SystemRole != "" {
			return TransferResult{}, rejection(CodeFailedPrecondition, ReasonSystemAccount, "a default system account cannot be closed"), nil
		}
		if sum := wk.summed(a); sum.Balance != 0 || sum.Held != 0 {
			return TransferResult{}, rejection(CodeFailedPrecondition, ReasonAccountNotEmpty,
				"account %s has balance %d and held %d; only an empty account can be closed", a.ID, sum.Balance, sum.Held), nil
		}
		a.Status, action = int16(StatusClosed), "close"
	case KindUpdate:
		action = "update"
		if r.NewCreditLimit != nil {
			cl := *r.NewCreditLimit
			if cl != 0 && Floor(a.Floor) == FloorNone {
				return TransferResult{}, nil, invalid("credit_limit", "credit_limit only applies to FLOOR_NON_NEGATIVE accounts")
			}
			if Floor(a.Floor) == FloorNonNegative && a.Balance < a.Held-cl {
				return TransferResult{}, rejection(CodeFailedPrecondition, ReasonCreditLimitInUse,
					"credit_limit %d is below what is already used (balance %d, held %d)", cl, a.Balance, a.Held), nil
			}
			if a.Balance > 0 && cl > math.MaxInt64-a.Balance {
				// available = balance - held + credit_limit must stay an int64
				// (the accounts_available_range CHECK).
				return TransferResult{}, rejection(CodeOutOfRange, ReasonBalanceOverflow,
					"credit_limit %d with balance %d would overflow the available amount", cl, a.Balance), nil
			}
			a.CreditLimit = cl
		}
		if r.NewMetadata != nil {
			a.Metadata = r.NewMetadata
			if wk.metaChanged == nil {
				wk.metaChanged = map[uuid.UUID]bool{}
			}
			wk.metaChanged[a.ID] = true
		}
		switch {
		case r.ClearThreshold:
			a.LowBalanceThreshold = nil
		case r.NewThreshold != nil:
			t := *r.NewThreshold
			a.LowBalanceThreshold = &t
		}
	default:
		panic(fmt.Sprintf("ledger: not an account operation: %d", r.Kind))
	}
	a.Version++
	assertFloor(a)
	wk.propagateStatus(a)
	wk.w.Changes = append(wk.w.Changes, store.AccountChange{
		AccountID: a.ID, Action: action, VersionAfter: a.Version, Before: before, After: accountState(a),
		CreatedByClient: r.CreatedByClient, CreatedByKey: r.CreatedByKey, CreatedAt: wk.now, Reason: r.Reason,
	})
	return result()
}

// summed is account a as callers see it: for an account with shards, the
// balance and version are the sums over its shards (all locked).
func (wk *work) summed(a *store.Account) store.Account {
	sum := *a
	for _, id := range wk.shardsOf[a.ID] {
		if id == a.ID {
			continue
		}
		s := wk.accts[id]
		if s == nil {
			panic(fmt.Sprintf("ledger: shard %s of %s was not locked", id, a.ID))
		}
		sum.Balance += s.Balance
		sum.Version += s.Version
	}
	return sum
}

// propagateStatus gives every shard of a its status: a frozen or closed
// account is frozen or closed on every shard a batch may post to.
func (wk *work) propagateStatus(a *store.Account) {
	for _, id := range wk.shardsOf[a.ID] {
		s := wk.accts[id]
		if id == a.ID || s.Status == a.Status {
			continue
		}
		s.Status = a.Status
		s.Version++
	}
}

func accountState(a *store.Account) map[string]any {
	m := map[string]any{"status": Status(a.Status).String(), "credit_limit": a.CreditLimit, "metadata": a.Metadata}
	if a.LowBalanceThreshold != nil {
		m["low_balance_threshold"] = *a.LowBalanceThreshold
	}
	return m
}

// String names a status as the API does.
func (s Status) String() string {
	switch s {
	case StatusActive:
		return "ACTIVE"
	case StatusFrozen:
		return "FROZEN"
	case StatusClosed:
		return "CLOSED"
	}
	return fmt.Sprintf("STATUS_%d", int(s))
}

// String names an account type as the API does.
func (t AccountType) String() string {
	switch t {
	case AccountTypeCustomer:
		return "CUSTOMER"
	case AccountTypeRevenue:
		return "REVENUE"
	case AccountTypeFunding:
		return "FUNDING"
	}
	return fmt.Sprintf("ACCOUNT_TYPE_%d", int(t))
}

// String names a hold status as the API does.
func (s HoldStatus) String() string {
	switch s {
	case HoldOpen:
		return "OPEN"
	case HoldCaptured:
		return "CAPTURED"
	case HoldReleased:
		return "RELEASED"
	case HoldExpired:
		return "EXPIRED"
	}
	return fmt.Sprintf("HOLD_STATUS_%d", int(s))
}

// toHold converts a stored hold, reading an open hold past its expiry at
// now as EXPIRED (its expiry is decided by the clock, not by a write).
func toHold(h store.Hold, now time.Time) Hold {
	st := HoldStatus(h.Status)
	fin := h.FinalizedAt
	if st == HoldOpen && !h.ExpiresAt.After(now) {
		st = HoldExpired
		e := h.ExpiresAt
		fin = &e
	}
	return Hold{
		ID: h.ID, IdempotencyKey: h.Key, AccountID: h.AccountID, RevenueAccountID: h.RevenueAccountID,
		Amount: h.Amount, Currency: h.Currency, Status: st, ExpiresAt: h.ExpiresAt, CapturedAmount: h.CapturedAmount,
		CaptureTransferID: h.CaptureTransferID, Description: h.Description, Metadata: h.Metadata,
		CreatedAt: h.CreatedAt, FinalizedAt: fin, CreatedByClient: h.CreatedByClient, CreatedByKey: h.CreatedByKey,
	}
}
