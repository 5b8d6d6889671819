-- +goose Up
-- Holds, refunds, atomic batches, account lifecycle and balance alerts.
-- Expand-only: every change adds a column with a default, a table or a
-- constraint that existing rows satisfy, so a tallyd of the previous release
-- keeps working against this schema during a rolling upgrade.

-- held is the sum of the holds stored as open. A hold that reached its
-- expires_at still counts here until a write to the account (or the sweeper)
-- writes its expiry down; every read subtracts such holds itself, using
-- next_hold_expiry (the earliest expires_at among open holds) to know when it
-- has to look.
ALTER TABLE accounts
    ADD COLUMN held bigint NOT NULL DEFAULT 0,
    ADD COLUMN next_hold_expiry timestamptz,
    ADD COLUMN low_balance_threshold bigint,
    ADD CONSTRAINT accounts_held_nonnegative CHECK (held >= 0),
    -- Holds need a floor to reserve funds against.
    ADD CONSTRAINT accounts_held_needs_floor CHECK (floor = 1 OR held = 0),
    -- The floor with holds: balance - held >= -credit_limit, written so that
    -- it cannot overflow (held and credit_limit are both non-negative).
    ADD CONSTRAINT accounts_held_within_floor CHECK (floor <> 1 OR balance >= held - credit_limit),
    ADD CONSTRAINT accounts_next_hold_expiry_set CHECK ((held = 0) OR next_hold_expiry IS NOT NULL),
    ADD CONSTRAINT accounts_low_balance_threshold_range CHECK (
        low_balance_threshold IS NULL OR low_balance_threshold BETWEEN -1000000000000000000 AND 1000000000000000000);

-- The sweeper finds accounts with a hold past its expiry through this.
CREATE INDEX accounts_next_hold_expiry_idx ON accounts (next_hold_expiry) WHERE next_hold_expiry IS NOT NULL;

CREATE TABLE holds (
    hold_id             uuid        PRIMARY KEY,
    scope               text        NOT NULL,
    idempotency_key     text        NOT NULL,
    account_id          uuid        NOT NULL REFERENCES accounts (account_id),
    -- NULL: the currency's default revenue account at capture time.
    revenue_account_id  uuid        REFERENCES accounts (account_id),
    amount              bigint      NOT NULL,
    currency            text        NOT NULL,
    -- 1 open, 2 captured, 3 released, 4 expired.
    status              smallint    NOT NULL DEFAULT 1,
    expires_at          timestamptz NOT NULL,
    captured_amount     bigint      NOT NULL DEFAULT 0,
    capture_transfer_id uuid        REFERENCES transfers (transfer_id),
    description         text        NOT NULL DEFAULT '',
    metadata            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at          timestamptz NOT NULL,
    finalized_at        timestamptz,
    created_by_client   uuid,
    created_by_key      text,
    CONSTRAINT holds_amount_positive CHECK (amount > 0),
    CONSTRAINT holds_status_valid CHECK (status IN (1, 2, 3, 4)),
    CONSTRAINT holds_expiry_after_creation CHECK (expires_at > created_at),
    -- A capture takes at most the held amount, and only a capture takes any.
    CONSTRAINT holds_captured_within_hold CHECK (captured_amount >= 0 AND captured_amount <= amount),
    CONSTRAINT holds_capture_consistent CHECK (
        (status = 2) = (capture_transfer_id IS NOT NULL) AND (status = 2 OR captured_amount = 0)),
    CONSTRAINT holds_final_consistent CHECK ((status = 1) = (finalized_at IS NULL)),
    CONSTRAINT holds_scope_key_unique UNIQUE (scope, idempotency_key)
);
CREATE INDEX holds_open_expiry_idx ON holds (account_id, expires_at) WHERE status = 1;
CREATE INDEX holds_account_created_idx ON holds (account_id, created_at);

-- A hold gets exactly one final action: it may only leave status 1, once,
-- and nothing else about it ever changes.
-- +goose StatementBegin
CREATE FUNCTION tally_hold_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'tally: % on holds is forbidden', TG_OP USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.status <> 1 OR NEW.status = 1
       OR (NEW.hold_id, NEW.scope, NEW.idempotency_key, NEW.account_id, NEW.revenue_account_id, NEW.amount,
           NEW.currency, NEW.expires_at, NEW.description, NEW.metadata, NEW.created_at,
           NEW.created_by_client, NEW.created_by_key)
          IS DISTINCT FROM
          (OLD.hold_id, OLD.scope, OLD.idempotency_key, OLD.account_id, OLD.revenue_account_id, OLD.amount,
           OLD.currency, OLD.expires_at, OLD.description, OLD.metadata, OLD.created_at,
           OLD.created_by_client, OLD.created_by_key) THEN
        RAISE EXCEPTION 'tally: hold % already has its final action', OLD.hold_id USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER holds_one_final_action BEFORE UPDATE OR DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION tally_hold_transition();
CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON holds
    FOR EACH STATEMENT EXECUTE FUNCTION tally_forbid_change();

