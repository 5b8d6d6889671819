package api_test

// Tally behind PgBouncer in transaction pooling mode (issue 15): the real
// server, real PostgreSQL, a real PgBouncer 1.18 with two server
// connections, so the server's many client connections take turns on them
// (which is what breaks named prepared statements and session settings).

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// pgBouncerServerConns is the pool size of the test's PgBouncer: fewer
// server connections than the store opens client connections.
const pgBouncerServerConns = 2

// startPgBouncer runs a PgBouncer in transaction mode in front of this
// package's database server and returns the package's database URL
// through it.
func startPgBouncer(t *testing.T, extra map[string]string) string {
	_, via := tallytest.StartPgBouncer(t, dbURL, pgBouncerServerConns, extra)
	return via
}

// poolerWorkload runs every kind of database access the server has, from
// several goroutines at once: account creation, credits, charges,
// transfers, group-committed and SubmitBatch batches, holds captured and
// released, strong and cached balance reads, statements (a REPEATABLE READ
// transaction), entry pages and the change feed. It returns the first
// failure. The feed must deliver every transfer of the workload's currency
// exactly once.
func poolerWorkload(ctx context.Context, env *tallytest.Env) error {
	cursor, err := env.Client.Export(ctx, "", false, func(*tallyv1.ExportTransfersResponse) error { return nil })
	if err != nil {
		return fmt.Errorf("Export (catching up): %w", err)
	}
	currency := newCurrency()
	const workers, rounds = 6, 12
	accts := make([]string, workers)
	for i := range accts {
		a, err := env.Client.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: currency})
		if err != nil {
			return fmt.Errorf("CreateAccount: %w", err)
		}
		accts[i] = a.GetAccountId()
		if _, err := env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: accts[i], Amount: 10_000, IdempotencyKey: client.NewIdempotencyKey()}); err != nil {
			return fmt.Errorf("Credit: %w", err)
		}
	}
	errc := make(chan error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- poolerWorker(ctx, env, accts[w], accts[(w+1)%workers], rounds)
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			return err
		}
	}
	var want int
	if err := env.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM transfers WHERE currency = $1`, currency).Scan(&want); err != nil {
		return fmt.Errorf("count transfers: %w", err)
	}
	seen := map[string]int{}
	if _, err := env.Client.Export(ctx, cursor, false, func(ev *tallyv1.ExportTransfersResponse) error {
		if tr := ev.GetTransfer(); tr != nil && tr.GetCurrency() == currency {
			seen[tr.GetTransferId()]++
		}
		return nil
	}); err != nil {
		return fmt.Errorf("Export: %w", err)
	}
	for id, n := range seen {
		if n != 1 {
			return fmt.Errorf("the feed delivered transfer %s %d times", id, n)
		}
	}
	if len(seen) != want {
		return fmt.Errorf("the feed delivered %d of the workload's %d transfers", len(seen), want)
	}
	return nil
}

// poolerWorker is one goroutine of poolerWorkload, moving money between
// its own account and the next worker's.
func poolerWorker(ctx context.Context, env *tallytest.Env, own, next string, rounds int) error {
	key := client.NewIdempotencyKey
	from := time.Now().Add(-time.Minute)
	for r := range rounds {
		var err error
		switch r % 6 {
		case 0:
			_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: own, Amount: 3, IdempotencyKey: key()})
		case 1:
			_, err = env.Client.Credit(ctx, &tallyv1.CreditRequest{AccountId: own, Amount: 2, IdempotencyKey: key()})
		case 2:
			_, err = env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: own, CreditAccountId: next, Amount: 5, IdempotencyKey: key()})
		case 3:
			_, err = env.Client.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: key(), Mode: tallyv1.BatchMode_BATCH_MODE_ATOMIC,
				Operations: []*tallyv1.BatchOperation{chargeOp(own, 1, key()), chargeOp(own, 2, key())}})
		case 4:
			var h *tallyv1.HoldResult
			if h, err = env.Client.Hold(ctx, &tallyv1.HoldRequest{AccountId: own, Amount: 7, IdempotencyKey: key()}); err != nil {
				break
			}
			if r%12 == 4 {
				_, err = env.Client.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: h.GetHold().GetHoldId(), Amount: 4, IdempotencyKey: key()})
			} else {
				_, err = env.Client.ReleaseHold(ctx, &tallyv1.ReleaseHoldRequest{HoldId: h.GetHold().GetHoldId(), IdempotencyKey: key()})
			}
		case 5:
			for _, c := range []tallyv1.Consistency{tallyv1.Consistency_CONSISTENCY_STRONG, tallyv1.Consistency_CONSISTENCY_UNSPECIFIED} {
				if _, err = env.Client.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: own, Consistency: c}); err != nil {
					break
				}
			}
			if err == nil {
				_, err = env.Client.GetStatement(ctx, &tallyv1.GetStatementRequest{AccountId: own,
					From: timestamppb.New(from), To: timestamppb.New(time.Now()), PageSize: 50})
			}
			if err == nil {
				_, err = env.Client.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: own, PageSize: 50})
			}
		}
		if err != nil {
			return fmt.Errorf("round %d: %w", r, err)
		}
	}
	return nil
}

// With --database-pooler transaction everything works through PgBouncer
// in transaction mode with two server connections: the workload above,
// API key checks, a top-up job (River polling, not LISTEN), and the books
// sum to zero.
func TestTransactionPoolerServesEverything(t *testing.T) {
	t.Parallel()
	via := startPgBouncer(t, nil)
	srv := startStripe(t)
	o := tallytest.Options{DatabaseURL: via, Pooler: store.PoolerTransaction, RedisURL: tallytest.RedisURL()}
	topupOptions(srv)(&o)
	env := tallytest.Start(t, o)
	ctx := ctxT(t)
	if err := env.Store.CheckSchema(ctx); err != nil {
		t.Fatalf("CheckSchema through PgBouncer: %v", err)
	}
	if err := poolerWorkload(ctx, env); err != nil {
		t.Fatalf("workload through PgBouncer with Pooler transaction: %v", err)
	}
	// A top-up: River inserts the job in the charge's transaction and a
	// polling worker finds it.
	acct := createAccount(t, env, "USD").GetAccountId()
	setRule(t, env, acct, ruleSpec{threshold: 100, target: 1000, amountMax: 1000, perDayMax: 10_000})
	credit(t, env, acct, 500)
	chargeOK(t, env, acct, 450)
	xs := waitTopUp(t, env, acct, 1, 30*time.Second)
	paidOnce(t, env, srv, xs[0])
	if b := strongBalance(t, env, acct); b.GetBalance() != 1000 {
		t.Fatalf("balance after the top-up %d, want 1000", b.GetBalance())
	}
	env.CheckBooks(t)
	// More client connections than PgBouncer has server connections: they
	// did share server connections.
	if n := env.Store.Pool().Stat().TotalConns(); n <= pgBouncerServerConns {
		t.Fatalf("the store opened %d connections; the test needs more than PgBouncer's %d server connections", n, pgBouncerServerConns)
	}
}

// The negative control: the same workload with the pooler setting wrong
// (none) through the same kind of PgBouncer fails. Both ways it can fail
// are shown: PgBouncer refusing the statement_timeout startup parameter
// (its default), and, where it is told to ignore such parameters, pgx's
// named prepared statements meeting a server connection that another
// client used ("prepared statement ... already exists" or "does not
// exist"). The cause is read from the store's own errors.
func TestNoPoolerSettingFailsBehindPgBouncer(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		extra map[string]string
		want  string // in the cause of the store's errors
	}{
		// Either timeout may be refused first: pgx sends its startup
		// parameters in map order.
		{"startup parameters refused", nil, "unsupported startup parameter: "},
		{"startup parameters ignored", map[string]string{
			"ignore_startup_parameters": "extra_float_digits,statement_timeout,idle_in_transaction_session_timeout",
		}, "prepared statement"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			via := startPgBouncer(t, c.extra)
			env := tallytest.Start(t, tallytest.Options{DatabaseURL: via, Pooler: store.PoolerNone, NoAuth: true, ClientPolicy: noRetry})
			ctx := ctxT(t)
			err := poolerWorkload(ctx, env)
			if err == nil {
				t.Fatal("the workload succeeded through PgBouncer in transaction mode with Pooler none; it must fail")
			}
			if code := status.Code(errors.Unwrap(err)); code != codes.Unavailable && code != codes.Internal {
				t.Fatalf("workload: %v, want UNAVAILABLE or INTERNAL", err)
			}
			if cause := storeFailure(ctx, env.Store); !strings.Contains(cause, c.want) {
				t.Fatalf("workload failed (%v), but the store's errors say %q, not %q", err, cause, c.want)
			} else {
				t.Logf("failed as it must: %v; the store's error: %s", err, cause)
			}
		})
	}
}

// storeFailure runs one parameterized read on several of the store's
// connections at once and returns the cause of the first error ("" if
// none failed).
func storeFailure(ctx context.Context, st *store.Store) string {
	var mu sync.Mutex
	var first string
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10 {
				_, err := st.GetTransfer(ctx, uuid.New())
				var se *store.Error
				if errors.Is(err, store.ErrNotFound) || !errors.As(err, &se) {
					continue
				}
				mu.Lock()
				if first == "" {
					first = se.Cause().Error()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return first
}
