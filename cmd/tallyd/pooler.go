package main

import (
	"context"
	"flag"
	"log/slog"
	"strings"

	"github.com/tallyledger/tally/store"
)

// poolerFlag is --database-pooler: what sits between tallyd and PostgreSQL.
// Set refuses values other than store.Poolers, naming them.
type poolerFlag struct{ v string }

func (p *poolerFlag) register(fs *flag.FlagSet) {
	fs.Var(p, "database-pooler", "the `pooler` --database-url reaches: none (the default: PostgreSQL itself, or a TCP proxy such as "+
		"HAProxy) or transaction (PgBouncer, in any pool mode, or any pooler that may hand a client's next transaction to another "+
		"server connection: no named prepared statements, no startup parameter but application_name, timeouts set per transaction, "+
		"top-up jobs polled instead of LISTEN; --migrate and `tallyd migrate` then need a URL that reaches PostgreSQL directly)")
}

func (p *poolerFlag) String() string { return p.get() }

// Set implements flag.Value.
func (p *poolerFlag) Set(s string) error {
	v, err := store.ParsePooler(strings.TrimSpace(s))
	if err != nil {
		return err
	}
	p.v = v
	return nil
}

// get returns the value, store.PoolerNone when unset.
func (p *poolerFlag) get() string {
	if p == nil || p.v == "" {
		return store.PoolerNone
	}
	return p.v
}

// warnUnboundedStatements logs when statements outside a transaction run
// without a statement_timeout. Behind a transaction pooler tallyd bounds
// each of its transactions itself (SET LOCAL, store.Config.Pooler), but
// cannot set the session: a single statement outside a transaction (a
// balance read, the feed's read, River's polls) runs with the role's or
// database's default, ended only by the call's deadline (pgx then sends a
// cancel request, which PgBouncer forwards). The fix is on the server side,
// so it is a warning, not a refusal.
func warnUnboundedStatements(ctx context.Context, st *store.Store, log *slog.Logger) {
	stmt, err := st.ServerStatementTimeout(ctx)
	if err != nil {
		log.Warn("reading the server's statement_timeout", "err", err.Error())
		return
	}
	if stmt == "0" {
		log.Warn("behind --database-pooler transaction, statements outside a transaction run without a server-side timeout: "+
			"set one for tallyd's role, e.g. ALTER ROLE tally SET statement_timeout = '10s' (docs/OPERATIONS.md, \"Behind PgBouncer\")",
			"statement_timeout", stmt)
	}
}
