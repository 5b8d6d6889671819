-- +goose Up
-- Authentication: clients (stable identities with a role) and their API keys,
-- and the audit trail of who created each transfer.

-- A client is a product service, the support team, a reconciliation job...
-- Its client_id is its idempotency scope: every key of one client shares it,
-- so a retry sent with a rotated key still replays.
CREATE TABLE clients (
    client_id  uuid        PRIMARY KEY,
    name       text        NOT NULL,
    role       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT clients_name_unique UNIQUE (name),
    CONSTRAINT clients_name_length CHECK (octet_length(name) BETWEEN 1 AND 128),
    CONSTRAINT clients_role_valid CHECK (role IN ('charger', 'viewer', 'support', 'reconciler', 'admin'))
);

-- An API key is "tly_<key_id>_<secret>". Only the SHA-256 of the secret is
-- stored; the secret is shown once, when the key is created. Keys are never
-- deleted, only revoked, so the audit trail always names a known key.
CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    client_id    uuid        NOT NULL REFERENCES clients (client_id),
    name         text        NOT NULL,
    role         text        NOT NULL,
    secret_hash  bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Updated in batches, off the calls' critical path (at most a flush
    -- interval behind).
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT api_keys_key_id_format CHECK (key_id ~ '^[a-z2-7]{12}$'),
    CONSTRAINT api_keys_name_length CHECK (octet_length(name) BETWEEN 1 AND 128),
    CONSTRAINT api_keys_role_valid CHECK (role IN ('charger', 'viewer', 'support', 'reconciler', 'admin')),
    CONSTRAINT api_keys_secret_hash_length CHECK (octet_length(secret_hash) = 32)
);
CREATE INDEX api_keys_client_idx ON api_keys (client_id);

-- Who moved money. NULL for transfers written before authentication existed
-- or by a tallyd run with --insecure-no-auth. created_by_key is an api_keys
-- key_id, or "tls:CN=<name>" for a caller authenticated by a mapped client
-- certificate, so it carries no foreign key.
ALTER TABLE transfers
    ADD COLUMN created_by_client uuid,
    ADD COLUMN created_by_key    text;

-- +goose Down
ALTER TABLE transfers
    DROP COLUMN created_by_key,
    DROP COLUMN created_by_client;
DROP TABLE api_keys;
DROP TABLE clients;
