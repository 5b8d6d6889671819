package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// What sits between tallyd and PostgreSQL (Config.Pooler, tallyd
// --database-pooler).
const (
	// PoolerNone: tallyd talks to PostgreSQL itself, or through a TCP
	// proxy that passes one server session per client connection through
	// untouched (HAProxy).
	PoolerNone = "none"
	// PoolerTransaction: a pooler that lends a server connection for one
	// transaction at a time and keeps no session state across them
	// (PgBouncer in transaction or statement mode). PgBouncer in session
	// mode needs it too, since PgBouncer refuses the startup parameters
	// of PoolerNone. docs/OPERATIONS.md, "Behind PgBouncer", says what
	// changes.
	PoolerTransaction = "transaction"
)

// Poolers are the values Config.Pooler accepts ("" means PoolerNone).
var Poolers = []string{PoolerNone, PoolerTransaction}

// ParsePooler checks a --database-pooler value, answering with the list of
// valid ones.
func ParsePooler(s string) (string, error) {
	for _, p := range Poolers {
		if s == p {
			return s, nil
		}
	}
	return "", fmt.Errorf("unknown pooler %q: want one of %s", s, strings.Join(Poolers, ", "))
}

// poolerExecMode is the statement mode used behind a transaction pooler.
//
// pgx's default, QueryExecModeCacheStatement, prepares a named statement
// once per client connection and executes it by name afterwards. Behind a
// transaction pooler the client connection's next transaction may run on
// another server connection, which never saw that Parse ("prepared
// statement ... does not exist"), or on one where another client already
// prepared the same name ("... already exists"). PgBouncer before 1.21
// does not track prepared statements at all.
//
// QueryExecModeCacheDescribe caches only the statement's description
// (parameter and result types) in the client, and executes every query as
// Parse of the unnamed statement + Bind + Execute in one message group
// that the pooler forwards to a single server connection. So it keeps one
// round trip per query once described, binary parameter and result
// formats (the uuid codec registered in Open, the int64 arrays of a
// batch), and pgx pipelines (SendBatch): a batch's queries go out under
// one Sync. When a description is missing, pgx first describes the query
// through the unnamed statement in a round trip of its own; that round trip
// may land on another server connection than the execution, which is
// harmless because the execution parses the SQL again and the description
// is only types, the same on every connection to one database.
//
// QueryExecModeExec is safe too but sends and reads everything as text:
// types are guessed from Go values (ambiguous ones are refused) and every
// uuid and array is formatted and parsed. QueryExecModeSimpleProtocol
// interpolates parameters into the SQL on the client and loses the
// distinction between []byte and text. QueryExecModeDescribeExec describes
// through the unnamed statement and then executes it in a second round trip,
// which a transaction pooler may send to another server outside a
// transaction.
const poolerExecMode = pgx.QueryExecModeCacheDescribe

// sessionTimeouts are the statement timeouts tallyd wants on its server
// sessions; direct connections get them as startup parameters.
func sessionTimeouts(statementTimeout time.Duration) map[string]string {
	return map[string]string{
		"statement_timeout":                   fmt.Sprint(statementTimeout.Milliseconds()),
		"idle_in_transaction_session_timeout": fmt.Sprint((2 * statementTimeout).Milliseconds()),
	}
}

// txSettings is what each transaction sets for itself behind a transaction
// pooler, where the session belongs to the pooler: PgBouncer 1.18 refuses
// any startup parameter it does not know, and a plain SET would outlive
// the transaction on a server connection that other clients use next. SET
// LOCAL ends with the transaction; it is sent in the same simple-protocol
// message as BEGIN, so it costs no round trip.
func txSettings(statementTimeout time.Duration) string {
	var b strings.Builder
	for _, name := range []string{"statement_timeout", "idle_in_transaction_session_timeout"} {
		fmt.Fprintf(&b, "; SET LOCAL %s = %s", name, sessionTimeouts(statementTimeout)[name])
	}
	return b.String()
}

// beginSQL renders the BEGIN of opts (pgx ignores the options once
// TxOptions.BeginQuery is set, so they are spelled out here).
func beginSQL(opts pgx.TxOptions) string {
	s := "BEGIN"
	if opts.IsoLevel != "" {
		s += " ISOLATION LEVEL " + string(opts.IsoLevel)
	}
	if opts.AccessMode != "" {
		s += " " + string(opts.AccessMode)
	}
	if opts.DeferrableMode != "" {
		s += " " + string(opts.DeferrableMode)
	}
	return s
}

// begin starts a transaction on the pool, with the per-transaction timeouts
// when the store is behind a transaction pooler.
func (s *Store) begin(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error) {
	if s.txSettings != "" {
		opts.BeginQuery = beginSQL(opts) + s.txSettings
	}
	return s.pool.BeginTx(ctx, opts)
}

// TransactionPooler reports whether the store runs behind a transaction
// pooler, where nothing may rely on a server session outliving one
// transaction (River must poll instead of LISTEN).
func (s *Store) TransactionPooler() bool { return s.pooler == PoolerTransaction }

// ServerStatementTimeout returns the statement_timeout that statements
// outside an explicit transaction run with ("0" is none). Behind a
// transaction pooler it is the role's or database's default (ALTER ROLE
// ... SET), since the store cannot set it on the session.
func (s *Store) ServerStatementTimeout(ctx context.Context) (string, error) {
	var v string
	err := s.pool.QueryRow(ctx, `SELECT current_setting('statement_timeout')`).Scan(&v)
	return v, translate(err)
}

// PoolerRefusal returns the server's message when err is a server
// refusing one of the store's startup parameters, as PgBouncer does
// ("unsupported startup parameter: statement_timeout") when the store was
// opened with PoolerNone in front of it; "" for any other error. Such an
// error is ErrUnavailable to callers; tallyd checks for it at startup to
// fail with a clear message instead of waiting for a database that will
// never accept it.
func PoolerRefusal(err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		var se *Error
		if !errors.As(err, &se) || !errors.As(se.cause, &pgErr) {
			return ""
		}
	}
	if pgErr.Code != pgerrcode.ProtocolViolation || !strings.Contains(pgErr.Message, "unsupported startup parameter") {
		return ""
	}
	return pgErr.Message
}
