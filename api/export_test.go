package api_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc/codes"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// follower collects the feed in the background.
type follower struct {
	mu     sync.Mutex
	seen   map[string]int // transfer id → times seen
	cursor string
	done   chan error
}

func follow(t *testing.T, env *tallytest.Env, ctx context.Context, currency string) *follower {
	f := &follower{seen: map[string]int{}, done: make(chan error, 1)}
	go func() {
		cur, err := env.Client.Export(ctx, "", true, func(ev *tallyv1.ExportTransfersResponse) error {
			if tr := ev.GetTransfer(); tr != nil && tr.GetCurrency() == currency {
				f.mu.Lock()
				f.seen[tr.GetTransferId()]++
				f.mu.Unlock()
			}
			f.mu.Lock()
			f.cursor = ev.GetCursor()
			f.mu.Unlock()
			return nil
		})
		_ = cur
		f.done <- err
	}()
	return f
}

// Concurrent writers on two tallyd instances and a follower: the follower's
// stream is exactly the set of committed transfers, no gaps, no duplicates.
func TestFeedFollowerSeesEveryTransferOnce(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	env2 := newEnv(t) // a second server and ledger on the same database
	cur := newCurrency()
	accts := make([]string, 6)
	for i := range accts {
		accts[i] = createAccount(t, env, cur).GetAccountId()
		credit(t, env, accts[i], 1_000_000)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := follow(t, env, ctx, cur)

	var wg sync.WaitGroup
	var acked atomic.Int64
	stop := time.Now().Add(3 * time.Second)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e := env
			if w%2 == 1 {
				e = env2
			}
			for i := 0; time.Now().Before(stop); i++ {
				a := accts[(w+i)%len(accts)]
				var err error
				switch i % 4 {
				case 0, 1:
					_, err = e.Client.Charge(context.Background(), &tallyv1.ChargeRequest{AccountId: a, Amount: 3, IdempotencyKey: client.NewIdempotencyKey()})
				case 2:
					_, err = e.Client.Transfer(context.Background(), &tallyv1.TransferRequest{DebitAccountId: a, CreditAccountId: accts[(w+i+1)%len(accts)],
						Amount: 2, IdempotencyKey: client.NewIdempotencyKey()})
				case 3:
					_, err = e.Client.SubmitBatch(context.Background(), &tallyv1.SubmitBatchRequest{BatchKey: client.NewIdempotencyKey(),
						Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT, Operations: []*tallyv1.BatchOperation{
							chargeOp(a, 1, client.NewIdempotencyKey()), chargeOp(a, 1, client.NewIdempotencyKey())}})
				}
				if err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				acked.Add(1)
			}
		}()
	}
	wg.Wait()
	var want []string
	rows, err := env.Store.Pool().Query(context.Background(), `SELECT transfer_id::text FROM transfers WHERE currency = $1`, cur)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		want = append(want, id)
	}
	rows.Close()
	deadline := time.Now().Add(60 * time.Second)
	for {
		f.mu.Lock()
		n := len(f.seen)
		f.mu.Unlock()
		if n >= len(want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	if err := <-f.done; err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("follower: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range want {
		if f.seen[id] != 1 {
			t.Errorf("transfer %s seen %d times, want once", id, f.seen[id])
		}
	}
	if len(f.seen) != len(want) {
		t.Errorf("follower saw %d transfers of the currency, %d are committed", len(f.seen), len(want))
	}
	if acked.Load() < 20 {
		t.Fatalf("only %d writes acknowledged: the test proves little", acked.Load())
	}
	t.Logf("%d calls acknowledged, %d transfers, each seen once", acked.Load(), len(want))
}

// A transaction that took its id early and commits late is not skipped: the
// feed holds back later transactions until it finishes. (A cursor on
// event_id alone would deliver the later charge and then skip it.)
func TestFeedDoesNotSkipALateCommit(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	ctx := ctxT(t)
	// Catch up first.
	cursor, err := env.Client.Export(ctx, "", false, func(*tallyv1.ExportTransfersResponse) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	slow, err := env.Store.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Rollback(context.Background())
	marker := uuid.New()
	if _, err := slow.Exec(ctx, `INSERT INTO events (kind, subject_id, account_id, payload, created_at)
		VALUES ('low_balance', $1, $1, jsonb_build_object('AccountID', $1::uuid), now())`, marker); err != nil {
		t.Fatal(err)
	}
	a := createAccount(t, env, newCurrency()).GetAccountId()
	fast := credit(t, env, a, 10).GetTransfer().GetTransferId()
	var got []string
	collect := func(ev *tallyv1.ExportTransfersResponse) error {
		switch {
		case ev.GetLowBalance().GetAccountId() == marker.String():
			got = append(got, "slow")
		case ev.GetTransfer().GetTransferId() == fast:
			got = append(got, "fast")
		}
		return nil
	}
	if cursor, err = env.Client.Export(ctx, cursor, false, collect); err != nil {
		t.Fatal(err)
	}
	if len(got) != 0 {
		t.Fatalf("while an earlier transaction is open the feed returned %v; it must hold later events back", got)
	}
	if err := slow.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// Other packages' tests share the PostgreSQL cluster; their open
	// transactions can hold the feed back a little longer.
	for deadline := time.Now().Add(60 * time.Second); len(got) < 2 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if cursor, err = env.Client.Export(ctx, cursor, false, collect); err != nil {
			t.Fatal(err)
		}
	}
	if len(got) != 2 || got[0] != "slow" || got[1] != "fast" {
		t.Fatalf("after the slow commit the feed gave %v, want [slow fast]", got)
	}
}

// The feed shows every client's money: only reconciler and admin may read it.
func TestFeedRoles(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	for _, c := range []struct {
		role auth.Role
		ok   bool
	}{{auth.RoleCharger, false}, {auth.RoleViewer, false}, {auth.RoleSupport, false}, {auth.RoleReconciler, true}, {auth.RoleAdmin, true}} {
		k := env.NewKey(t, c.role, "")
		cl := env.Dial(t, k.Key.String())
		_, err := cl.Export(ctxT(t), "", false, func(*tallyv1.ExportTransfersResponse) error { return nil })
		if c.ok && err != nil {
			t.Errorf("%s: %v", c.role, err)
		}
		if !c.ok {
			wantErr(t, err, codes.PermissionDenied, api.ReasonPermissionDenied)
		}
	}
}
