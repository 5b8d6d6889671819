-- +goose Up
-- Auto top-up (issue 13): one rule per customer account, and a record of
-- every top-up written before the card is charged.
--
-- accounts.topup_threshold mirrors the threshold of the account's rule while
-- the rule is active (enabled and not disabled by failures), NULL otherwise.
-- The write path already reads every locked account row, so it learns from
-- that one column, with no extra statement, whether a batch may have to
-- start a top-up; only a batch that leaves an account below it runs the
-- top-up statements, which read the rule itself under the account's lock.
-- Expand-only: a previous tallyd ignores the column.
ALTER TABLE accounts ADD COLUMN topup_threshold bigint;

CREATE TABLE topup_rules (
    account_id           uuid        PRIMARY KEY REFERENCES accounts (account_id),
    -- Only CUSTOMER accounts (type 1) with a floor (1) have rules; the
    -- composite key proves the recorded type is the account's.
    account_type         smallint    NOT NULL DEFAULT 1,
    currency             text        NOT NULL,
    enabled              boolean     NOT NULL,
    threshold            bigint      NOT NULL,
    target_balance       bigint      NOT NULL,
    amount_max           bigint      NOT NULL,
    per_day_max          bigint      NOT NULL,
    provider_customer_id text        NOT NULL,
    payment_method_id    text        NOT NULL,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    disabled_reason      text        NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT topup_rules_account_type_fk FOREIGN KEY (account_id, account_type)
        REFERENCES accounts (account_id, type),
    CONSTRAINT topup_rules_customer_only CHECK (account_type = 1),
    CONSTRAINT topup_rules_threshold_below_target CHECK (threshold < target_balance),
    CONSTRAINT topup_rules_amount_max_positive CHECK (amount_max > 0),
    CONSTRAINT topup_rules_per_day_max_positive CHECK (per_day_max > 0),
    CONSTRAINT topup_rules_failures_nonnegative CHECK (consecutive_failures >= 0),
    CONSTRAINT topup_rules_provider_ids CHECK (
        octet_length(provider_customer_id) BETWEEN 1 AND 255 AND octet_length(payment_method_id) BETWEEN 1 AND 255)
);

-- Top-up statuses: 1 PENDING (recorded; the payment may or may not have
-- happened), 2 SUCCEEDED (paid and credited), 3 FAILED (declined: nothing
-- was charged).
CREATE TABLE topups (
    topup_id             uuid        PRIMARY KEY,
    account_id           uuid        NOT NULL REFERENCES topup_rules (account_id),
    status               smallint    NOT NULL DEFAULT 1,
    amount               bigint      NOT NULL,
    currency             text        NOT NULL,
    -- The UTC day the top-up counts against per_day_max.
    day                  date        NOT NULL,
    provider_customer_id text        NOT NULL,
    payment_method_id    text        NOT NULL,
    -- The committed debit that started it: a transfer (charge, capture) or
    -- a hold.
    trigger_transfer_id  uuid        REFERENCES transfers (transfer_id),
    trigger_hold_id      uuid        REFERENCES holds (hold_id),
    provider_payment_id  text        NOT NULL DEFAULT '',
    credit_transfer_id   uuid        REFERENCES transfers (transfer_id),
    failure_code         text        NOT NULL DEFAULT '',
    failure_reason       text        NOT NULL DEFAULT '',
    attempts             integer     NOT NULL DEFAULT 0,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    finished_at          timestamptz,
    CONSTRAINT topups_status_valid CHECK (status IN (1, 2, 3)),
    CONSTRAINT topups_amount_positive CHECK (amount > 0),
    CONSTRAINT topups_has_trigger CHECK (trigger_transfer_id IS NOT NULL OR trigger_hold_id IS NOT NULL),
    -- SUCCEEDED means paid and credited; only a finished top-up has a
    -- finish time.
    CONSTRAINT topups_succeeded_complete CHECK (
        status <> 2 OR (provider_payment_id <> '' AND credit_transfer_id IS NOT NULL)),
    CONSTRAINT topups_finished_consistent CHECK ((status = 1) = (finished_at IS NULL)),
    CONSTRAINT topups_attempts_nonnegative CHECK (attempts >= 0)
);
-- At most one top-up in flight per account.
CREATE UNIQUE INDEX topups_one_in_flight ON topups (account_id) WHERE status = 1;
-- ListTopUps pages by topup_id (UUIDv7: creation order).
CREATE INDEX topups_account_idx ON topups (account_id, topup_id);
CREATE UNIQUE INDEX topups_credit_unique ON topups (credit_transfer_id) WHERE credit_transfer_id IS NOT NULL;

-- What each account's top-ups of a UTC day add up to, against the rule's
-- cap at the time: the database refuses a top-up beyond per_day_max.
CREATE TABLE topup_days (
    account_id  uuid   NOT NULL REFERENCES topup_rules (account_id),
    day         date   NOT NULL,
    amount      bigint NOT NULL,
    per_day_max bigint NOT NULL,
    CONSTRAINT topup_days_pkey PRIMARY KEY (account_id, day),
    CONSTRAINT topup_days_within_cap CHECK (amount > 0 AND amount <= per_day_max)
);

ALTER TABLE account_changes DROP CONSTRAINT account_changes_action_valid,
    ADD CONSTRAINT account_changes_action_valid CHECK (action IN ('freeze', 'unfreeze', 'close', 'update', 'auto_topup'));
ALTER TABLE events DROP CONSTRAINT events_kind_valid,
    ADD CONSTRAINT events_kind_valid CHECK (kind IN ('transfer', 'hold', 'account_change', 'low_balance', 'topup'));

-- +goose Down
ALTER TABLE events DROP CONSTRAINT events_kind_valid,
    ADD CONSTRAINT events_kind_valid CHECK (kind IN ('transfer', 'hold', 'account_change', 'low_balance'));
ALTER TABLE account_changes DROP CONSTRAINT account_changes_action_valid,
    ADD CONSTRAINT account_changes_action_valid CHECK (action IN ('freeze', 'unfreeze', 'close', 'update'));
DROP TABLE topup_days;
DROP TABLE topups;
DROP TABLE topup_rules;
ALTER TABLE accounts DROP COLUMN topup_threshold;
