package store

import (
	"context"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Client is a clients row: a stable identity with a role.
type Client struct {
	ID        uuid.UUID
	Name      string
	Role      string
	CreatedAt time.Time
}

// APIKey is an api_keys row. SecretHash is the SHA-256 of the key's secret;
// the secret itself is never stored.
type APIKey struct {
	ID         string
	ClientID   uuid.UUID
	ClientName string // filled by ListAPIKeys
	Name       string
	Role       string
	SecretHash []byte
	CreatedAt  time.Time
	LastUsedAt *time.Time
	RevokedAt  *time.Time
}

const clientCols = `client_id, name, role, created_at`

func scanClient(r rowScanner) (Client, error) {
	var c Client
	err := r.Scan(&c.ID, &c.Name, &c.Role, &c.CreatedAt)
	return c, err
}

// CreateClient inserts a client. A taken name is ErrConflict.
func (s *Store) CreateClient(ctx context.Context, c Client) (Client, error) {
	out, err := scanClient(s.pool.QueryRow(ctx, `INSERT INTO clients (client_id, name, role) VALUES ($1, $2, $3)
		RETURNING `+clientCols, c.ID, c.Name, c.Role))
	return out, translate(err)
}

// GetClientByName returns a client by name.
func (s *Store) GetClientByName(ctx context.Context, name string) (Client, error) {
	c, err := scanClient(s.pool.QueryRow(ctx, `SELECT `+clientCols+` FROM clients WHERE name = $1`, name))
	return c, translate(err)
}

// GetClient returns a client by id.
func (s *Store) GetClient(ctx context.Context, id uuid.UUID) (Client, error) {
	c, err := scanClient(s.pool.QueryRow(ctx, `SELECT `+clientCols+` FROM clients WHERE client_id = $1`, id))
	return c, translate(err)
}

const apiKeyCols = `k.key_id, k.client_id, c.name, k.name, k.role, k.secret_hash, k.created_at, k.last_used_at, k.revoked_at`

func scanAPIKey(r rowScanner) (APIKey, error) {
	var k APIKey
	err := r.Scan(&k.ID, &k.ClientID, &k.ClientName, &k.Name, &k.Role, &k.SecretHash, &k.CreatedAt, &k.LastUsedAt, &k.RevokedAt)
	return k, err
}

// CreateAPIKey inserts a key.
func (s *Store) CreateAPIKey(ctx context.Context, k APIKey) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO api_keys (key_id, client_id, name, role, secret_hash) VALUES ($1, $2, $3, $4, $5)`,
		k.ID, k.ClientID, k.Name, k.Role, k.SecretHash)
	return translate(err)
}

// GetAPIKey returns a key by id, revoked or not.
func (s *Store) GetAPIKey(ctx context.Context, id string) (APIKey, error) {
	k, err := scanAPIKey(s.pool.QueryRow(ctx, `SELECT `+apiKeyCols+`
		FROM api_keys k JOIN clients c ON c.client_id = k.client_id WHERE k.key_id = $1`, id))
	return k, translate(err)
}

// ListAPIKeys returns every key, oldest first.
func (s *Store) ListAPIKeys(ctx context.Context) ([]APIKey, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+apiKeyCols+`
		FROM api_keys k JOIN clients c ON c.client_id = k.client_id ORDER BY k.created_at, k.key_id`)
	if err != nil {
		return nil, translate(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (APIKey, error) { return scanAPIKey(r) })
	return out, translate(err)
}

// RevokeAPIKey marks a key revoked (keeping the first revocation time) and
// returns it. An unknown key is ErrNotFound.
func (s *Store) RevokeAPIKey(ctx context.Context, id string) (APIKey, error) {
	k, err := scanAPIKey(s.pool.QueryRow(ctx, `WITH k AS (
		UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp()) WHERE key_id = $1 RETURNING *)
		SELECT `+apiKeyCols+` FROM k JOIN clients c ON c.client_id = k.client_id`, id))
	return k, translate(err)
}

// ActiveAPIKeys counts keys that are not revoked.
func (s *Store) ActiveAPIKeys(ctx context.Context) (int64, error) {
	var n int64
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM api_keys WHERE revoked_at IS NULL`).Scan(&n)
	return n, translate(err)
}

// TouchAPIKeys records when keys were last used, in one statement. A time
// never moves last_used_at backwards.
func (s *Store) TouchAPIKeys(ctx context.Context, used map[string]time.Time) error {
	if len(used) == 0 {
		return nil
	}
	ids := make([]string, 0, len(used))
	ats := make([]time.Time, 0, len(used))
	for id, at := range used {
		ids = append(ids, id)
		ats = append(ats, at)
	}
	_, err := s.pool.Exec(ctx, `UPDATE api_keys k SET last_used_at = u.at
		FROM unnest($1::text[], $2::timestamptz[]) AS u(id, at)
		WHERE k.key_id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)`, ids, ats)
	return translate(err)
}
