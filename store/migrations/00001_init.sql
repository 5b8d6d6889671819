-- +goose Up
-- Tally's schema. PostgreSQL is the only source of truth: every invariant the
-- ledger checks in code is also backed here by a named constraint, so a bug in
-- the service can fail a transaction but never commit a broken state.

CREATE TABLE accounts (
    account_id    uuid        PRIMARY KEY,
    currency      text        NOT NULL,
    type          smallint    NOT NULL,
    external_ref  text        NOT NULL DEFAULT '',
    floor         smallint    NOT NULL,
    credit_limit  bigint      NOT NULL DEFAULT 0,
    status        smallint    NOT NULL DEFAULT 1,
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Per-currency default system account marker: 'revenue' or 'funding'.
    system_role   text,
    balance       bigint      NOT NULL DEFAULT 0,
    -- version increases with every change to the account's state.
    version       bigint      NOT NULL DEFAULT 0,
    -- last_sequence is the sequence of the account's last entry.
    last_sequence bigint      NOT NULL DEFAULT 0,
    last_entry_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT accounts_currency_format CHECK (currency ~ '^[A-Z0-9_]{1,16}$'),
    CONSTRAINT accounts_type_valid CHECK (type IN (1, 2, 3)),
    CONSTRAINT accounts_floor_valid CHECK (floor IN (1, 2)),
    CONSTRAINT accounts_status_valid CHECK (status IN (1, 2, 3)),
    CONSTRAINT accounts_external_ref_length CHECK (octet_length(external_ref) <= 256),
    CONSTRAINT accounts_credit_limit_range CHECK (credit_limit >= 0 AND credit_limit <= 1000000000000000000),
    -- The floor: a FLOOR_NON_NEGATIVE account never goes below -credit_limit.
    CONSTRAINT accounts_balance_floor CHECK (floor <> 1 OR balance >= -credit_limit),
    -- available = balance + credit_limit must fit in int64.
    -- Written so that the check itself cannot overflow.
    CONSTRAINT accounts_available_range CHECK (balance <= 0 OR credit_limit <= 9223372036854775807 - balance),
    CONSTRAINT accounts_version_nonnegative CHECK (version >= 0 AND last_sequence >= 0),
    CONSTRAINT accounts_system_role_valid CHECK (
        system_role IS NULL
        OR (system_role = 'revenue' AND type = 2)
        OR (system_role = 'funding' AND type = 3))
);

-- One default revenue and one default funding account per currency.
CREATE UNIQUE INDEX accounts_system_role_unique ON accounts (currency, system_role) WHERE system_role IS NOT NULL;
CREATE INDEX accounts_external_ref_idx ON accounts (external_ref, account_id) WHERE external_ref <> '';
CREATE INDEX accounts_currency_type_idx ON accounts (currency, type, account_id);

CREATE TABLE transfers (
    transfer_id       uuid        PRIMARY KEY,
    -- scope isolates idempotency keys per caller (one global scope '' until
    -- authentication exists).
    scope             text        NOT NULL DEFAULT '',
    idempotency_key   text        NOT NULL,
    kind              smallint    NOT NULL,
    debit_account_id  uuid        NOT NULL REFERENCES accounts (account_id),
    credit_account_id uuid        NOT NULL REFERENCES accounts (account_id),
    amount            bigint      NOT NULL,
    currency          text        NOT NULL,
    description       text        NOT NULL DEFAULT '',
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL,
    CONSTRAINT transfers_amount_positive CHECK (amount > 0),
    CONSTRAINT transfers_distinct_accounts CHECK (debit_account_id <> credit_account_id),
    CONSTRAINT transfers_kind_valid CHECK (kind IN (1, 2, 3)),
    -- A key produces at most one transfer, whatever the idempotency_keys table says.
    CONSTRAINT transfers_scope_key_unique UNIQUE (scope, idempotency_key)
);

CREATE TABLE entries (
    transfer_id   uuid        NOT NULL REFERENCES transfers (transfer_id),
    account_id    uuid        NOT NULL REFERENCES accounts (account_id),
    sequence      bigint      NOT NULL,
    amount        bigint      NOT NULL,
    balance_after bigint      NOT NULL,
    version_after bigint      NOT NULL,
    created_at    timestamptz NOT NULL,
    CONSTRAINT entries_pkey PRIMARY KEY (account_id, sequence),
    CONSTRAINT entries_sequence_positive CHECK (sequence >= 1),
    CONSTRAINT entries_amount_nonzero CHECK (amount <> 0),
    CONSTRAINT entries_transfer_account_unique UNIQUE (transfer_id, account_id)
);
CREATE INDEX entries_account_created_idx ON entries (account_id, created_at, sequence);

-- Every money-moving key, kept forever, with its final outcome: either the
-- transfer it produced or the business rejection it got.
CREATE TABLE idempotency_keys (
    scope           text        NOT NULL DEFAULT '',
    idempotency_key text        NOT NULL,
    fingerprint     bytea       NOT NULL,
    kind            smallint    NOT NULL,
    transfer_id     uuid        REFERENCES transfers (transfer_id),
    -- account the caller named, for replaying the balance of a rejection.
    account_id      uuid        NOT NULL,
    error_code      text,
    error_reason    text,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (scope, idempotency_key),
    CONSTRAINT idempotency_keys_key_length CHECK (octet_length(idempotency_key) BETWEEN 1 AND 128),
    -- Exactly one outcome: a transfer or a rejection.
    CONSTRAINT idempotency_keys_one_outcome CHECK ((transfer_id IS NULL) <> (error_reason IS NULL)),
    CONSTRAINT idempotency_keys_error_code_valid CHECK (error_code IS NULL OR error_code IN ('FAILED_PRECONDITION', 'OUT_OF_RANGE'))
);

-- Transfers, entries and idempotency keys are append-only: mistakes are
-- corrected by new transfers, and a key's outcome is final.
-- +goose StatementBegin
CREATE FUNCTION tally_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'tally: % on % is forbidden: the ledger is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;
-- +goose StatementEnd

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION tally_forbid_change();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION tally_forbid_change();
CREATE TRIGGER idempotency_keys_append_only BEFORE UPDATE OR DELETE ON idempotency_keys
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_change();
CREATE TRIGGER idempotency_keys_no_truncate BEFORE TRUNCATE ON idempotency_keys
    FOR EACH STATEMENT EXECUTE FUNCTION tally_forbid_change();

-- +goose Down
DROP TABLE idempotency_keys;
DROP TABLE entries;
DROP TABLE transfers;
DROP TABLE accounts;
DROP FUNCTION tally_forbid_change();
