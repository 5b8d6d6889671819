package localsvc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Bounds of the replication helpers.
const (
	// baseBackupTimeout bounds one pg_basebackup of a small test cluster.
	baseBackupTimeout = 2 * time.Minute
	// promoteTimeout bounds pg_ctl promote's wait for the standby to leave
	// recovery.
	promoteTimeout = 60 * time.Second
)

// BaseBackup takes a base backup of this running server with pg_basebackup
// into dir/data (with the WAL it needs, streamed), so that
// StartPostgres(PostgresOptions{Dir: dir}) starts a copy of it. args are
// extra pg_basebackup arguments: "-R" makes the copy a streaming standby of
// this server (standby.signal and primary_conninfo). The server must allow
// replication connections (wal_level replica and max_wal_senders > 0, the
// defaults; initdb's trust pg_hba admits local replication). dir must not
// exist yet or be empty.
func (p *Postgres) BaseBackup(ctx context.Context, dir string, args ...string) error {
	ctx, cancel := withDefaultTimeout(ctx, baseBackupTimeout)
	defer cancel()
	bin := filepath.Join(filepath.Dir(p.bin), "pg_basebackup")
	dir, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	if err := p.chown(dir); err != nil {
		return err
	}
	if p.cred != nil {
		if err := ensureTraversable(dir, p.cred); err != nil {
			return err
		}
	}
	full := append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(p.Port()), "-U", "postgres",
		"-D", filepath.Join(dir, "data"), "-X", "stream", "-c", "fast", "--no-sync"}, args...)
	if err := p.runTool(ctx, bin, dir, full...); err != nil {
		return fmt.Errorf("localsvc: pg_basebackup: %w", err)
	}
	return nil
}

// Promote turns a standby into a primary (pg_ctl promote --wait) and
// returns once it accepts writes.
func (p *Postgres) Promote(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, promoteTimeout)
	defer cancel()
	bin := filepath.Join(filepath.Dir(p.bin), "pg_ctl")
	if err := p.runTool(ctx, bin, p.dataDir, "promote", "-D", p.dataDir, "-w", "-t", strconv.Itoa(int(promoteTimeout.Seconds()))); err != nil {
		return fmt.Errorf("localsvc: pg_ctl promote: %w", err)
	}
	return p.waitPrimary(ctx)
}

// StartPostgresRecovering starts a server from a restored base backup in
// opts.Dir/data in targeted archive recovery: it writes recovery.signal and
// starts the server with opts.ExtraConf, which must hold the recovery
// settings (restore_command, a recovery_target_* and
// recovery_target_action = 'promote'). It returns once recovery has
// reached its target and the server accepts writes.
func StartPostgresRecovering(ctx context.Context, opts PostgresOptions) (*Postgres, error) {
	ctx, cancel := withDefaultTimeout(ctx, pgStartTimeout+promoteTimeout)
	defer cancel()
	data := filepath.Join(opts.Dir, "data")
	if _, err := os.Stat(filepath.Join(data, "PG_VERSION")); err != nil {
		return nil, fmt.Errorf("localsvc: no base backup in %s: %w", data, err)
	}
	signal := filepath.Join(data, "recovery.signal")
	if err := os.WriteFile(signal, nil, 0o600); err != nil {
		return nil, fmt.Errorf("localsvc: %w", err)
	}
	cred, err := serverCredential()
	if err != nil {
		return nil, err
	}
	if cred != nil {
		if err := os.Chown(signal, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, fmt.Errorf("localsvc: %w", err)
		}
	}
	p, err := StartPostgres(ctx, opts)
	if err != nil {
		return nil, err
	}
	if err := p.waitPrimary(ctx); err != nil {
		_ = p.Close()
		return nil, fmt.Errorf("%w\n--- postgres log ---\n%s", err, logSince(p.logPath, 0, 4096))
	}
	return p, nil
}

// waitPrimary waits until the server has left recovery.
func (p *Postgres) waitPrimary(ctx context.Context) error {
	for {
		conn, err := pgx.Connect(ctx, p.URL("postgres"))
		if err == nil {
			var inRecovery bool
			err = conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery)
			conn.Close(context.Background())
			if err == nil && !inRecovery {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("localsvc: server still in recovery: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// DataDir returns the server's data directory.
func (p *Postgres) DataDir() string { return p.dataDir }

// MakeServerDir creates dir (and its parents) owned by the server user, for
// files the server itself writes, such as a WAL archive.
func (p *Postgres) MakeServerDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("localsvc: %w", err)
	}
	if p.cred != nil {
		if err := ensureTraversable(filepath.Dir(dir), p.cred); err != nil {
			return err
		}
	}
	return p.chown(dir)
}

// runTool runs a PostgreSQL client program as the server user.
func (p *Postgres) runTool(ctx context.Context, bin, dir string, args ...string) error {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	cmd.Env = filteredEnv()
	cmd.SysProcAttr = sysProcAttr(p.cred, syscall.SIGKILL)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ctx.Err() != nil {
			err = errors.Join(err, ctx.Err())
		}
		return fmt.Errorf("%w\n%s", err, strings.TrimSpace(string(out)))
	}
	return nil
}
