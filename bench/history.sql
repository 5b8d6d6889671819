-- bench/history.sql: fill a Tally database with history, for the
-- "charge-uniform on a big database" figure of bench/compare.sh (BIG=1).
--
--   psql -v accounts=1000000 -v per=5 -d DB -f bench/history.sql
--
-- Adds :accounts customer accounts (USD) and :accounts * :per transfers
-- between them (kind TRANSFER, amount 1), each with its two entries and its
-- idempotency key: with the defaults 1,000,000 accounts, 5,000,000 transfers
-- and keys, and 10,000,000 entries. Transfer t moves 1 from account t % n to
-- account (t + 1) % n, so each account has per debits and per credits, with
-- gap-free sequences (credit of round k = 2k+1, debit = 2k+2).
--
-- -v base=0 makes the history reconcile exactly (balances 0, balance_after
-- 1 after each credit and 0 after each debit: bench/reconcile.sh uses it);
-- the default base 1000 gives every account a balance of 1000 that its
-- entries do not explain (fine for write benchmarks, not for reconciliation).
-- Only INSERTs: the append-only triggers are untouched.
\set ON_ERROR_STOP on
\if :{?base}
\else
\set base 1000
\endif
\timing on
BEGIN;
CREATE TEMP TABLE hist_params AS SELECT :accounts::bigint AS n, :per::bigint AS per, :base::bigint AS base,
  clock_timestamp() - interval '30 days' AS t0;

INSERT INTO accounts (account_id, currency, type, external_ref, floor, balance, version, last_sequence,
                      last_entry_at, created_at)
SELECT ('a' || lpad(to_hex(i), 31, '0'))::uuid, 'USD', 1, 'bench-history', 1, p.base, 2 * p.per, 2 * p.per,
       p.t0 + (p.n * p.per) * interval '1 microsecond', p.t0
FROM hist_params p, generate_series(0, p.n - 1) AS i;

INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id, amount,
                       currency, description, created_at)
SELECT ('b' || lpad(to_hex(t), 31, '0'))::uuid, '', 'bench-history-' || t, 3,
       ('a' || lpad(to_hex(t % p.n), 31, '0'))::uuid, ('a' || lpad(to_hex((t + 1) % p.n), 31, '0'))::uuid,
       1, 'USD', 'history', p.t0 + t * interval '1 microsecond'
FROM hist_params p, generate_series(0, p.n * p.per - 1) AS t;

INSERT INTO entries (transfer_id, account_id, sequence, amount, balance_after, version_after, created_at)
SELECT ('b' || lpad(to_hex(t), 31, '0'))::uuid, ('a' || lpad(to_hex(t % p.n), 31, '0'))::uuid,
       2 * (t / p.n) + 2, -1, p.base, 2 * (t / p.n) + 2, p.t0 + t * interval '1 microsecond'
FROM hist_params p, generate_series(0, p.n * p.per - 1) AS t
UNION ALL
SELECT ('b' || lpad(to_hex(t), 31, '0'))::uuid, ('a' || lpad(to_hex((t + 1) % p.n), 31, '0'))::uuid,
       2 * (t / p.n) + 1, 1, p.base + 1, 2 * (t / p.n) + 1, p.t0 + t * interval '1 microsecond'
FROM hist_params p, generate_series(0, p.n * p.per - 1) AS t;

INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, kind, transfer_id, account_id, created_at)
SELECT '', 'bench-history-' || t, '\x00'::bytea, 3, ('b' || lpad(to_hex(t), 31, '0'))::uuid,
       ('a' || lpad(to_hex(t % p.n), 31, '0'))::uuid, p.t0 + t * interval '1 microsecond'
FROM hist_params p, generate_series(0, p.n * p.per - 1) AS t;
COMMIT;
VACUUM ANALYZE accounts;
VACUUM ANALYZE transfers;
VACUUM ANALYZE entries;
VACUUM ANALYZE idempotency_keys;
SELECT (SELECT count(*) FROM accounts) AS accounts, (SELECT count(*) FROM entries) AS entries;
