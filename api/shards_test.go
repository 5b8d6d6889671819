package api_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// shardRows returns the balance of each row of account id (its own row and
// every shard), straight from PostgreSQL.
func shardRows(t *testing.T, env *tallytest.Env, id string) map[string]int64 {
	t.Helper()
	rows, err := env.Store.Pool().Query(context.Background(),
		`SELECT account_id::text, balance FROM accounts WHERE account_id = $1 OR shard_of = $1`, id)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var a string
		var b int64
		if err := rows.Scan(&a, &b); err != nil {
			t.Fatal(err)
		}
		out[a] = b
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// A system account's balance, history, usage and reconciliation are exactly
// the sum of its shards, after concurrent charges spread over the
// committers' shards.
func TestShardedSystemAccountIsSumOfShards(t *testing.T) {
	t.Parallel()
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL(),
		Batch: ledger.BatchConfig{WorkersMax: 4}})
	ctx := ctxT(t)
	cur := newCurrency()
	const customers, charges = 16, 12
	accts := make([]string, customers)
	for i := range accts {
		accts[i] = createAccount(t, env, cur).GetAccountId()
		credit(t, env, accts[i], 10_000)
	}
	var (
		mu      sync.Mutex
		total   int64
		revenue string
		shards  = map[string]bool{}
		wg      sync.WaitGroup
	)
	for i, a := range accts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range charges {
				amount := int64(1 + (i*charges+j)%97)
				res, err := env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a, Amount: amount, IdempotencyKey: client.NewIdempotencyKey()})
				if err != nil {
					t.Error(err)
					return
				}
				tr := res.GetTransfer()
				mu.Lock()
				total += amount
				revenue = tr.GetCreditAccountId()
				shard := tr.GetCreditShardId()
				if shard == "" {
					shard = tr.GetCreditAccountId() // shard 0: the account's own row
				}
				shards[shard] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	rows := shardRows(t, env, revenue)
	if len(rows) != ledger.SystemShardsDefault {
		t.Fatalf("revenue account %s has %d rows, want %d shards", revenue, len(rows), ledger.SystemShardsDefault)
	}
	var sum int64
	used := 0
	for id, b := range rows {
		sum += b
		if b != 0 {
			used++
			if !shards[id] {
				t.Errorf("shard %s holds %d but no charge named it as its credit shard", id, b)
			}
		}
	}
	if sum != total || used < 2 {
		t.Fatalf("shards sum to %d over %d shards, want %d over at least 2", sum, used, total)
	}

	// Balance, now and at an instant, from the store and never the cache.
	for _, c := range []tallyv1.Consistency{tallyv1.Consistency_CONSISTENCY_CACHED, tallyv1.Consistency_CONSISTENCY_STRONG} {
		b, err := env.Client.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: revenue, Consistency: c})
		if err != nil || b.GetBalance() != total || b.GetSource() != tallyv1.BalanceSource_BALANCE_SOURCE_STORE {
			t.Fatalf("%s read of the revenue account: %v %v, want %d from the store", c, b, err, total)
		}
	}
	at, err := env.Client.GetBalances(ctx, &tallyv1.GetBalancesRequest{AccountIds: []string{revenue}, At: timestamppb.Now()})
	if err != nil || len(at.GetBalances()) != 1 || at.GetBalances()[0].GetBalance() != total {
		t.Fatalf("balance at now: %v %v, want %d", at, err, total)
	}
	if acct, err := env.Client.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: revenue}); err != nil || acct.GetShardOf() != "" || acct.GetShardCount() != ledger.SystemShardsDefault-1 {
		t.Fatalf("GetAccount: %v %v, want the account itself with %d further shards", acct, err, ledger.SystemShardsDefault-1)
	}

	// History: every charge once, each entry naming its shard, pages
	// running across shards.
	var entries, entrySum int64
	seen := map[string]bool{}
	tok := ""
	for page := 0; ; page++ {
		res, err := env.Client.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: revenue, PageSize: 7, PageToken: tok})
		if err != nil {
			t.Fatalf("page %d: %v", page, err)
		}
		for _, e := range res.GetEntries() {
			if _, ok := rows[e.GetAccountId()]; !ok {
				t.Fatalf("entry %v names %s, not a shard of %s", e, e.GetAccountId(), revenue)
			}
			k := e.GetAccountId() + "/" + fmt.Sprint(e.GetSequence())
			if seen[k] {
				t.Fatalf("entry %s listed twice", k)
			}
			seen[k] = true
			entries++
			entrySum += e.GetAmount()
		}
		if tok = res.GetNextPageToken(); tok == "" {
			break
		}
	}
	if entries != customers*charges || entrySum != total {
		t.Fatalf("history: %d entries summing to %d, want %d summing to %d", entries, entrySum, customers*charges, total)
	}

	// Spend by revenue account: one row, the account itself.
	u, err := env.Client.SummarizeUsage(ctx, &tallyv1.SummarizeUsageRequest{GroupBy: []string{"revenue_account"},
		FromDay: time.Now().UTC().AddDate(0, 0, -1).Format(time.DateOnly), ToDay: time.Now().UTC().AddDate(0, 0, 2).Format(time.DateOnly)})
	if err != nil {
		t.Fatal(err)
	}
	var rowsOfCur int
	for _, r := range u.GetRows() {
		if r.GetCurrency() != cur {
			continue
		}
		rowsOfCur++
		if r.GetRevenueAccountId() != revenue || r.GetCharged() != total {
			t.Errorf("usage row %v, want revenue account %s charged %d", r, revenue, total)
		}
	}
	if rowsOfCur != 1 {
		t.Errorf("%d usage rows for %s, want 1", rowsOfCur, cur)
	}

	// Reconcile: every shard checks out as an account.
	ids := []string{}
	for id := range rows {
		ids = append(ids, id)
	}
	stream, err := env.Client.Raw().Reconcile(ctx, &tallyv1.ReconcileRequest{AccountIds: ids})
	if err != nil {
		t.Fatal(err)
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if f := m.GetFinding(); f != nil {
			t.Errorf("reconcile finding: %v", f)
		}
	}
	env.CheckBooks(t)
}

