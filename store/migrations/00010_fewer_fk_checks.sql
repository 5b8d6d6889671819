-- +goose Up
-- Less PostgreSQL work per posting (docs/ARCHITECTURE.md, "What the write
-- path no longer checks twice"). Measured with auto_explain (log_triggers)
-- under charge-uniform, the foreign-key triggers were about a third of the
-- statement time of a batch: seven checks per posting, each a lookup with a
-- FOR KEY SHARE lock on a row the same transaction had just locked or
-- inserted. Five of them are redundant:
--
-- * transfers_{debit,credit}_account_id_fkey: every transfer now records
--   both account types (transfers_account_types_recorded below), and the
--   composite transfers_{debit,credit}_account_type_fk check the same
--   account ids, and their types, in the same insert.
-- * entries_account_id_fkey: an entry's account is locked FOR UPDATE and
--   updated, guarded by its version, in the same transaction (a missing
--   row aborts the batch: Tx.WriteBatch's row counts).
-- * entries_transfer_id_fkey, idempotency_keys_transfer_id_fkey: the
--   transfer is inserted by the same pipelined batch, before them.
--
-- What the foreign keys also gave, that an account or transfer a row names
-- can never disappear, is kept by triggers that cost nothing on insert:
-- accounts are never deleted or truncated (below); transfers, entries and
-- keys were already append-only (00001).
--
-- Expand-only: the previous release writes both types on every transfer,
-- so the new CHECK holds for its rows too; dropping a foreign key changes
-- nothing it relies on.

-- +goose StatementBegin
CREATE FUNCTION tally_forbid_account_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'tally: % on accounts is forbidden: accounts are closed, never deleted', TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;
-- +goose StatementEnd

CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION tally_forbid_account_delete();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION tally_forbid_account_delete();

-- New transfers record both types, so the composite foreign keys check
-- every new transfer's accounts (rows from before 00006 keep NULL types:
-- they were checked by the plain foreign keys when written).
ALTER TABLE transfers
    ADD CONSTRAINT transfers_account_types_recorded
        CHECK (debit_account_type IS NOT NULL AND credit_account_type IS NOT NULL) NOT VALID;

ALTER TABLE transfers
    DROP CONSTRAINT transfers_debit_account_id_fkey,
    DROP CONSTRAINT transfers_credit_account_id_fkey;
ALTER TABLE entries
    DROP CONSTRAINT entries_account_id_fkey,
    DROP CONSTRAINT entries_transfer_id_fkey;
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_transfer_id_fkey;

-- +goose Down
ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_keys_transfer_id_fkey FOREIGN KEY (transfer_id) REFERENCES transfers (transfer_id);
ALTER TABLE entries
    ADD CONSTRAINT entries_transfer_id_fkey FOREIGN KEY (transfer_id) REFERENCES transfers (transfer_id),
    ADD CONSTRAINT entries_account_id_fkey FOREIGN KEY (account_id) REFERENCES accounts (account_id);
ALTER TABLE transfers
    ADD CONSTRAINT transfers_credit_account_id_fkey FOREIGN KEY (credit_account_id) REFERENCES accounts (account_id),
    ADD CONSTRAINT transfers_debit_account_id_fkey FOREIGN KEY (debit_account_id) REFERENCES accounts (account_id),
    DROP CONSTRAINT transfers_account_types_recorded;
DROP TRIGGER accounts_no_truncate ON accounts;
DROP TRIGGER accounts_no_delete ON accounts;
DROP FUNCTION tally_forbid_account_delete();
