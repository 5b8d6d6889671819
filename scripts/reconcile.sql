-- Reconciliation of a Tally database: one row per invariant with the number
-- of violations; every count must be 0. Run it on a restored copy (see
-- docs/OPERATIONS.md, "Backups and point-in-time recovery") or any time:
--
--   psql "$TALLY_DATABASE_URL" -v ON_ERROR_STOP=1 -f scripts/reconcile.sql
--
-- internal/hatest runs this very file after a point-in-time restore.
SELECT 'entries_running_balance_and_gapless_sequence' AS invariant, count(*) AS violations
FROM (SELECT balance_after,
             sum(amount) OVER (PARTITION BY account_id ORDER BY sequence) AS running,
             sequence,
             row_number() OVER (PARTITION BY account_id ORDER BY sequence) AS rn
      FROM entries) s
WHERE running <> balance_after OR rn <> sequence
UNION ALL
SELECT 'account_balance_equals_sum_of_entries', count(*)
FROM accounts a
LEFT JOIN LATERAL (SELECT coalesce(sum(amount), 0) AS s, count(*) AS n
                   FROM entries e WHERE e.account_id = a.account_id) x ON true
WHERE a.balance <> x.s OR a.last_sequence <> x.n
UNION ALL
SELECT 'currency_balances_sum_to_zero', count(*)
FROM (SELECT currency FROM accounts GROUP BY currency HAVING sum(balance) <> 0) c
UNION ALL
SELECT 'transfer_has_two_entries_summing_to_zero', count(*)
FROM transfers t
LEFT JOIN LATERAL (SELECT count(*) AS n, coalesce(sum(amount), 0) AS s
                   FROM entries e WHERE e.transfer_id = t.transfer_id) x ON true
WHERE x.n <> 2 OR x.s <> 0
UNION ALL
SELECT 'key_outcome_has_its_transfer', count(*)
FROM idempotency_keys k
WHERE k.transfer_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.transfer_id = k.transfer_id)
UNION ALL
SELECT 'transfer_has_its_key', count(*)
FROM transfers t
WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k
                  WHERE k.scope = t.scope AND k.idempotency_key = t.idempotency_key
                    AND k.transfer_id = t.transfer_id);
