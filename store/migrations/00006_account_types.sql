-- +goose Up
-- Account-type rules backed by the database (docs/SECURITY.md, "Account
-- types"): only a CUSTOMER account is charged (to a REVENUE account),
-- credited (from a FUNDING account), refunded to, held or captured from.
-- The ledger checks these rules first; these constraints make sure a bug
-- can only fail a transaction, never commit a charge of a system account.
--
-- Each transfer and hold records the types of the accounts it names, and a
-- composite foreign key proves the recorded type is the account's type.
-- Expand-only: the new columns are nullable, so a tallyd of the previous
-- release (which does not write them) keeps working during a rolling
-- upgrade; its rows are checked by its own code only. A later release may
-- backfill and SET NOT NULL once no previous binary runs.
--
-- The foreign keys and CHECKs are added NOT VALID: every existing row has
-- NULL types, which satisfy them trivially, so validating would only scan
-- the ledger (minutes at 10M transfers) under a lock that stops writes.
-- NOT VALID constraints are enforced on every new and updated row exactly
-- like valid ones, and the foreign keys' triggers on accounts still refuse
-- to change the type of a referenced account.

-- The target of the composite foreign keys. An account's type never
-- changes once something references it (the keys below forbid it).
ALTER TABLE accounts
    ADD CONSTRAINT accounts_id_type_unique UNIQUE (account_id, type);

ALTER TABLE transfers
    ADD COLUMN debit_account_type smallint,
    ADD COLUMN credit_account_type smallint,
    ADD CONSTRAINT transfers_debit_account_type_fk FOREIGN KEY (debit_account_id, debit_account_type)
        REFERENCES accounts (account_id, type) NOT VALID,
    ADD CONSTRAINT transfers_credit_account_type_fk FOREIGN KEY (credit_account_id, credit_account_type)
        REFERENCES accounts (account_id, type) NOT VALID,
    -- kind 1 CHARGE: CUSTOMER → REVENUE; 2 CREDIT: FUNDING → CUSTOMER;
    -- 4 REFUND: REVENUE → CUSTOMER; 3 TRANSFER (admin only): any types.
    ADD CONSTRAINT transfers_account_types_valid CHECK (
        debit_account_type IS NULL OR credit_account_type IS NULL
        OR (kind = 1 AND debit_account_type = 1 AND credit_account_type = 2)
        OR (kind = 2 AND debit_account_type = 3 AND credit_account_type = 1)
        OR (kind = 4 AND debit_account_type = 2 AND credit_account_type = 1)
        OR kind = 3) NOT VALID;

ALTER TABLE holds
    ADD COLUMN account_type smallint,
    ADD COLUMN revenue_account_type smallint,
    ADD CONSTRAINT holds_account_type_fk FOREIGN KEY (account_id, account_type)
        REFERENCES accounts (account_id, type) NOT VALID,
    ADD CONSTRAINT holds_revenue_account_type_fk FOREIGN KEY (revenue_account_id, revenue_account_type)
        REFERENCES accounts (account_id, type) NOT VALID,
    ADD CONSTRAINT holds_account_types_valid CHECK (
        (account_type IS NULL OR account_type = 1)
        AND (revenue_account_type IS NULL OR revenue_account_type = 2)) NOT VALID;

-- +goose Down
ALTER TABLE holds
    DROP CONSTRAINT holds_account_types_valid,
    DROP CONSTRAINT holds_revenue_account_type_fk,
    DROP CONSTRAINT holds_account_type_fk,
    DROP COLUMN revenue_account_type,
    DROP COLUMN account_type;
ALTER TABLE transfers
    DROP CONSTRAINT transfers_account_types_valid,
    DROP CONSTRAINT transfers_credit_account_type_fk,
    DROP CONSTRAINT transfers_debit_account_type_fk,
    DROP COLUMN credit_account_type,
    DROP COLUMN debit_account_type;
ALTER TABLE accounts DROP CONSTRAINT accounts_id_type_unique;
