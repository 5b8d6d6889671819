-- +goose Up
-- System accounts as shards (docs/ARCHITECTURE.md, "Sharded system
-- accounts"). A REVENUE or FUNDING account is backed by shard rows: shard 0
-- is the account's own row (every existing account is its own shard 0, with
-- its history intact), shards 1..shard_count are further accounts rows with
-- shard_of naming it. Each shard is a real ledger account: its own gapless
-- entry sequence, running balance_after, version and row lock, so every
-- per-account invariant holds per shard unchanged, and concurrent batches
-- that credit different shards never wait for each other. The account's
-- balance is the sum of its shards.
--
-- Expand-only: a tallyd of the previous release ignores the new columns and
-- posts to shard 0 (the row it always posted to); every shard row it never
-- sees balances itself like any account, so the books still sum to zero.

ALTER TABLE accounts
    ADD COLUMN shard_of    uuid,
    ADD COLUMN shard_index integer NOT NULL DEFAULT 0,
    -- On shard 0: how many further shards exist (1..shard_count). Shards
    -- are only ever added, under the lock of shard 0's row.
    ADD COLUMN shard_count integer NOT NULL DEFAULT 0;

-- The target of the shard foreign key: a shard has its account's currency
-- and type.
ALTER TABLE accounts
    ADD CONSTRAINT accounts_id_currency_type_unique UNIQUE (account_id, currency, type);

ALTER TABLE accounts
    ADD CONSTRAINT accounts_shard_of_fk FOREIGN KEY (shard_of, currency, type)
        REFERENCES accounts (account_id, currency, type),
    -- A shard is a plain system-side account: no role of its own, no
    -- external reference, no floor, no shards of its own; shard 0 (the
    -- account itself) has index 0.
    ADD CONSTRAINT accounts_shard_valid CHECK (
        (shard_of IS NULL AND shard_index = 0 AND shard_count >= 0
            AND (shard_count = 0 OR type IN (2, 3)))
        OR (shard_of IS NOT NULL AND shard_of <> account_id AND shard_index > 0 AND shard_count = 0
            AND system_role IS NULL AND external_ref = '' AND type IN (2, 3) AND floor = 2));

-- The balance of a sharded account is the sum of at most 64 shards (the
-- ledger's ShardsMax): each shard's balance is bounded by 2^63/64 so the
-- sum always fits a bigint.
ALTER TABLE accounts
    ADD CONSTRAINT accounts_shard_balance_range CHECK (
        (shard_of IS NULL AND shard_count = 0)
        OR balance BETWEEN -144115188075855871 AND 144115188075855871);

-- One row per (account, index); also how an account's shards are found.
CREATE UNIQUE INDEX accounts_shard_unique ON accounts (shard_of, shard_index) WHERE shard_of IS NOT NULL;

-- +goose Down
DROP INDEX accounts_shard_unique;
ALTER TABLE accounts
    DROP CONSTRAINT accounts_shard_valid,
    DROP CONSTRAINT accounts_shard_of_fk,
    DROP CONSTRAINT accounts_id_currency_type_unique,
    DROP COLUMN shard_count,
    DROP COLUMN shard_index,
    DROP COLUMN shard_of;
