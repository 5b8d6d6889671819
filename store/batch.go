package store

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// KeyRef names one idempotency key.
type KeyRef struct {
	Scope string
	Key   string
}

// BatchLock says what a group-committed batch needs locked. The ledger
// decides it (ledger.lockPlan); the store locks exactly what it is given.
type BatchLock struct {
	// Keys are the batch's idempotency keys (duplicates allowed).
	Keys []KeyRef
	// Accounts are every account row the batch may change, shards
	// included (duplicates allowed). They are locked in ascending id order.
	Accounts []uuid.UUID
	// Holds are holds the batch captures or releases, and Charges charges
	// it refunds: their rows (and refunded totals) are read after the
	// accounts they name were locked. Those accounts must be in Accounts.
	Holds   []uuid.UUID
	Charges []uuid.UUID
}

// BatchLocked is what LockBatch found, with every row locked.
type BatchLocked struct {
	// Keys holds the stored outcome of every key that was already used.
	Keys map[KeyRef]KeyRecord
	// Accounts holds the locked accounts by id.
	Accounts map[uuid.UUID]Account
	// Now is PostgreSQL's clock, read after the locks were granted.
	Now time.Time
	// Holds are the holds asked for plus every hold of a locked account
	// that is stored as open but expired at Now.
	Holds map[uuid.UUID]Hold
	// Charges are the charges asked for, with Refunded filled in.
	Charges map[uuid.UUID]Transfer
}

const holdCols = `hold_id, scope, idempotency_key, account_id, revenue_account_id, amount, currency, status,
	expires_at, captured_amount, capture_transfer_id, description, metadata, created_at, finalized_at,
	created_by_client, coalesce(created_by_key, '')`

// scanHold scans holdCols, then any extra columns into extra.
func scanHold(r rowScanner, extra ...any) (Hold, error) {
	var h Hold
	var rev, capture, by uuid.NullUUID
	var meta []byte
	err := r.Scan(append([]any{&h.ID, &h.Scope, &h.Key, &h.AccountID, &rev, &h.Amount, &h.Currency, &h.Status,
		&h.ExpiresAt, &h.CapturedAmount, &capture, &h.Description, &meta, &h.CreatedAt, &h.FinalizedAt,
		&by, &h.CreatedByKey}, extra...)...)
	if err != nil {
		return Hold{}, err
	}
	h.RevenueAccountID, h.CaptureTransferID, h.CreatedByClient = rev.UUID, capture.UUID, by.UUID
	h.Metadata, err = decodeMeta(meta)
	return h, err
}

// GetHold returns a hold by id.
func (s *Store) GetHold(ctx context.Context, id uuid.UUID) (Hold, error) {
	h, err := scanHold(s.pool.QueryRow(ctx, `SELECT `+holdCols+` FROM holds WHERE hold_id = $1`, id))
	return h, translate(err)
}