-- Transfers: kind 4 is REFUND (of the charge refund_of); a capture's charge
-- names its hold; threshold_crossed records a low-balance crossing decided in
-- the committing transaction.
ALTER TABLE transfers
    ADD COLUMN refund_of uuid REFERENCES transfers (transfer_id),
    ADD COLUMN hold_id uuid REFERENCES holds (hold_id),
    ADD COLUMN threshold_crossed boolean NOT NULL DEFAULT false,
    DROP CONSTRAINT transfers_kind_valid,
    ADD CONSTRAINT transfers_kind_valid CHECK (kind IN (1, 2, 3, 4)),
    ADD CONSTRAINT transfers_refund_links_charge CHECK ((kind = 4) = (refund_of IS NOT NULL)),
    ADD CONSTRAINT transfers_hold_only_on_charge CHECK (hold_id IS NULL OR kind = 1);
CREATE INDEX transfers_refund_of_idx ON transfers (refund_of) WHERE refund_of IS NOT NULL;
CREATE UNIQUE INDEX transfers_one_capture_per_hold ON transfers (hold_id) WHERE hold_id IS NOT NULL;

-- How much of each refunded charge has been refunded. The sum is added by
-- the database (refunded = refunded + excluded.refunded), and the CHECK makes
-- exceeding the charge impossible whatever the service believed.
CREATE TABLE charge_refunds (
    transfer_id uuid   PRIMARY KEY REFERENCES transfers (transfer_id),
    amount      bigint NOT NULL,
    refunded    bigint NOT NULL,
    CONSTRAINT charge_refunds_within_charge CHECK (refunded > 0 AND refunded <= amount)
);

-- Idempotency keys now also name holds (Hold and ReleaseHold produce no
-- transfer), and batches have their own keys.
ALTER TABLE idempotency_keys
    ADD COLUMN hold_id uuid REFERENCES holds (hold_id),
    DROP CONSTRAINT idempotency_keys_one_outcome,
    ADD CONSTRAINT idempotency_keys_one_outcome CHECK (
        (error_reason IS NULL) <> (transfer_id IS NULL AND hold_id IS NULL));

CREATE TABLE batches (
    scope       text        NOT NULL,
    batch_key   text        NOT NULL,
    fingerprint bytea       NOT NULL,
    -- 1 ATOMIC, 2 INDEPENDENT.
    mode        smallint    NOT NULL,
    applied     boolean     NOT NULL,
    results     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT batches_pkey PRIMARY KEY (scope, batch_key),
    CONSTRAINT batches_key_length CHECK (octet_length(batch_key) BETWEEN 1 AND 128),
    CONSTRAINT batches_mode_valid CHECK (mode IN (1, 2))
);
CREATE TRIGGER batches_append_only BEFORE UPDATE OR DELETE ON batches
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_change();

-- Who changed an account's status, credit limit, threshold or metadata, and when.
CREATE TABLE account_changes (
    change_id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id        uuid        NOT NULL REFERENCES accounts (account_id),
    action            text        NOT NULL,
    version_after     bigint      NOT NULL,
    before            jsonb       NOT NULL,
    after             jsonb       NOT NULL,
    created_by_client uuid,
    created_by_key    text,
    created_at        timestamptz NOT NULL,
    CONSTRAINT account_changes_action_valid CHECK (action IN ('freeze', 'unfreeze', 'close', 'update'))
);
CREATE INDEX account_changes_account_idx ON account_changes (account_id, change_id);
CREATE TRIGGER account_changes_append_only BEFORE UPDATE OR DELETE ON account_changes
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_change();

-- A closed account holds nothing.
ALTER TABLE accounts
    ADD CONSTRAINT accounts_closed_empty CHECK (status <> 3 OR (balance = 0 AND held = 0));

-- +goose Down
ALTER TABLE accounts DROP CONSTRAINT accounts_closed_empty;
DROP INDEX accounts_next_hold_expiry_idx;
DROP TABLE account_changes;
DROP TABLE batches;
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_one_outcome,
    DROP COLUMN hold_id,
    ADD CONSTRAINT idempotency_keys_one_outcome CHECK ((transfer_id IS NULL) <> (error_reason IS NULL));
DROP TABLE charge_refunds;
DROP INDEX transfers_one_capture_per_hold;
DROP INDEX transfers_refund_of_idx;
ALTER TABLE transfers
    DROP CONSTRAINT transfers_hold_only_on_charge,
    DROP CONSTRAINT transfers_refund_links_charge,
    DROP CONSTRAINT transfers_kind_valid,
    DROP COLUMN threshold_crossed,
    DROP COLUMN hold_id,
    DROP COLUMN refund_of,
    ADD CONSTRAINT transfers_kind_valid CHECK (kind IN (1, 2, 3));
DROP TABLE holds;
DROP FUNCTION tally_hold_transition();
ALTER TABLE accounts
    DROP CONSTRAINT accounts_low_balance_threshold_range,
    DROP CONSTRAINT accounts_next_hold_expiry_set,
    DROP CONSTRAINT accounts_held_within_floor,
    DROP CONSTRAINT accounts_held_needs_floor,
    DROP CONSTRAINT accounts_held_nonnegative,
    DROP COLUMN low_balance_threshold,
    DROP COLUMN next_hold_expiry,
    DROP COLUMN held;
