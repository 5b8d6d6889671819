-- +goose Up
-- The change feed: one row per committed transfer, hold change, account
-- change and low-balance crossing, written in the same transaction as the
-- change itself (a transactional outbox).
--
-- Ordering without gaps: every row records the id of the transaction that
-- wrote it (xid). A reader only returns rows whose xid is below the xmin of
-- a fresh snapshot: every transaction with a smaller xid has finished, so no
-- row can later appear below the reader's cursor (xid, event_id). A naive
-- "event_id > cursor" would skip a transaction that took its ids early and
-- committed late. See docs/ARCHITECTURE.md.
CREATE TABLE events (
    event_id   bigint      GENERATED ALWAYS AS IDENTITY,
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    kind       text        NOT NULL,
    subject_id uuid        NOT NULL,
    account_id uuid,
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (xid, event_id),
    CONSTRAINT events_kind_valid CHECK (kind IN ('transfer', 'hold', 'account_change', 'low_balance'))
);

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION tally_forbid_change();

-- Transfers made before the feed existed (holds and account changes arrived
-- with it) join it first, in the migration's own transaction, in creation order.
INSERT INTO events (kind, subject_id, account_id, payload, created_at)
SELECT 'transfer', t.transfer_id, t.debit_account_id, jsonb_build_object(
        'ID', t.transfer_id, 'IdempotencyKey', t.idempotency_key, 'Kind', t.kind,
        'DebitAccountID', t.debit_account_id, 'CreditAccountID', t.credit_account_id, 'Amount', t.amount,
        'Currency', t.currency, 'Description', t.description, 'Metadata', t.metadata, 'CreatedAt', t.created_at,
        'CreatedByClient', coalesce(t.created_by_client, '00000000-0000-0000-0000-000000000000'::uuid),
        'CreatedByKey', coalesce(t.created_by_key, ''),
        'RefundOf', coalesce(t.refund_of, '00000000-0000-0000-0000-000000000000'::uuid),
        'HoldID', coalesce(t.hold_id, '00000000-0000-0000-0000-000000000000'::uuid),
        'ThresholdCrossed', t.threshold_crossed, 'Refunded', 0),
    t.created_at
FROM transfers t ORDER BY t.created_at, t.transfer_id;

-- +goose Down
DROP TABLE events;
