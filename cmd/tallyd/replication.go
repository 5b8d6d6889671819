package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/tallyledger/tally/store"
)

// replicationVerdict says whether PostgreSQL's settings make an
// acknowledged charge survive the loss of the primary: commits must wait
// for a standby to flush (synchronous_commit on or remote_apply) and there
// must be a synchronous standby to wait for (synchronous_standby_names).
func replicationVerdict(synchronousCommit, standbyNames string) (safe bool, why string) {
	switch {
	case standbyNames == "":
		return false, "synchronous_standby_names is empty: commits do not wait for any standby, so a failover can lose acknowledged charges"
	case synchronousCommit != "on" && synchronousCommit != "remote_apply":
		return false, fmt.Sprintf("synchronous_commit=%s: commits do not wait for the standby to flush, so a failover can lose acknowledged charges", synchronousCommit)
	}
	return true, ""
}

// checkReplication logs whether an acknowledged charge survives losing the
// primary, and refuses to start when require is set and it would not.
func checkReplication(ctx context.Context, st *store.Store, require bool, log *slog.Logger) error {
	var syncCommit, names string
	err := st.Pool().QueryRow(ctx, `SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names')`).
		Scan(&syncCommit, &names)
	if err != nil {
		return fmt.Errorf("reading PostgreSQL's replication settings: %w", err)
	}
	safe, why := replicationVerdict(syncCommit, names)
	switch {
	case safe:
		log.Info("synchronous replication: an acknowledged charge survives the loss of the primary",
			"synchronous_commit", syncCommit, "synchronous_standby_names", names)
	case require:
		return fmt.Errorf("--require-synchronous-commit: %s. Set synchronous_standby_names and synchronous_commit=on on the primary, "+
			"or drop the flag to accept the risk", why)
	default:
		log.Warn("no synchronous replication: "+why+" (pass --require-synchronous-commit to refuse to start)",
			"synchronous_commit", syncCommit, "synchronous_standby_names", names)
	}
	return nil
}
