package ledger

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/internal/testdb"
	"github.com/tallyledger/tally/store"
)

var dbURL string

func TestMain(m *testing.M) {
	os.Exit(testdb.Main(m, testdb.Options{Migrate: store.Migrate, TemplateName: "tally_template_" + store.MigrationsFingerprint()}, func(db *testdb.DB) { dbURL = db.URL() }))
}

// newLedger returns a ledger whose batches the test assembles by hand (via
// batcher.apply), so batch composition is exact.
func newLedger(t *testing.T) *Ledger {
	t.Helper()
	st, err := store.Open(context.Background(), store.Config{URL: dbURL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	l := New(Config{Store: st})
	t.Cleanup(l.Close)
	return l
}

func newAccount(t *testing.T, l *Ledger, currency string, funds int64) uuid.UUID {
	t.Helper()
	ctx := context.Background()
	a, err := l.CreateAccount(ctx, CreateAccountRequest{Currency: currency})
	if err != nil {
		t.Fatal(err)
	}
	if funds > 0 {
		if _, err := l.Credit(ctx, MoveRequest{AccountID: a.ID, Amount: funds, IdempotencyKey: uuid.NewString()}); err != nil {
			t.Fatal(err)
		}
	}
	return a.ID
}

func charge(acct uuid.UUID, amount int64, key string) *item {
	r := MoveRequest{Kind: KindCharge, AccountID: acct, Amount: amount, IdempotencyKey: key}
	return &item{r: r, fp: fingerprint(r), out: make(chan itemResult, 1)}
}

func code(err error) string {
	var le *Error
	if errors.As(err, &le) {
		return le.Reason
	}
	if err == nil {
		return "OK"
	}
	return err.Error()
}

func balanceOf(t *testing.T, l *Ledger, id uuid.UUID) int64 {
	t.Helper()
	b, err := l.GetBalance(context.Background(), id, ConsistencyStrong, 0)
	if err != nil {
		t.Fatal(err)
	}
	return b.Balance
}

func currency() string { return "B" + strings.ToUpper(uuid.NewString()[:8]) }

// Funds checks see the earlier items of the same batch, and a rejected item
// affects only itself.
func TestBatchInsufficientFundsMidBatch(t *testing.T) {
	t.Parallel()
	l := newLedger(t)
	a := newAccount(t, l, "BATCHA", 10)
	items := []*item{charge(a, 4, uuid.NewString()), charge(a, 4, uuid.NewString()), charge(a, 4, uuid.NewString()), charge(a, 2, uuid.NewString())}
	res := applyNow(l, items)
	want := []string{"OK", "OK", ReasonInsufficientFunds, "OK"}
	for i := range items {
		if code(res[i].err) != want[i] {
			t.Errorf("item %d: %v, want %s", i, res[i].err, want[i])
		}
	}
	if res[1].res.Balance.Balance != 2 || res[3].res.Balance.Balance != 0 || res[3].res.Balance.Version != res[0].res.Balance.Version+2 {
		t.Errorf("per-item balances: %+v %+v %+v", res[0].res.Balance, res[1].res.Balance, res[3].res.Balance)
	}
	if got := balanceOf(t, l, a); got != 0 {
		t.Fatalf("balance %d, want 0", got)
	}
	// The rejection was recorded under its key: a replay stays rejected.
	again := applyNow(l, []*item{charge(a, 4, items[2].r.IdempotencyKey)})
	if code(again[0].err) != ReasonInsufficientFunds || !again[0].err.(*Error).Replayed {
		t.Fatalf("replay of the rejection: %v", again[0].err)
	}
}

// A duplicate key inside one batch is a replay of the first item; a different
// request under it is IDEMPOTENCY_KEY_REUSED.
func TestBatchDuplicateKeyWithinBatch(t *testing.T) {
	t.Parallel()
	l := newLedger(t)
	cur := currency()
	a := newAccount(t, l, cur, 100)
	k, rk := uuid.NewString(), uuid.NewString()
	items := []*item{
		charge(a, 5, k), charge(a, 5, k), charge(a, 6, k),
		charge(a, 500, rk), charge(a, 500, rk),
	}
	res := applyNow(l, items)
	if res[0].err != nil || res[0].res.Replayed {
		t.Fatalf("first: %+v %v", res[0].res, res[0].err)
	}
	if res[1].err != nil || !res[1].res.Replayed || res[1].res.Transfer.ID != res[0].res.Transfer.ID || res[1].res.Balance != res[0].res.Balance {
		t.Fatalf("duplicate: %+v %v", res[1].res, res[1].err)
	}
	if code(res[2].err) != ReasonIdempotencyKeyReused {
		t.Fatalf("different request, same key: %v", res[2].err)
	}
	if code(res[3].err) != ReasonInsufficientFunds || res[3].err.(*Error).Replayed {
		t.Fatalf("first rejection: %v", res[3].err)
	}
	if code(res[4].err) != ReasonInsufficientFunds || !res[4].err.(*Error).Replayed {
		t.Fatalf("duplicate of a rejection: %v", res[4].err)
	}
	var n int
	if err := l.st.Pool().QueryRow(context.Background(), `SELECT count(*) FROM transfers WHERE idempotency_key = $1`, k).Scan(&n); err != nil || n != 1 {
		t.Fatalf("transfers for the key: %d %v", n, err)
	}
	if got := balanceOf(t, l, a); got != 95 {
		t.Fatalf("balance %d, want 95", got)
	}
	// A later batch replays the committed outcome.
	later := applyNow(l, []*item{charge(a, 5, k)})
	if later[0].err != nil || !later[0].res.Replayed || later[0].res.Transfer.ID != res[0].res.Transfer.ID || later[0].res.Balance.Balance != 95 {
		t.Fatalf("later replay: %+v %v", later[0].res, later[0].err)
	}
}

// A batch whose transaction fails is retried in halves: the poisonous item
// fails alone and the others commit. NOT_FOUND items record nothing.
func TestBatchPoisonItemFailsAlone(t *testing.T) {
	t.Parallel()
	l := newLedger(t)
	a := newAccount(t, l, currency(), 100)
	poison := charge(a, 1, uuid.NewString())
	// PostgreSQL text cannot hold NUL; validation refuses it, so build the
	// item by hand to make the batch's INSERT fail.
	poison.r.Description = "bad\x00byte"
	poison.fp = fingerprint(poison.r)
	missing := charge(uuid.Must(uuid.NewV7()), 1, uuid.NewString())
	items := []*item{charge(a, 1, uuid.NewString()), charge(a, 2, uuid.NewString()), poison, missing, charge(a, 3, uuid.NewString())}
	splitsBefore := l.BatchStats().Splits
	res := applyNow(l, items)
	want := []string{"OK", "OK", ReasonInternal, ReasonAccountNotFound, "OK"}
	for i := range items {
		if code(res[i].err) != want[i] {
			t.Errorf("item %d: %v, want %s", i, res[i].err, want[i])
		}
	}
	if l.BatchStats().Splits == splitsBefore {
		t.Error("the failed batch was not split")
	}
	if got := balanceOf(t, l, a); got != 94 {
		t.Fatalf("balance %d, want 94", got)
	}
	for _, it := range []*item{poison, missing} {
		if _, err := l.st.GetKey(context.Background(), "", it.r.IdempotencyKey); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("key %s was recorded: %v", it.r.IdempotencyKey, err)
		}
	}
	// The NUL byte is refused at the door.
	_, err := l.Charge(context.Background(), MoveRequest{AccountID: a, Amount: 1, IdempotencyKey: uuid.NewString(), Description: "x\x00"})
	if code(err) != ReasonInvalidArgument {
		t.Fatalf("NUL description: %v", err)
	}
}

// applyNow commits items as one batch of committer 0 and resolves its
// replays, as run does, but returns the results instead of sending them.
func applyNow(l *Ledger, items []*item) []itemResult {
	res, post := l.batch.apply(items, 0)
	for i, k := range post.replays {
		res[i].res, res[i].err = l.replay(context.Background(), &k)
	}
	return res
}
