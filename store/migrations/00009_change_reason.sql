-- +goose Up
-- Why an account was frozen or unfrozen (issue 14: the support console
-- requires a reason), recorded with who in account_changes. Expand-only: a
-- previous tallyd does not name the column and gets the default.
ALTER TABLE account_changes ADD COLUMN reason text NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE account_changes DROP COLUMN reason;