// Two tallyd processes (two servers on one database, each with its own
// committers and shard offset) running charges, transfers between the same
// customers in both directions and ATOMIC SubmitBatches never deadlock:
// PostgreSQL's deadlock counter does not move and every call succeeds.
func TestCommittersNeverDeadlock(t *testing.T) {
	t.Parallel()
	committers := func() *tallytest.Env {
		return tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL(),
			Batch: ledger.BatchConfig{WorkersMax: 4}})
	}
	envs := []*tallytest.Env{committers(), committers()}
	ctx := ctxT(t)
	cur := newCurrency()
	accts := make([]string, 12)
	for i := range accts {
		accts[i] = createAccount(t, envs[0], cur).GetAccountId()
		credit(t, envs[i%2], accts[i], 1_000_000)
	}
	deadlocks := func() int64 {
		var n int64
		if err := envs[0].Store.Pool().QueryRow(context.Background(),
			`SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := deadlocks()
	const workers, opsEach = 6, 40
	var wg sync.WaitGroup
	for w := range 2 * workers {
		env := envs[w%2]
		rng := rand.New(rand.NewPCG(uint64(w), 7))
		wg.Add(1)
		go func() {
			defer wg.Done()
			pick := func() string { return accts[rng.IntN(len(accts))] }
			for range opsEach {
				var err error
				switch rng.IntN(3) {
				case 0:
					_, err = env.Client.Charge(ctx, &tallyv1.ChargeRequest{AccountId: pick(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
				case 1:
					a, b := pick(), pick()
					if a == b {
						continue
					}
					_, err = env.Client.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: b, Amount: 1, IdempotencyKey: client.NewIdempotencyKey()})
				default:
					ops := make([]*tallyv1.BatchOperation, 5)
					for i := range ops {
						ops[i] = chargeOp(pick(), 1, client.NewIdempotencyKey())
					}
					var res *tallyv1.SubmitBatchResponse
					res, err = env.Client.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(),
						Mode: tallyv1.BatchMode_BATCH_MODE_ATOMIC, Operations: ops})
					if err == nil && !res.GetApplied() {
						err = fmt.Errorf("batch not applied: %v", res)
					}
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	// PostgreSQL flushes a backend's statistics within a second.
	time.Sleep(1500 * time.Millisecond)
	if n := deadlocks() - before; n != 0 {
		t.Fatalf("%d deadlocks detected while two servers' committers ran", n)
	}
	envs[0].CheckBooks(t)
}

// A tallyd that has not met two currencies yet (their accounts were made
// through another one) applies a SubmitBatch charging in both: it learns
// each currency's system accounts and shards, one attempt per currency.
func TestSubmitBatchLearnsEveryCurrency(t *testing.T) {
	t.Parallel()
	first := newEnv(t)
	var ops []*tallyv1.BatchOperation
	for range 3 {
		a := createAccount(t, first, newCurrency()).GetAccountId()
		credit(t, first, a, 100)
		ops = append(ops, chargeOp(a, 7, client.NewIdempotencyKey()))
	}
	fresh := newEnv(t)
	res, err := fresh.Client.SubmitBatch(ctxT(t), &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(),
		Mode: tallyv1.BatchMode_BATCH_MODE_ATOMIC, Operations: ops})
	if err != nil || !res.GetApplied() {
		t.Fatalf("batch over three currencies on a fresh server: %v %v", res, err)
	}
	fresh.CheckBooks(t)
}