// LockBatch serializes on every key of the batch, reads their stored
// outcomes and locks exactly the accounts it is given, in one pipelined
// round trip (two when the batch touches holds or refunds, or a locked
// account has a hold past its expiry).
//
// Lock order is what keeps concurrent batches (in this and other tallyd
// processes) free of deadlocks: first all key locks, in ascending hash order;
// then all account rows, in ascending account_id order. A batch never waits
// for a key while holding a row, and never locks a row after reading holds
// or charges. Hold rows and refund totals are only changed while their
// account's row is locked, so they need no lock of their own.
func (t *Tx) LockBatch(ctx context.Context, l BatchLock) (BatchLocked, error) {
	scopes := make([]string, len(l.Keys))
	keys := make([]string, len(l.Keys))
	for i, k := range l.Keys {
		scopes[i], keys[i] = k.Scope, k.Key
	}
	b := &pgx.Batch{}
	b.Queue(`SELECT count(pg_advisory_xact_lock(h)) FROM (
		SELECT DISTINCT hashtextextended(length(s)::text || ':' || s || k, 0) AS h
		FROM unnest($1::text[], $2::text[]) AS t(s, k)
		ORDER BY h) x`, scopes, keys)
	// One primary-key probe per distinct key, whatever the table's size:
	// the LIMIT keeps the lookup a per-key subquery, where a plain join or
	// a row-value IN lets the planner hash the batch's keys and scan the
	// whole table (it prices a few hundred probes above a sequential scan
	// of a table of some ten thousand rows; docs/PERFORMANCE.md,
	// "Sequential scans on the write path").
	b.Queue(`SELECT i.* FROM (SELECT DISTINCT s, k FROM unnest($1::text[], $2::text[]) AS t(s, k)) t,
		LATERAL (SELECT `+keyCols+` FROM idempotency_keys
		         WHERE scope = t.s AND idempotency_key = t.k LIMIT 1) i`, scopes, keys)
	// = ANY (ARRAY(...)) rather than = ANY($1): the generic plan of the
	// latter was seen to scan the table while its statistics called it
	// small, and kept doing so as it grew.
	b.Queue(`SELECT `+accountCols+` FROM accounts
		WHERE account_id = ANY (ARRAY(SELECT unnest($1::uuid[])))
		ORDER BY account_id
		FOR UPDATE`, ids(l.Accounts))
	b.Queue(`SELECT clock_timestamp()`)
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()

	out := BatchLocked{
		Keys:     map[KeyRef]KeyRecord{},
		Accounts: map[uuid.UUID]Account{},
		Holds:    map[uuid.UUID]Hold{},
		Charges:  map[uuid.UUID]Transfer{},
	}
	var n int64
	if err := br.QueryRow().Scan(&n); err != nil {
		return BatchLocked{}, translate(err)
	}
	rows, err := br.Query()
	if err != nil {
		return BatchLocked{}, translate(err)
	}
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			rows.Close()
			return BatchLocked{}, translate(err)
		}
		out.Keys[KeyRef{Scope: k.Scope, Key: k.Key}] = k
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return BatchLocked{}, translate(err)
	}
	rows, err = br.Query()
	if err != nil {
		return BatchLocked{}, translate(err)
	}
	for rows.Next() {
		a, err := scanAccount(rows)
		if err != nil {
			rows.Close()
			return BatchLocked{}, translate(err)
		}
		out.Accounts[a.ID] = a
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return BatchLocked{}, translate(err)
	}
	if err := br.QueryRow().Scan(&out.Now); err != nil {
		return BatchLocked{}, translate(err)
	}
	if err := br.Close(); err != nil {
		return BatchLocked{}, translate(err)
	}

	var expiring []uuid.UUID
	for id, a := range out.Accounts {
		if a.NextHoldExpiry != nil && !a.NextHoldExpiry.After(out.Now) {
			expiring = append(expiring, id)
		}
	}
	if len(l.Holds) == 0 && len(l.Charges) == 0 && len(expiring) == 0 {
		return out, nil
	}
	b = &pgx.Batch{}
	b.Queue(`SELECT `+holdCols+` FROM holds
		WHERE hold_id = ANY (ARRAY(
			SELECT unnest($1::uuid[])
			UNION SELECT hold_id FROM holds WHERE account_id = ANY($2::uuid[]) AND status = 1 AND expires_at <= $3))`,
		ids(l.Holds), ids(expiring), out.Now)
	b.Queue(`SELECT `+transferCols+` FROM transfers WHERE transfer_id = ANY($1::uuid[])`, ids(l.Charges))
	br2 := t.tx.SendBatch(ctx, b)
	defer br2.Close()
	rows, err = br2.Query()
	if err != nil {
		return BatchLocked{}, translate(err)
	}
	for rows.Next() {
		h, err := scanHold(rows)
		if err != nil {
			rows.Close()
			return BatchLocked{}, translate(err)
		}
		out.Holds[h.ID] = h
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return BatchLocked{}, translate(err)
	}
	rows, err = br2.Query()
	if err != nil {
		return BatchLocked{}, translate(err)
	}
	for rows.Next() {
		tr, err := scanTransfer(rows)
		if err != nil {
			rows.Close()
			return BatchLocked{}, translate(err)
		}
		out.Charges[tr.ID] = tr
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return BatchLocked{}, translate(err)
	}
	return out, translate(br2.Close())
}

// nullType stores an account type of 0 (not known to the writer) as NULL.
func nullType(t int16) *int16 {
	if t == 0 {
		return nil
	}
	return &t
}

func ids(v []uuid.UUID) []uuid.UUID {
	if v == nil {
		return []uuid.UUID{}
	}
	return v
}

func nullID(id uuid.UUID) *string {
	if id == uuid.Nil {
		return nil
	}
	s := id.String()
	return &s
}

