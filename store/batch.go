package store

import (
	"context"
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

// BatchLock says what a group-committed batch needs locked.
type BatchLock struct {
	// Keys are the batch's idempotency keys (duplicates allowed).
	Keys []KeyRef
	// Accounts are the accounts the batch names.
	Accounts []uuid.UUID
	// DefaultsFor are accounts whose currency's default system accounts
	// (revenue and funding) must be locked too.
	DefaultsFor []uuid.UUID
}

// BatchLocked is what LockBatch found, with every row locked.
type BatchLocked struct {
	// Keys holds the stored outcome of every key that was already used.
	Keys map[KeyRef]KeyRecord
	// Accounts holds the locked accounts by id.
	Accounts map[uuid.UUID]Account
	// System maps currency → role → the default system account's id.
	System map[string]map[string]uuid.UUID
	// Now is PostgreSQL's clock, read after the locks were granted.
	Now time.Time
}

// LockBatch serializes on every key of the batch, reads their stored
// outcomes and locks every account involved, in one pipelined round trip.
//
// Lock order is what keeps concurrent batches (in this and other tallyd
// processes) free of deadlocks: first all key locks, in ascending hash order;
// then all account rows, in ascending account_id order. A batch never waits
// for a key while holding a row.
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
	b.Queue(`SELECT `+keyCols+` FROM idempotency_keys
		WHERE (scope, idempotency_key) IN (SELECT s, k FROM unnest($1::text[], $2::text[]) AS t(s, k))`, scopes, keys)
	b.Queue(`SELECT `+accountCols+` FROM accounts
		WHERE account_id = ANY($1::uuid[])
		   OR (system_role IS NOT NULL
		       AND currency IN (SELECT currency FROM accounts WHERE account_id = ANY($2::uuid[])))
		ORDER BY account_id
		FOR UPDATE`, l.Accounts, l.DefaultsFor)
	b.Queue(`SELECT clock_timestamp()`)
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()

	out := BatchLocked{
		Keys:     map[KeyRef]KeyRecord{},
		Accounts: map[uuid.UUID]Account{},
		System:   map[string]map[string]uuid.UUID{},
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
		if a.SystemRole != "" {
			if out.System[a.Currency] == nil {
				out.System[a.Currency] = map[string]uuid.UUID{}
			}
			out.System[a.Currency][a.SystemRole] = a.ID
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return BatchLocked{}, translate(err)
	}
	if err := br.QueryRow().Scan(&out.Now); err != nil {
		return BatchLocked{}, translate(err)
	}
	return out, translate(br.Close())
}

// BatchWrite is everything a batch writes: its transfers and their entries,
// the final state of every account it touched, and every key's outcome.
type BatchWrite struct {
	Transfers []Transfer
	Entries   []Entry
	Updates   []AccountUpdate
	Keys      []KeyRecord
}

// WriteBatch writes a batch with one set-based statement per table,
// pipelined in one round trip. Each account update is guarded by the version
// read under lock; if any guard fails the whole transaction aborts.
func (t *Tx) WriteBatch(ctx context.Context, w BatchWrite) error {
	b := &pgx.Batch{}
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
		for i, tr := range w.Transfers {
			ids[i], scopes[i], keys[i], kinds[i] = tr.ID, tr.Scope, tr.Key, tr.Kind
			debits[i], credits[i], amounts[i], currencies[i] = tr.DebitAccountID, tr.CreditAccountID, tr.Amount, tr.Currency
			descs[i], metas[i], ats[i] = tr.Description, string(encodeMeta(tr.Metadata)), tr.CreatedAt
			if tr.CreatedByClient != uuid.Nil {
				s := tr.CreatedByClient.String()
				byClients[i] = &s
			}
			if tr.CreatedByKey != "" {
				k := tr.CreatedByKey
				byKeys[i] = &k
			}
		}
		b.Queue(`INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
			amount, currency, description, metadata, created_at, created_by_client, created_by_key)
			SELECT t.id, t.scope, t.key, t.kind, t.debit, t.credit, t.amount, t.currency, t.description, t.meta::jsonb, t.at,
			       t.by_client, t.by_key
			FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int2[], $5::uuid[], $6::uuid[], $7::int8[], $8::text[],
			            $9::text[], $10::text[], $11::timestamptz[], $12::text[]::uuid[], $13::text[])
			  AS t(id, scope, key, kind, debit, credit, amount, currency, description, meta, at, by_client, by_key)`,
			ids, scopes, keys, kinds, debits, credits, amounts, currencies, descs, metas, ats, byClients, byKeys)
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
		b.Queue(`INSERT INTO entries (transfer_id, account_id, sequence, amount, balance_after, version_after, created_at)
			SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::timestamptz[])`,
			tids, aids, seqs, amounts, bals, vers, ats)
	}
	if n := len(w.Updates); n > 0 {
		ids := make([]uuid.UUID, n)
		prevs := make([]int64, n)
		bals := make([]int64, n)
		vers := make([]int64, n)
		seqs := make([]int64, n)
		ats := make([]time.Time, n)
		for i, u := range w.Updates {
			ids[i], prevs[i], bals[i], vers[i], seqs[i], ats[i] = u.AccountID, u.PrevVersion, u.Balance, u.Version, u.LastSequence, u.LastEntryAt
		}
		b.Queue(`UPDATE accounts a
			SET balance = u.balance, version = u.version, last_sequence = u.seq, last_entry_at = u.at
			FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::timestamptz[])
			  AS u(id, prev, balance, version, seq, at)
			WHERE a.account_id = u.id AND a.version = u.prev`,
			ids, prevs, bals, vers, seqs, ats)
	}
	if n := len(w.Keys); n > 0 {
		scopes := make([]string, n)
		keys := make([]string, n)
		fps := make([][]byte, n)
		kinds := make([]int16, n)
		tids := make([]*string, n)
		aids := make([]uuid.UUID, n)
		codes := make([]*string, n)
		reasons := make([]*string, n)
		msgs := make([]*string, n)
		for i, k := range w.Keys {
			scopes[i], keys[i], fps[i], kinds[i], aids[i] = k.Scope, k.Key, k.Fingerprint, k.Kind, k.AccountID
			if k.TransferID.Valid {
				s := k.TransferID.UUID.String()
				tids[i] = &s
			} else {
				codes[i], reasons[i], msgs[i] = &k.ErrorCode, &k.ErrorReason, &k.ErrorMessage
			}
		}
		b.Queue(`INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, kind, transfer_id, account_id,
			error_code, error_reason, error_message)
			SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int2[], $5::text[]::uuid[], $6::uuid[],
			                     $7::text[], $8::text[], $9::text[])`,
			scopes, keys, fps, kinds, tids, aids, codes, reasons, msgs)
	}
	if b.Len() == 0 {
		return nil
	}
	br := t.tx.SendBatch(ctx, b)
	defer br.Close()
	want := []int{len(w.Transfers), len(w.Entries), len(w.Updates), len(w.Keys)}
	for _, n := range want {
		if n == 0 {
			continue
		}
		tag, err := br.Exec()
		if err != nil {
			return translate(err)
		}
		if tag.RowsAffected() != int64(n) {
			// A version guard failed: the locking is broken. Abort rather
			// than commit it.
			return &Error{Kind: ErrInternal, cause: fmt.Errorf("batch statement wrote %d rows, want %d", tag.RowsAffected(), n)}
		}
	}
	return translate(br.Close())
}