// LockBatchKey serializes on a SubmitBatch key and returns its stored
// outcome, if any. It must be the first lock a transaction takes (before
// LockBatch), which keeps lock order global: batch key, item keys, rows.
func (t *Tx) LockBatchKey(ctx context.Context, scope, key string) (BatchRecord, bool, error) {
	if _, err := t.tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('batch:' || length($1)::text || ':' || $1 || $2, 0))`,
		scope, key); err != nil {
		return BatchRecord{}, false, translate(err)
	}
	var r BatchRecord
	err := t.tx.QueryRow(ctx, `SELECT scope, batch_key, fingerprint, mode, applied, results, created_at
		FROM batches WHERE scope = $1 AND batch_key = $2`, scope, key).
		Scan(&r.Scope, &r.Key, &r.Fingerprint, &r.Mode, &r.Applied, &r.Results, &r.CreatedAt)
	if err == pgx.ErrNoRows {
		return BatchRecord{}, false, nil
	}
	if err != nil {
		return BatchRecord{}, false, translate(err)
	}
	return r, true, nil
}

// InsertBatch stores a SubmitBatch key's outcome.
func (t *Tx) InsertBatch(ctx context.Context, r BatchRecord) error {
	_, err := t.tx.Exec(ctx, `INSERT INTO batches (scope, batch_key, fingerprint, mode, applied, results)
		VALUES ($1, $2, $3, $4, $5, $6)`, r.Scope, r.Key, r.Fingerprint, r.Mode, r.Applied, r.Results)
	return translate(err)
}

// BatchWrite is everything a batch writes: its transfers and their entries,
// its holds and their final actions, refund totals, the final state of every
// account it touched, every key's outcome and every account change.
type BatchWrite struct {
	Transfers   []Transfer
	Entries     []Entry
	Holds       []Hold
	HoldChanges []HoldChange
	Refunds     []RefundAdd
	Updates     []AccountUpdate
	Keys        []KeyRecord
	Changes     []AccountChange
	// Events are the batch's change-feed rows (xid and id are assigned by
	// the database).
	Events []EventRow
	// Usage and UsageTotals are the batch's additions to the spend
	// rollups (per customer account, and per revenue account over all
	// customers), under dimension set UsageSetID.
	Usage       []UsageAdd
	UsageTotals []UsageAdd
	UsageSetID  int16
}

// WriteBatch writes a batch with one set-based statement per table,
// pipelined in one round trip, in an order that satisfies the foreign keys
// (and lets the account update see the batch's hold writes). Each account
// update is guarded by the version read under lock; if any guard fails the
// whole transaction aborts.
func (t *Tx) WriteBatch(ctx context.Context, w BatchWrite) error {
	b := &pgx.Batch{}
	var want []int
	queue := func(n int, sql string, args ...any) {
		if n == 0 {
			return
		}
		b.Queue(sql, args...)
		want = append(want, n)
	}
	if n := len(w.Transfers); n > 0 {
		ids := make([]uuid.UUID, n)
		scopes := make([]string, n)
		keys := make([]string, n)
		kinds := make([]int16, n)
		debits := make([]uuid.UUID, n)
		credits := make([]uuid.UUID, n)
		amounts := make([]int64, n)
		currencies := make([]string, n)
		descs := make([]string, n)
		metas := make([]string, n)
		ats := make([]time.Time, n)
		byClients := make([]*string, n)
		byKeys := make([]*string, n)
		refundOf := make([]*string, n)
		holds := make([]*string, n)
		crossed := make([]bool, n)
		debitTypes := make([]*int16, n)
		creditTypes := make([]*int16, n)
		for i, tr := range w.Transfers {
			debitTypes[i], creditTypes[i] = nullType(tr.DebitAccountType), nullType(tr.CreditAccountType)
			ids[i], scopes[i], keys[i], kinds[i] = tr.ID, tr.Scope, tr.Key, tr.Kind
			debits[i], credits[i], amounts[i], currencies[i] = tr.DebitAccountID, tr.CreditAccountID, tr.Amount, tr.Currency
			descs[i], metas[i], ats[i] = tr.Description, string(encodeMeta(tr.Metadata)), tr.CreatedAt
			byClients[i], refundOf[i], holds[i], crossed[i] = nullID(tr.CreatedByClient), nullID(tr.RefundOf), nullID(tr.HoldID), tr.ThresholdCrossed
			if tr.CreatedByKey != "" {
				k := tr.CreatedByKey
				byKeys[i] = &k
			}
		}
		queue(n, `INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
			amount, currency, description, metadata, created_at, created_by_client, created_by_key,
			refund_of, hold_id, threshold_crossed, debit_account_type, credit_account_type)
			SELECT t.id, t.scope, t.key, t.kind, t.debit, t.credit, t.amount, t.currency, t.description, t.meta::jsonb, t.at,
			       t.by_client, t.by_key, t.refund_of, t.hold, t.crossed, t.debit_type, t.credit_type
			FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int2[], $5::uuid[], $6::uuid[], $7::int8[], $8::text[],
			            $9::text[], $10::text[], $11::timestamptz[], $12::text[]::uuid[], $13::text[],
			            $14::text[]::uuid[], $15::text[]::uuid[], $16::bool[], $17::int2[], $18::int2[])
			  AS t(id, scope, key, kind, debit, credit, amount, currency, description, meta, at, by_client, by_key,
			       refund_of, hold, crossed, debit_type, credit_type)`,
			ids, scopes, keys, kinds, debits, credits, amounts, currencies, descs, metas, ats, byClients, byKeys,
			refundOf, holds, crossed, debitTypes, creditTypes)
	}
	if n := len(w.Holds); n > 0 {
		ids := make([]uuid.UUID, n)
		scopes := make([]string, n)
		keys := make([]string, n)
		accts := make([]uuid.UUID, n)
		revs := make([]*string, n)
		amounts := make([]int64, n)
		currencies := make([]string, n)
		expires := make([]time.Time, n)
		descs := make([]string, n)
		metas := make([]string, n)
		ats := make([]time.Time, n)
		byClients := make([]*string, n)
		byKeys := make([]*string, n)
		acctTypes := make([]*int16, n)
		revTypes := make([]*int16, n)
		for i, h := range w.Holds {
			acctTypes[i], revTypes[i] = nullType(h.AccountType), nullType(h.RevenueAccountType)
			ids[i], scopes[i], keys[i], accts[i], revs[i] = h.ID, h.Scope, h.Key, h.AccountID, nullID(h.RevenueAccountID)
			amounts[i], currencies[i], expires[i], descs[i] = h.Amount, h.Currency, h.ExpiresAt, h.Description
			metas[i], ats[i], byClients[i] = string(encodeMeta(h.Metadata)), h.CreatedAt, nullID(h.CreatedByClient)
			if h.CreatedByKey != "" {
				k := h.CreatedByKey
				byKeys[i] = &k
			}
		}
		queue(n, `INSERT INTO holds (hold_id, scope, idempotency_key, account_id, revenue_account_id, amount, currency,
			expires_at, description, metadata, created_at, created_by_client, created_by_key,
			account_type, revenue_account_type)
			SELECT h.id, h.scope, h.key, h.acct, h.rev, h.amount, h.currency, h.expires, h.description, h.meta::jsonb,
			       h.at, h.by_client, h.by_key, h.acct_type, h.rev_type
			FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[]::uuid[], $6::int8[], $7::text[],
			            $8::timestamptz[], $9::text[], $10::text[], $11::timestamptz[], $12::text[]::uuid[], $13::text[],
			            $14::int2[], $15::int2[])
			  AS h(id, scope, key, acct, rev, amount, currency, expires, description, meta, at, by_client, by_key,
			       acct_type, rev_type)`,
			ids, scopes, keys, accts, revs, amounts, currencies, expires, descs, metas, ats, byClients, byKeys,
			acctTypes, revTypes)
	}
	if n := len(w.HoldChanges); n > 0 {
		ids := make([]uuid.UUID, n)
		statuses := make([]int16, n)
		captured := make([]int64, n)
		transfers := make([]*string, n)
		ats := make([]time.Time, n)
		for i, c := range w.HoldChanges {
			ids[i], statuses[i], captured[i], transfers[i], ats[i] = c.HoldID, c.Status, c.CapturedAmount, nullID(c.CaptureTransferID), c.FinalizedAt
		}
		// status = 1 guards the one final action (the trigger enforces it too).
		// The redundant hold_id = ANY (ARRAY(...)) lets the planner reach
		// the rows through the primary key; a join with unnest alone may be
		// planned as a hash join over every hold (docs/PERFORMANCE.md).
		queue(n, `UPDATE holds h SET status = c.status, captured_amount = c.captured,
			capture_transfer_id = c.transfer, finalized_at = c.at
			FROM unnest($1::uuid[], $2::int2[], $3::int8[], $4::text[]::uuid[], $5::timestamptz[])
			  AS c(id, status, captured, transfer, at)
			WHERE h.hold_id = c.id AND h.status = 1
			  AND h.hold_id = ANY (ARRAY(SELECT unnest($1::uuid[])))`, ids, statuses, captured, transfers, ats)
	}
	if n := len(w.Entries); n > 0 {
		tids := make([]uuid.UUID, n)
		aids := make([]uuid.UUID, n)
		seqs := make([]int64, n)
		amounts := make([]int64, n)
		bals := make([]int64, n)
		vers := make([]int64, n)
		ats := make([]time.Time, n)
		for i, e := range w.Entries {
			tids[i], aids[i], seqs[i], amounts[i] = e.TransferID, e.AccountID, e.Sequence, e.Amount
			bals[i], vers[i], ats[i] = e.BalanceAfter, e.VersionAfter, e.CreatedAt
		}
		queue(n, `INSERT INTO entries (transfer_id, account_id, sequence, amount, balance_after, version_after, created_at)
			SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::timestamptz[])`,
			tids, aids, seqs, amounts, bals, vers, ats)
	}
	if n := len(w.Updates); n > 0 {
		ids := make([]uuid.UUID, n)
		prevs := make([]int64, n)
		bals := make([]int64, n)
		vers := make([]int64, n)
		seqs := make([]int64, n)
		ats := make([]*time.Time, n)
		held := make([]int64, n)
		holdsChanged := make([]bool, n)
		statuses := make([]int16, n)
		limits := make([]int64, n)
		metas := make([]*string, n)
		thresholds := make([]*int64, n)
		for i, u := range w.Updates {
			ids[i], prevs[i], bals[i], vers[i], seqs[i], ats[i] = u.AccountID, u.PrevVersion, u.Balance, u.Version, u.LastSequence, u.LastEntryAt
			held[i], holdsChanged[i], statuses[i], limits[i] = u.Held, u.HoldsChanged, u.Status, u.CreditLimit
			thresholds[i] = u.LowBalanceThreshold
			if u.Metadata != nil {
				m := string(encodeMeta(u.Metadata))
				metas[i] = &m
			}
		}
		// a.account_id = ANY (ARRAY(...)) repeats the join condition so that
		// the rows are found through the primary key: a join with unnest
		// alone may be planned as a hash join over every account, and a
		// plain ANY($1) of a few hundred ids as a scan of a table the
		// statistics still call small (docs/PERFORMANCE.md).
		queue(n, `UPDATE accounts a
			SET balance = u.balance, version = u.version, last_sequence = u.seq, last_entry_at = u.at,
			    held = u.held, status = u.status, credit_limit = u.credit_limit,
			    metadata = coalesce(u.meta::jsonb, a.metadata),
			    low_balance_threshold = u.threshold,
			    next_hold_expiry = CASE WHEN u.holds_changed
			        THEN (SELECT min(h.expires_at) FROM holds h WHERE h.account_id = a.account_id AND h.status = 1)
			        ELSE a.next_hold_expiry END
			FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::timestamptz[],
			            $7::int8[], $8::bool[], $9::int2[], $10::int8[], $11::text[], $12::int8[])
			  AS u(id, prev, balance, version, seq, at, held, holds_changed, status, credit_limit, meta, threshold)
			WHERE a.account_id = u.id AND a.version = u.prev
			  AND a.account_id = ANY (ARRAY(SELECT unnest($1::uuid[])))`,
			ids, prevs, bals, vers, seqs, ats, held, holdsChanged, statuses, limits, metas, thresholds)
	}
	if n := len(w.Refunds); n > 0 {
		ids := make([]uuid.UUID, n)
		charged := make([]int64, n)
		amounts := make([]int64, n)
		for i, r := range w.Refunds {
			ids[i], charged[i], amounts[i] = r.ChargeID, r.ChargeAmount, r.Amount
		}
		// The database adds, so a lost update is impossible even if two
		// transactions raced; the CHECK refuses a total above the charge.
		// One row per charge: the ledger sums a batch's refunds of one charge.
		queue(n, `INSERT INTO charge_refunds AS r (transfer_id, amount, refunded)
			SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[])
			ON CONFLICT (transfer_id) DO UPDATE SET refunded = r.refunded + excluded.refunded`, ids, charged, amounts)
	}
	if n := len(w.Keys); n > 0 {
		scopes := make([]string, n)
		keys := make([]string, n)
		fps := make([][]byte, n)
		kinds := make([]int16, n)
		tids := make([]*string, n)
		hids := make([]*string, n)
		aids := make([]uuid.UUID, n)
		codes := make([]*string, n)
		reasons := make([]*string, n)
		msgs := make([]*string, n)
		for i, k := range w.Keys {
			scopes[i], keys[i], fps[i], kinds[i], aids[i] = k.Scope, k.Key, k.Fingerprint, k.Kind, k.AccountID
			if k.TransferID.Valid {
				tids[i] = nullID(k.TransferID.UUID)
			}
			if k.HoldID.Valid {
				hids[i] = nullID(k.HoldID.UUID)
			}
			if !k.TransferID.Valid && !k.HoldID.Valid {
				codes[i], reasons[i], msgs[i] = &k.ErrorCode, &k.ErrorReason, &k.ErrorMessage
			}
		}
		queue(n, `INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, kind, transfer_id, account_id,
			error_code, error_reason, error_message, hold_id)
			SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int2[], $5::text[]::uuid[], $6::uuid[],
			                     $7::text[], $8::text[], $9::text[], $10::text[]::uuid[])`,
			scopes, keys, fps, kinds, tids, aids, codes, reasons, msgs, hids)
	}
	if n := len(w.Changes); n > 0 {
		accts := make([]uuid.UUID, n)
		actions := make([]string, n)
		vers := make([]int64, n)
		befores := make([]string, n)
		afters := make([]string, n)
		byClients := make([]*string, n)
		byKeys := make([]*string, n)
		ats := make([]time.Time, n)
		whys := make([]string, n)
		for i, c := range w.Changes {
			accts[i], actions[i], vers[i], ats[i], byClients[i] = c.AccountID, c.Action, c.VersionAfter, c.CreatedAt, nullID(c.CreatedByClient)
			whys[i] = c.Reason
			bj, err := json.Marshal(c.Before)
			if err != nil {
				return &Error{Kind: ErrInternal, cause: err}
			}
			aj, err := json.Marshal(c.After)
			if err != nil {
				return &Error{Kind: ErrInternal, cause: err}
			}
			befores[i], afters[i] = string(bj), string(aj)
			if c.CreatedByKey != "" {
				k := c.CreatedByKey
				byKeys[i] = &k
			}
		}
		queue(n, `INSERT INTO account_changes (account_id, action, version_after, before, after,
			created_by_client, created_by_key, created_at, reason)
			SELECT c.acct, c.action, c.ver, c.before::jsonb, c.after::jsonb, c.by_client, c.by_key, c.at, c.why
			FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[]::uuid[], $7::text[],
			            $8::timestamptz[], $9::text[]) AS c(acct, action, ver, before, after, by_client, by_key, at, why)`,
			accts, actions, vers, befores, afters, byClients, byKeys, ats, whys)
	}
	if n := len(w.Events); n > 0 {
		kinds := make([]string, n)
		subjects := make([]uuid.UUID, n)
		accts := make([]*string, n)
		payloads := make([]string, n)
		ats := make([]time.Time, n)
		for i, e := range w.Events {
			kinds[i], subjects[i], accts[i], payloads[i], ats[i] = e.Kind, e.SubjectID, nullID(e.AccountID), string(e.Payload), e.CreatedAt
		}
		// WITH ORDINALITY keeps the batch's order in event_id.
		queue(n, `INSERT INTO events (kind, subject_id, account_id, payload, created_at)
			SELECT e.kind, e.subject, e.acct, e.payload::jsonb, e.at
			FROM unnest($1::text[], $2::uuid[], $3::text[]::uuid[], $4::text[], $5::timestamptz[]) WITH ORDINALITY
			  AS e(kind, subject, acct, payload, at, n)
			ORDER BY e.n`, kinds, subjects, accts, payloads, ats)
	}
	if len(w.UsageTotals) > 0 {
		queueUsage(queue, w)
	}
	if b.Len() == 0 {
		return nil
	}
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()
	for _, n := range want {
		tag, err := br.Exec()
		if err != nil {
			return translate(err)
		}
		if tag.RowsAffected() != int64(n) {
			// A version or hold-status guard failed: the locking is broken.
			// Abort rather than commit it.
			return &Error{Kind: ErrInternal, cause: fmt.Errorf("batch statement wrote %d rows, want %d", tag.RowsAffected(), n)}
		}
	}
	return translate(br.Close())
}
