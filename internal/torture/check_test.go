package torture

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/tallyledger/tally/ledger"
	"github.com/tallyledger/tally/store"
)

// The checker must be able to fail. These tests build a small but real
// ledger state with the real ledger package in a scratch database on the
// shared test PostgreSQL, record its history the way a torture run would,
// check that the clean state passes, and then damage the state (inside a
// transaction that is rolled back, with triggers and constraints bypassed)
// or the history, and assert that the right invariant catches each damage.

func testDatabaseURL() string {
	if u := os.Getenv("TALLY_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

func testRedisURL() string {
	if u := os.Getenv("TALLY_TEST_REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

func randomSuffix() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// scratchDB creates tally_torture_test_<random> on the shared server,
// migrates it and drops it when the test ends.
func scratchDB(t *testing.T, ctx context.Context) string {
	t.Helper()
	admin, err := pgx.Connect(ctx, testDatabaseURL())
	if err != nil {
		t.Fatalf("connect to the shared test PostgreSQL (%s): %v", testDatabaseURL(), err)
	}
	name := "tally_torture_test_" + randomSuffix()
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close(ctx)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop %s: %v", name, err)
		}
		admin.Close(ctx)
	})
	u, err := url.Parse(testDatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	if err := store.Migrate(ctx, u.String()); err != nil {
		t.Fatal(err)
	}
	return u.String()
}

// fixture is a clean ledger state and the history that produced it.
type fixture struct {
	dbURL string
	conn  *pgx.Conn
	hist  *History
	// named accounts and keys for the damage cases
	a, b, c, d string
	e          string // closed
	keyAcked   string // an acked charge on a
	keyReject  string // an INSUFFICIENT_FUNDS charge on b
	keyRetried string // an acked op answered twice (the second a replay)
	cache      *CacheState

	// Holds, refunds and batches.
	keyHoldCaptured  string // a hold on a, captured in part (keyCapture)
	keyCapture       string
	keyHoldReleased  string // a hold on a, released (keyRelease)
	keyRelease       string
	keyHoldOpen      string // a hold on a still open at the end
	keyHoldExpired   string // a hold on b that expired and was written down
	keyRefund        string // a refund of part of keyAcked
	batchApplied     string // an ATOMIC batch that applied (charge a, credit b)
	batchNotApplied  string // an ATOMIC batch that failed (credit b, huge charge b)
	batchIndependent string // an INDEPENDENT batch (huge charge b rejected, credit d)
}

func codeNameOf(c ledger.Code) string {
	switch c {
	case ledger.CodeFailedPrecondition:
		return "FAILED_PRECONDITION"
	case ledger.CodeOutOfRange:
		return "OUT_OF_RANGE"
	case ledger.CodeAlreadyExists:
		return "ALREADY_EXISTS"
	case ledger.CodeNotFound:
		return "NOT_FOUND"
	case ledger.CodeInvalid:
		return "INVALID_ARGUMENT"
	case ledger.CodeUnavailable:
		return "UNAVAILABLE"
	}
	return "INTERNAL"
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f := &fixture{dbURL: scratchDB(t, ctx), hist: NewHistory()}
	st, err := store.Open(ctx, store.Config{URL: f.dbURL})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l := ledger.New(ledger.Config{Store: st})

	mk := func(cur string, limit int64) string {
		a, err := l.CreateAccount(ctx, ledger.CreateAccountRequest{Currency: cur, CreditLimit: limit})
		if err != nil {
			t.Fatal(err)
		}
		f.hist.AddAccount(AccountSpec{ID: a.ID.String(), Currency: cur, Type: "CUSTOMER", Floor: "NON_NEGATIVE", CreditLimit: limit})
		return a.ID.String()
	}
	f.a, f.b, f.c, f.d = mk("USD", 0), mk("USD", 0), mk("USD", 10), mk("CREDITS", 0)

	lastAcked := map[string]int64{}
	// do runs one op through the ledger and records it as a client would.
	do := func(kind OpKind, acct, counter string, amount int64, key string, attempts int) *Op {
		if key == "" {
			key = uuid.Must(uuid.NewV7()).String()
		}
		o := &Op{Kind: kind, Key: key, Account: acct, Counterparty: counter, Amount: amount, Start: time.Now(), Attempts: attempts, Tallyds: 1}
		r := ledger.MoveRequest{AccountID: uuid.MustParse(acct), Amount: amount, IdempotencyKey: key}
		if counter != "" {
			r.Counterparty = uuid.MustParse(counter)
		}
		var res ledger.TransferResult
		for i := 0; i < attempts; i++ { // a retry resends the very same request
			switch kind {
			case KindCharge:
				res, err = l.Charge(ctx, r)
			case KindCredit:
				res, err = l.Credit(ctx, r)
			case KindTransfer:
				res, err = l.Transfer(ctx, r)
			}
		}
		o.End = time.Now()
		var le *ledger.Error
		switch {
		case err == nil:
			o.Outcome, o.FinalCode = OutcomeAcked, "OK"
			o.TransferID, o.Replayed = res.Transfer.ID.String(), res.Replayed
			o.BalanceVersion, o.BalanceAfter = res.Balance.Version, res.Balance.Balance
			lastAcked[acct] = max(lastAcked[acct], o.BalanceVersion)
		case errors.As(err, &le) && (le.Code == ledger.CodeFailedPrecondition || le.Code == ledger.CodeOutOfRange):
			o.Outcome, o.FinalCode, o.FinalReason = OutcomeRejected, codeNameOf(le.Code), le.Reason
		default:
			t.Fatalf("%s %s: %v", kind, key, err)
		}
		f.hist.AddOp(o)
		f.hist.CountAnswer(o.FinalCode)
		return o
	}
	do(KindCredit, f.a, "", 100, "", 1)
	do(KindCredit, f.b, "", 50, "", 1)
	do(KindCredit, f.d, "", 30, "", 1)
	f.keyAcked = do(KindCharge, f.a, "", 30, "", 1).Key
	do(KindTransfer, f.a, f.b, 20, "", 1)
	f.keyReject = do(KindCharge, f.b, "", 1000, "", 1).Key
	if o := do(KindTransfer, f.a, f.d, 5, "", 1); o.FinalReason != "CURRENCY_MISMATCH" {
		t.Fatalf("cross-currency transfer: %+v", o)
	}
	do(KindCharge, f.c, "", 5, "", 1) // into the credit limit: balance -5
	retried := do(KindCharge, f.a, "", 7, "", 2)
	if !retried.Replayed {
		t.Fatalf("second attempt was not a replay: %+v", retried)
	}
	f.keyRetried = retried.Key
	do(KindTransfer, f.b, f.a, 3, "", 1)

	// record fills an op from a ledger answer as a client would.
	record := func(o *Op, res ledger.TransferResult, err error) {
		var le *ledger.Error
		switch {
		case err == nil:
			o.Outcome, o.FinalCode = OutcomeAcked, "OK"
			o.TransferID, o.Replayed = res.Transfer.ID.String(), res.Replayed
			if res.Transfer.ID == uuid.Nil {
				o.TransferID = ""
			}
			if res.Hold != nil && o.Kind == KindHold {
				o.HoldID = res.Hold.ID.String()
			}
			o.BalanceVersion, o.BalanceAfter = res.Balance.Version, res.Balance.Balance
			lastAcked[o.Account] = max(lastAcked[o.Account], o.BalanceVersion)
		case errors.As(err, &le) && (le.Code == ledger.CodeFailedPrecondition || le.Code == ledger.CodeOutOfRange):
			o.Outcome, o.FinalCode, o.FinalReason = OutcomeRejected, codeNameOf(le.Code), le.Reason
		default:
			t.Fatalf("%s %s: %v", o.Kind, o.Key, err)
		}
	}
	// request builds the ledger request an op means.
	request := func(o *Op) ledger.MoveRequest {
		r := ledger.MoveRequest{Amount: o.Amount, IdempotencyKey: o.Key, ExpiresIn: time.Duration(o.ExpiresIn) * time.Second}
		if o.Account != "" {
			r.AccountID = uuid.MustParse(o.Account)
		}
		if o.Counterparty != "" && o.Kind != KindCapture && o.Kind != KindRefund {
			r.Counterparty = uuid.MustParse(o.Counterparty)
		}
		switch o.Kind {
		case KindCharge:
			r.Kind = ledger.KindCharge
		case KindCredit:
			r.Kind = ledger.KindCredit
		case KindTransfer:
			r.Kind = ledger.KindTransfer
		case KindHold:
			r.Kind = ledger.KindHold
		case KindCapture:
			r.Kind, r.HoldID = ledger.KindCapture, uuid.MustParse(o.HoldID)
			if o.CaptureAll {
				r.Amount = 0
			}
		case KindRelease:
			r.Kind, r.HoldID, r.Amount = ledger.KindRelease, uuid.MustParse(o.HoldID), 0
		case KindRefund:
			r.Kind, r.ChargeID, r.AccountID = ledger.KindRefund, uuid.MustParse(o.ChargeID), uuid.Nil
		}
		return r
	}
	single := func(o *Op) *Op {
		o.Key = uuid.Must(uuid.NewV7()).String()
		o.Start, o.Attempts, o.Tallyds = time.Now(), 1, 1
		r := request(o)
		var res ledger.TransferResult
		switch o.Kind {
		case KindHold:
			res, err = l.Hold(ctx, r)
		case KindCapture:
			res, err = l.CaptureHold(ctx, r)
		case KindRelease:
			res, err = l.ReleaseHold(ctx, r)
		case KindRefund:
			res, err = l.Refund(ctx, r)
		default:
			t.Fatalf("single %s", o.Kind)
		}
		o.End = time.Now()
		record(o, res, err)
		f.hist.AddOp(o)
		f.hist.CountAnswer(o.FinalCode)
		return o
	}
	batch := func(mode string, items ...*Op) *Batch {
		b := &Batch{Key: uuid.Must(uuid.NewV7()).String(), Mode: mode, DesignedToFail: -1, Start: time.Now(), Attempts: 1}
		req := ledger.BatchRequest{Key: b.Key, Mode: ledger.BatchMode(modeNumber(mode))}
		for i, o := range items {
			o.Key = uuid.Must(uuid.NewV7()).String()
			o.BatchKey, o.BatchIndex, o.Start, o.Attempts, o.Tallyds = b.Key, i, b.Start, 1, 1
			b.ItemKeys = append(b.ItemKeys, o.Key)
			req.Items = append(req.Items, request(o))
		}
		res, err := l.SubmitBatch(ctx, req)
		if err != nil {
			t.Fatalf("batch: %v", err)
		}
		b.End, b.Outcome, b.FinalCode = time.Now(), OutcomeAcked, "OK"
		b.Applied, b.FailedIndex, b.Replayed = res.Applied, res.FailedIndex, res.Replayed
		for i, o := range items {
			o.End = b.End
			it := res.Items[i]
			switch {
			case it.Error != nil && !res.Applied:
				o.Outcome, o.FinalCode, o.FinalReason = OutcomeNotApplied, codeNameOf(it.Error.Code), it.Error.Reason
			case it.Error != nil:
				record(o, ledger.TransferResult{}, it.Error)
			default:
				record(o, *it.Result, nil)
			}
			f.hist.AddOp(o)
		}
		f.hist.AddBatch(b)
		f.hist.CountAnswer("OK")
		return b
	}
	// Holds: one captured in part, one released, one left open, one that
	// expires and is written down by the next write to its account.
	hc := single(&Op{Kind: KindHold, Account: f.a, Amount: 10, ExpiresIn: 3600})
	f.keyHoldCaptured = hc.Key
	f.keyCapture = single(&Op{Kind: KindCapture, Account: f.a, HoldID: hc.HoldID, Amount: 6}).Key
	hr := single(&Op{Kind: KindHold, Account: f.a, Amount: 5, ExpiresIn: 3600})
	f.keyHoldReleased = hr.Key
	f.keyRelease = single(&Op{Kind: KindRelease, Account: f.a, HoldID: hr.HoldID, Amount: 5}).Key
	f.keyHoldOpen = single(&Op{Kind: KindHold, Account: f.a, Amount: 3, ExpiresIn: 3600}).Key
	he := single(&Op{Kind: KindHold, Account: f.b, Amount: 4, ExpiresIn: 1})
	f.keyHoldExpired = he.Key
	if o := single(&Op{Kind: KindCapture, Account: f.a, HoldID: hc.HoldID, Amount: 1}); o.FinalReason != "HOLD_FINALIZED" {
		t.Fatalf("second capture: %+v", o)
	}
	// A refund of part of the acked charge, and one of more than remains.
	charge := opByKey(f.hist, f.keyAcked)
	f.keyRefund = single(&Op{Kind: KindRefund, Account: f.a, ChargeID: charge.TransferID, Amount: 10}).Key
	if o := single(&Op{Kind: KindRefund, Account: f.a, ChargeID: charge.TransferID, Amount: 21}); o.FinalReason != "REFUND_EXCEEDS_CHARGE" {
		t.Fatalf("refund beyond the charge: %+v", o)
	}
	time.Sleep(1200 * time.Millisecond) // he expires
	do(KindCredit, f.b, "", 2, "", 1)   // writes its expiry down
	// Batches.
	if b := batch(BatchAtomic, &Op{Kind: KindCharge, Account: f.a, Amount: 2}, &Op{Kind: KindCredit, Account: f.b, Amount: 3}); !b.Applied {
		t.Fatalf("atomic batch not applied: %+v", b)
	} else {
		f.batchApplied = b.Key
	}
	if b := batch(BatchAtomic, &Op{Kind: KindCredit, Account: f.b, Amount: 1}, &Op{Kind: KindCharge, Account: f.b, Amount: 1_000_000}); b.Applied {
		t.Fatalf("failing atomic batch applied: %+v", b)
	} else {
		f.batchNotApplied = b.Key
	}
	f.batchIndependent = batch(BatchIndependent, &Op{Kind: KindCharge, Account: f.b, Amount: 1_000_000},
		&Op{Kind: KindCredit, Account: f.d, Amount: 2}).Key

	// Lifecycle: d is frozen (a charge on it is refused ACCOUNT_NOT_ACTIVE)
	// and unfrozen; c's credit limit cannot go below what it uses, then
	// rises; e is closed and refuses a credit.
	change := func(kind ledger.Kind, action, acct string, limit *int64, expect ...string) LifecycleCall {
		lc := LifecycleCall{Action: action, Account: acct, Start: time.Now(), Attempts: 1, Expect: expect, Definite: true}
		a, err := l.ChangeAccount(ctx, ledger.MoveRequest{Kind: kind, AccountID: uuid.MustParse(acct), NewCreditLimit: limit})
		lc.End = time.Now()
		var le *ledger.Error
		switch {
		case err == nil:
			lc.Code, lc.Status = "OK", "ACCOUNT_STATUS_"+a.Status.String()
		case errors.As(err, &le):
			lc.Code, lc.Reason = codeNameOf(le.Code), le.Reason
		default:
			t.Fatalf("%s %s: %v", action, acct, err)
		}
		if lc.Code != "OK" {
			f.hist.CountAnswer(lc.Code)
		}
		f.hist.AddLifecycle(lc)
		return lc
	}
	change(ledger.KindFreeze, ActionFreeze, f.d, nil, "OK")
	if o := do(KindCharge, f.d, "", 1, "", 1); o.FinalReason != reasonNotActive {
		t.Fatalf("charge of a frozen account: %+v", o)
	}
	change(ledger.KindUnfreeze, ActionUnfreeze, f.d, nil, "OK")
	zero, ten := int64(0), int64(10) // ten: the same limit again (an overwrite)
	if lc := change(ledger.KindUpdate, ActionUpdate, f.c, &zero, reasonCreditLimitUsed); lc.Reason != reasonCreditLimitUsed {
		t.Fatalf("lowering a used credit limit: %+v", lc)
	}
	change(ledger.KindUpdate, ActionUpdate, f.c, &ten, "OK")
	f.e = mk("USD", 0)
	change(ledger.KindClose, ActionClose, f.e, nil, "OK")
	if o := do(KindCredit, f.e, "", 1, "", 1); o.FinalReason != reasonNotActive {
		t.Fatalf("credit of a closed account: %+v", o)
	}
	change(ledger.KindFreeze, ActionFreeze, f.e, nil, reasonClosed)

	// Reads: strong, cached (no cache here: from the store) and min_version.
	for _, acct := range []string{f.a, f.b, f.c, f.d} {
		for _, mode := range []string{ReadStrong, ReadCached, ReadMinVersion} {
			cons, minV := ledger.ConsistencyCached, int64(0)
			switch mode {
			case ReadStrong:
				cons = ledger.ConsistencyStrong
			case ReadMinVersion:
				minV = lastAcked[acct]
			}
			start := time.Now()
			b, err := l.GetBalance(ctx, uuid.MustParse(acct), cons, minV)
			if err != nil {
				t.Fatal(err)
			}
			f.hist.AddObservation(Observation{Account: acct, Consistency: mode, MinVersion: minV, LastAcked: lastAcked[acct],
				Version: b.Version, Balance: b.Balance, Source: SourceStore, Start: start, End: time.Now()})
		}
	}
	// An old but real pair served by the cache.
	f.hist.AddObservation(Observation{Account: f.a, Consistency: ReadCached, Version: 1, Balance: 100, Source: SourceCache,
		Start: time.Now(), End: time.Now()})

	// The feed, read to its end as a follower would, and a reconciliation.
	f.hist.Feed = readFeed(t, ctx, l)
	f.hist.Reconcile = reconcileLedger(t, ctx, l)

	f.conn, err = pgx.Connect(ctx, f.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.conn.Close(context.Background()) })

	// A clean cache: a's current pair under a private prefix in the shared
	// Redis, as tallyd would have cached it.
	db, err := LoadDBState(ctx, f.conn)
	if err != nil {
		t.Fatal(err)
	}
	acc := db.Accounts[f.a]
	f.cache = &CacheState{Prefix: "x:", Values: []CachedValue{{Key: "x:" + f.a, Account: f.a, OK: true,
		Version: acc.Version, Balance: acc.Balance, PTTL: 1500 * time.Millisecond,
		Raw: CacheValue(acc.Version, acc.Balance, 0, acc.Balance, "USD", time.Now())}}}
	return f
}

// cloneHistory deep-copies the parts of a history the damage cases change.
func cloneHistory(h *History) *History {
	c := NewHistory()
	c.Accounts = slices.Clone(h.Accounts)
	for _, o := range h.Ops {
		cp := *o
		c.Ops = append(c.Ops, &cp)
	}
	for _, b := range h.Batches {
		cp := *b
		c.Batches = append(c.Batches, &cp)
	}
	c.Observations = slices.Clone(h.Observations)
	c.ReadFailures = slices.Clone(h.ReadFailures)
	c.BadAnswers = slices.Clone(h.BadAnswers)
	c.Plants = slices.Clone(h.Plants)
	c.Crashes = slices.Clone(h.Crashes)
	for k, v := range h.AnswerCodes {
		c.AnswerCodes[k] = v
	}
	c.Lifecycle = slices.Clone(h.Lifecycle)
	if h.Feed != nil {
		fl := *h.Feed
		fl.Events = slices.Clone(fl.Events)
		c.Feed = &fl
	}
	if h.Reconcile != nil {
		rl := *h.Reconcile
		rl.Findings = slices.Clone(rl.Findings)
		c.Reconcile = &rl
	}
	return c
}

// readFeed reads the whole feed through the ledger, page by page from the
// returned cursors, as a follower does.
func readFeed(t *testing.T, ctx context.Context, l *ledger.Ledger) *FeedLog {
	t.Helper()
	fl := &FeedLog{Sessions: 1, CaughtUp: true}
	cursor := ""
	for {
		evs, next, err := l.ReadEvents(ctx, cursor, 7)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) == 0 {
			return fl
		}
		for _, e := range evs {
			fe := FeedEvent{Cursor: e.Cursor, Kind: e.Kind}
			switch {
			case e.Transfer != nil:
				fe.Subject = e.Transfer.ID.String()
			case e.Hold != nil:
				fe.Subject = e.Hold.ID.String()
			case e.AccountChange != nil:
				fe.Subject = e.AccountChange.AccountID.String()
			case e.LowBalance != nil:
				fe.Subject = e.LowBalance.TransferID.String()
				if e.LowBalance.TransferID == uuid.Nil {
					fe.Subject = e.LowBalance.HoldID.String()
				}
			}
			fl.Events = append(fl.Events, fe)
		}
		cursor = next
	}
}

// reconcileLedger runs a reconciliation of everything through the ledger
// and records it as the runner records the RPC's.
func reconcileLedger(t *testing.T, ctx context.Context, l *ledger.Ledger) *ReconcileLog {
	t.Helper()
	rl := &ReconcileLog{Summary: true}
	sum, err := l.Reconcile(ctx, ledger.ReconcileRequest{}, func(fd ledger.Finding) error {
		tr := ""
		if fd.TransferID != uuid.Nil {
			tr = fd.TransferID.String()
		}
		rl.Findings = append(rl.Findings, formatFinding(fd.Check, fd.AccountID.String(), tr, fd.Currency, fd.Detail))
		return nil
	}, func(int64, int64) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	rl.AccountsChecked, rl.SummaryFindings = sum.AccountsChecked, sum.Findings
	return rl
}

var checkOpts = CheckOptions{CacheTTL: 2 * time.Second, AgeSlack: time.Hour}

// check damages a copy of the fixture (SQL run in a transaction that is
// rolled back afterwards, history and cache edited in copies) and returns
// the results.
func (f *fixture) check(t *testing.T, sql []string, editHist func(h *History), editCache func(cs *CacheState)) []InvariantResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tx, err := f.conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // the damage is thrown away
	// Replica mode skips the append-only triggers and foreign keys.
	if _, err := tx.Exec(ctx, "SET LOCAL session_replication_role = replica"); err != nil {
		t.Fatal(err)
	}
	for _, s := range sql {
		if _, err := tx.Exec(ctx, s); err != nil {
			t.Fatalf("damage %q: %v", s, err)
		}
	}
	db, err := LoadDBState(ctx, tx)
	if err != nil {
		t.Fatal(err)
	}
	h := cloneHistory(f.hist)
	if editHist != nil {
		editHist(h)
	}
	cs := &CacheState{Prefix: f.cache.Prefix, Values: slices.Clone(f.cache.Values)}
	if editCache != nil {
		editCache(cs)
	}
	return Check(h, db, cs, checkOpts)
}

func failed(res []InvariantResult) []string {
	var out []string
	for _, r := range res {
		if !r.Pass {
			out = append(out, r.Name)
		}
	}
	return out
}

func describe(res []InvariantResult) string {
	var b strings.Builder
	for _, r := range res {
		if !r.Pass {
			fmt.Fprintf(&b, "\n  FAIL %s: %v", r.Name, r.Examples)
		}
	}
	return b.String()
}

// itemKey is the idempotency key of item i of a batch of the fixture.
func (f *fixture) itemKey(batch string, i int) string {
	for _, b := range f.hist.Batches {
		if b.Key == batch {
			return b.ItemKeys[i]
		}
	}
	panic("no batch " + batch)
}

func opByKey(h *History, key string) *Op {
	for _, o := range h.Ops {
		if o.Key == key {
			return o
		}
	}
	panic("no op " + key)
}

func TestChecker(t *testing.T) {
	f := newFixture(t)

	t.Run("clean state passes", func(t *testing.T) {
		res := f.check(t, nil, nil, nil)
		if fails := failed(res); len(fails) > 0 {
			t.Fatalf("clean state failed %v:%s", fails, describe(res))
		}
		for _, r := range res {
			if r.Checked == 0 && r.Name != InvNoTallydCrashes && !r.Skipped { // top-ups: TestCheckerTopUps
				t.Errorf("%s checked nothing: the fixture does not exercise it", r.Name)
			}
		}
	})

	cases := []struct {
		name      string
		sql       []string
		editHist  func(h *History)
		editCache func(cs *CacheState)
		want      string
	}{
		{
			name: "duplicated transfer inserted straight into Postgres",
			sql: []string{
				"ALTER TABLE transfers DROP CONSTRAINT transfers_scope_key_unique",
				fmt.Sprintf(`INSERT INTO transfers (transfer_id, scope, idempotency_key, kind, debit_account_id, credit_account_id,
					amount, currency, description, metadata, created_at, debit_account_type, credit_account_type)
					SELECT gen_random_uuid(), scope, idempotency_key, kind, debit_account_id, credit_account_id,
					amount, currency, description, metadata, created_at, debit_account_type, credit_account_type
					FROM transfers WHERE idempotency_key = '%s'`, f.keyAcked),
			},
			want: InvKeysAtMostOnce,
		},
		{
			name: "acknowledged key deleted",
			sql:  []string{fmt.Sprintf(`DELETE FROM idempotency_keys WHERE idempotency_key = '%s'`, f.keyAcked)},
			want: InvAckedPresent,
		},
		{
			name: "acknowledged transfer lost with its entries and key",
			sql: []string{
				fmt.Sprintf(`DELETE FROM entries WHERE transfer_id = (SELECT transfer_id FROM transfers WHERE idempotency_key = '%s')`, f.keyAcked),
				fmt.Sprintf(`DELETE FROM idempotency_keys WHERE idempotency_key = '%s'`, f.keyAcked),
				fmt.Sprintf(`DELETE FROM transfers WHERE idempotency_key = '%s'`, f.keyAcked),
			},
			want: InvAckedPresent,
		},
		{
			name: "entry with a wrong balance_after",
			sql: []string{fmt.Sprintf(`UPDATE entries SET balance_after = balance_after + 1
				WHERE account_id = '%s' AND sequence = 2`, f.a)},
			want: InvRunningBalance,
		},
		{
			name: "stale cached value left after healing",
			editCache: func(cs *CacheState) {
				cs.Values[0].Version, cs.Values[0].Balance = 1, 100
			},
			want: InvCacheMatchesDB,
		},
		{
			name: "read observation that never existed",
			editHist: func(h *History) {
				h.Observations = append(h.Observations, Observation{Account: f.a, Consistency: ReadCached, Version: 2,
					Balance: 12345, Source: SourceCache, Start: time.Now()})
			},
			want: InvReadsExisted,
		},
		{
			name: "read of a version from the future",
			editHist: func(h *History) {
				h.Observations = append(h.Observations, Observation{Account: f.a, Consistency: ReadCached, Version: 99,
					Balance: 70, Source: SourceCache, Start: time.Now()})
			},
			want: InvReadsExisted,
		},
		{
			name: "strong read older than an acknowledged write",
			editHist: func(h *History) {
				h.Observations = append(h.Observations, Observation{Account: f.a, Consistency: ReadStrong, LastAcked: 3,
					Version: 1, Balance: 100, Source: SourceStore, Start: time.Now()})
			},
			want: InvStrongReadsFresh,
		},
		{
			name: "min_version read older than asked",
			editHist: func(h *History) {
				h.Observations = append(h.Observations, Observation{Account: f.a, Consistency: ReadMinVersion, MinVersion: 3,
					LastAcked: 3, Version: 1, Balance: 100, Source: SourceCache, Start: time.Now()})
			},
			want: InvMinVersionReads,
		},
		{
			name: "rejected op whose rejection was not recorded",
			sql:  []string{fmt.Sprintf(`DELETE FROM idempotency_keys WHERE idempotency_key = '%s'`, f.keyReject)},
			want: InvFinalAnswersMatchDB,
		},
		{
			name: "retried op answered success that is not in the database",
			editHist: func(h *History) {
				opByKey(h, f.keyRetried).TransferID = uuid.NewString()
			},
			want: InvFinalAnswersMatchDB,
		},
		{
			name: "acknowledged amount differs from the transfer",
			editHist: func(h *History) {
				opByKey(h, f.keyAcked).Amount = 31
			},
			want: InvAckedPresent,
		},
		{
			name: "transfer no client sent",
			editHist: func(h *History) {
				h.Ops = slices.DeleteFunc(h.Ops, func(o *Op) bool { return o.Key == f.keyAcked })
			},
			want: InvNoUnsentTransfers,
		},
		{
			name: "acknowledged op missing from the balance",
			sql: []string{fmt.Sprintf(`UPDATE accounts SET balance = balance + 30 WHERE account_id = '%s'`, f.a),
				`UPDATE accounts SET balance = balance - 30 WHERE system_role = 'revenue' AND currency = 'USD'`},
			want: InvBalanceMatchesHistory,
		},
		{
			name: "balance differs from its entries",
			sql:  []string{fmt.Sprintf(`UPDATE accounts SET balance = balance + 1 WHERE account_id = '%s'`, f.b)},
			want: InvBalanceEqualsEntries,
		},
		{
			name: "money created from nothing",
			sql: []string{
				fmt.Sprintf(`UPDATE entries SET amount = amount + 1, balance_after = balance_after + 1
					WHERE account_id = '%s' AND sequence = (SELECT max(sequence) FROM entries WHERE account_id = '%s')`, f.d, f.d),
				fmt.Sprintf(`UPDATE accounts SET balance = balance + 1 WHERE account_id = '%s'`, f.d),
			},
			want: InvCurrencySumsZero,
		},
		{
			name: "gap in an account's sequences",
			sql:  []string{fmt.Sprintf(`UPDATE entries SET sequence = sequence + 10 WHERE account_id = '%s' AND sequence = 1`, f.d)},
			want: InvSequencesGapless,
		},
		{
			name: "version_after going backwards",
			sql:  []string{fmt.Sprintf(`UPDATE entries SET version_after = 0 WHERE account_id = '%s' AND sequence = 2`, f.a)},
			want: InvVersionsConsistent,
		},
		{
			name: "balance below the floor",
			sql: []string{
				"ALTER TABLE accounts DROP CONSTRAINT accounts_balance_floor, DROP CONSTRAINT accounts_held_within_floor",
				fmt.Sprintf(`UPDATE accounts SET credit_limit = 0 WHERE account_id = '%s'`, f.c),
			},
			want: InvFloorRespected,
		},
		{
			name: "transfer with one entry",
			sql: []string{fmt.Sprintf(`DELETE FROM entries WHERE account_id = '%s'
				AND transfer_id = (SELECT transfer_id FROM transfers WHERE idempotency_key = '%s')`, f.a, f.keyAcked)},
			want: InvTransferEntries,
		},
		{
			name: "service answered INTERNAL",
			editHist: func(h *History) {
				h.BadAnswers = append(h.BadAnswers, Answer{What: "op CHARGE k", Code: "INTERNAL", Message: "internal error"})
			},
			want: InvNoInternalAnswers,
		},
		{
			name: "op never answered",
			editHist: func(h *History) {
				o := opByKey(h, f.keyAcked)
				o.Outcome, o.FinalCode = OutcomeUnknown, "UNAVAILABLE"
			},
			want: InvOpsAnswered,
		},
		{
			name: "valid request answered ALREADY_EXISTS",
			editHist: func(h *History) {
				o := opByKey(h, f.keyAcked)
				o.Outcome, o.FinalCode, o.FinalReason = OutcomeUnexpected, "ALREADY_EXISTS", "IDEMPOTENCY_KEY_REUSED"
			},
			want: InvNoUnexpectedAnswers,
		},
		{
			name: "cached value without expiry",
			editCache: func(cs *CacheState) {
				cs.Values[0].PTTL = -1
			},
			want: InvCacheMatchesDB,
		},
		{
			name: "garbage left in the cache",
			editCache: func(cs *CacheState) {
				cs.Values = append(cs.Values, CachedValue{Key: "x:" + f.b, Account: f.b, Raw: "v1|garbage", PTTL: time.Second})
			},
			want: InvCacheMatchesDB,
		},
		{
			name: "cached read after healing returned an old pair",
			editHist: func(h *History) {
				h.Observations = append(h.Observations, Observation{Account: f.a, Consistency: ReadCached, Final: true,
					Version: 1, Balance: 100, Source: SourceCache, Start: time.Now()})
			},
			want: InvCacheMatchesDB,
		},
		{
			name: "key sent twice at once got two different answers",
			editHist: func(h *History) {
				o := opByKey(h, f.keyAcked)
				o.Hedged = true
				o.HedgeAnswers = []HedgeAnswer{{Code: "FAILED_PRECONDITION", Reason: "INSUFFICIENT_FUNDS"}}
			},
			want: InvFinalAnswersMatchDB,
		},
		{
			name: "key sent twice at once executed twice",
			editHist: func(h *History) {
				o := opByKey(h, f.keyAcked)
				o.Hedged = true
				o.HedgeAnswers = []HedgeAnswer{{Code: "OK", TransferID: o.TransferID}}
			},
			want: InvNoUnexpectedAnswers,
		},
		{
			name: "held differs from the open holds",
			sql:  []string{fmt.Sprintf(`UPDATE accounts SET held = held + 1 WHERE account_id = '%s'`, f.a)},
			want: InvHeldMatchesHolds,
		},
		{
			name: "negative held",
			sql: []string{"ALTER TABLE accounts DROP CONSTRAINT accounts_held_nonnegative, DROP CONSTRAINT accounts_next_hold_expiry_set",
				fmt.Sprintf(`UPDATE accounts SET held = -1 WHERE account_id = '%s'`, f.b)},
			want: InvHeldMatchesHolds,
		},
		{
			name: "open hold marked released without freeing held",
			sql:  []string{fmt.Sprintf(`UPDATE holds SET status = 3, finalized_at = created_at WHERE idempotency_key = '%s'`, f.keyHoldOpen)},
			want: InvHeldMatchesHolds,
		},
		{
			name: "hold captured beyond its amount",
			sql: []string{"ALTER TABLE holds DROP CONSTRAINT holds_captured_within_hold",
				fmt.Sprintf(`UPDATE holds SET captured_amount = amount + 1 WHERE idempotency_key = '%s'`, f.keyHoldCaptured)},
			want: InvHoldsOneFinalAction,
		},
		{
			name: "released hold that also has a capture",
			sql: []string{fmt.Sprintf(`UPDATE transfers SET hold_id = (SELECT hold_id FROM holds WHERE idempotency_key = '%s')
				WHERE idempotency_key = '%s'`, f.keyHoldReleased, f.keyAcked)},
			want: InvHoldsOneFinalAction,
		},
		{
			name: "captured hold whose capture moved another amount",
			sql: []string{"ALTER TABLE holds DROP CONSTRAINT holds_captured_within_hold",
				fmt.Sprintf(`UPDATE holds SET captured_amount = captured_amount - 1 WHERE idempotency_key = '%s'`, f.keyHoldCaptured)},
			want: InvHoldsOneFinalAction,
		},
		{
			name: "hold with an invalid status",
			sql: []string{"ALTER TABLE holds DROP CONSTRAINT holds_status_valid",
				fmt.Sprintf(`UPDATE holds SET status = 7 WHERE idempotency_key = '%s'`, f.keyHoldReleased)},
			want: InvHoldsOneFinalAction,
		},
		{
			name: "two final actions acknowledged on one hold",
			editHist: func(h *History) {
				c := opByKey(h, f.keyCapture)
				h.Ops = append(h.Ops, &Op{Kind: KindRelease, Key: uuid.NewString(), Account: c.Account, HoldID: c.HoldID, Amount: 10,
					Outcome: OutcomeAcked, FinalCode: "OK", Attempts: 1, Tallyds: 1, BalanceVersion: c.BalanceVersion, BalanceAfter: c.BalanceAfter})
			},
			want: InvHoldsOneFinalAction,
		},
		{
			name: "acknowledged hold lost",
			sql: []string{fmt.Sprintf(`DELETE FROM idempotency_keys WHERE idempotency_key = '%s'`, f.keyHoldOpen),
				fmt.Sprintf(`DELETE FROM holds WHERE idempotency_key = '%s'`, f.keyHoldOpen),
				fmt.Sprintf(`UPDATE accounts SET held = held - 3 WHERE account_id = '%s'`, f.a)},
			want: InvAckedPresent,
		},
		{
			name: "acknowledged hold amount differs",
			editHist: func(h *History) {
				opByKey(h, f.keyHoldOpen).Amount = 4
			},
			want: InvAckedPresent,
		},
		{
			name: "acknowledged release but the hold is still open",
			sql: []string{fmt.Sprintf(`UPDATE holds SET status = 1, finalized_at = NULL WHERE idempotency_key = '%s'`, f.keyHoldReleased),
				fmt.Sprintf(`UPDATE accounts SET held = held + 5 WHERE account_id = '%s'`, f.a)},
			want: InvAckedPresent,
		},
		{
			name: "refund total beyond the charge",
			sql: []string{"ALTER TABLE charge_refunds DROP CONSTRAINT charge_refunds_within_charge",
				`UPDATE charge_refunds SET refunded = amount + 1`},
			want: InvRefundsWithinCharge,
		},
		{
			name: "refunds exceed a charge",
			sql:  []string{fmt.Sprintf(`UPDATE transfers SET amount = 1 WHERE idempotency_key = '%s'`, f.keyAcked)},
			want: InvRefundsWithinCharge,
		},
		{
			name: "refund of a credit",
			sql:  []string{`UPDATE transfers SET refund_of = (SELECT transfer_id FROM transfers WHERE kind = 2 LIMIT 1) WHERE kind = 4`},
			want: InvRefundsWithinCharge,
		},
		{
			name: "refund moving money the wrong way",
			sql: []string{fmt.Sprintf(`UPDATE transfers SET debit_account_id = credit_account_id, credit_account_id = debit_account_id
				WHERE idempotency_key = '%s'`, f.keyRefund)},
			want: InvRefundsWithinCharge,
		},
		{
			name: "applied ATOMIC batch stored as not applied",
			sql:  []string{fmt.Sprintf(`UPDATE batches SET applied = false WHERE batch_key = '%s'`, f.batchApplied)},
			want: InvBatchesAllOrNothing,
		},
		{
			name: "ATOMIC batch answered not applied left its items",
			editHist: func(h *History) {
				for _, b := range h.Batches {
					if b.Key == f.batchApplied {
						b.Applied = false
					}
				}
				for _, o := range h.Ops {
					if o.BatchKey == f.batchApplied {
						o.Outcome, o.FinalCode, o.FinalReason = OutcomeNotApplied, "FAILED_PRECONDITION", "NOT_APPLIED"
					}
				}
			},
			want: InvFinalAnswersMatchDB,
		},
		{
			name: "item of an applied ATOMIC batch lost",
			sql: []string{
				fmt.Sprintf(`DELETE FROM entries WHERE transfer_id IN (SELECT transfer_id FROM transfers WHERE idempotency_key = '%s')`,
					f.itemKey(f.batchApplied, 1)),
				fmt.Sprintf(`DELETE FROM idempotency_keys WHERE idempotency_key = '%s'`, f.itemKey(f.batchApplied, 1)),
				fmt.Sprintf(`DELETE FROM transfers WHERE idempotency_key = '%s'`, f.itemKey(f.batchApplied, 1)),
			},
			want: InvBatchesAllOrNothing,
		},
		{
			name: "item of a failed ATOMIC batch recorded",
			sql: []string{fmt.Sprintf(`INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, kind, account_id, error_code, error_reason, error_message)
				SELECT scope, '%s', fingerprint, kind, account_id, 'FAILED_PRECONDITION', 'INSUFFICIENT_FUNDS', 'x'
				FROM idempotency_keys WHERE idempotency_key = '%s'`, f.itemKey(f.batchNotApplied, 1), f.keyReject)},
			want: InvBatchesAllOrNothing,
		},
		{
			name: "unanswered batch without a row whose items are there",
			sql:  []string{fmt.Sprintf(`DELETE FROM batches WHERE batch_key = '%s'`, f.batchApplied)},
			editHist: func(h *History) {
				for _, b := range h.Batches {
					if b.Key == f.batchApplied {
						b.Outcome, b.FinalCode = OutcomeUnknown, "UNAVAILABLE"
					}
				}
			},
			want: InvBatchesAllOrNothing,
		},
		{
			name: "batch no client sent",
			editHist: func(h *History) {
				h.Batches = slices.DeleteFunc(h.Batches, func(b *Batch) bool { return b.Key == f.batchIndependent })
			},
			want: InvBatchesAllOrNothing,
		},
		{
			name: "version advanced with nothing to show for it",
			sql:  []string{fmt.Sprintf(`UPDATE accounts SET version = version + 1 WHERE account_id = '%s'`, f.d)},
			want: InvVersionsConsistent,
		},
		{
			name: "balance minus held below the floor",
			sql: []string{"ALTER TABLE accounts DROP CONSTRAINT accounts_held_within_floor",
				fmt.Sprintf(`UPDATE accounts SET held = 6, next_hold_expiry = now() WHERE account_id = '%s'`, f.c)},
			want: InvFloorRespected,
		},
		{
			name: "read at a hold's version with a balance it never had",
			editHist: func(h *History) {
				o := opByKey(h, f.keyHoldOpen)
				h.Observations = append(h.Observations, Observation{Account: f.a, Consistency: ReadCached, Version: o.BalanceVersion,
					Balance: o.BalanceAfter + 1, Source: SourceCache, Start: time.Now()})
			},
			want: InvReadsExisted,
		},
		{
			name: "tallyd crashed",
			editHist: func(h *History) {
				h.Crashes = append(h.Crashes, Crash{Tallyd: 1, Status: "exit status 2", LogTail: "panic: boom"})
			},
			want: InvNoTallydCrashes,
		},
		{
			name: "feed: an event the follower never received",
			editHist: func(h *History) {
				h.Feed.Events = slices.Delete(h.Feed.Events, 3, 4)
			},
			want: InvFeedExactlyOnce,
		},
		{
			name: "feed: an event received twice",
			editHist: func(h *History) {
				h.Feed.Events = slices.Insert(h.Feed.Events, 3, h.Feed.Events[2])
			},
			want: InvFeedExactlyOnce,
		},
		{
			name: "feed: an event received twice after a resume from an old cursor",
			editHist: func(h *History) {
				h.Feed.Events = append(h.Feed.Events, h.Feed.Events[len(h.Feed.Events)-3:]...)
			},
			want: InvFeedExactlyOnce,
		},
		{
			name: "feed: a received event that is not in Postgres",
			sql:  []string{`DELETE FROM events WHERE (xid, event_id) = (SELECT xid, event_id FROM events WHERE kind = 'hold' ORDER BY xid, event_id LIMIT 1)`},
			want: InvFeedExactlyOnce,
		},
		{
			name: "feed: a transfer that never got an event",
			sql: []string{fmt.Sprintf(`DELETE FROM events WHERE kind = 'transfer'
				AND subject_id = (SELECT transfer_id FROM transfers WHERE idempotency_key = '%s')`, f.keyAcked)},
			editHist: func(h *History) {
				id := opByKey(h, f.keyAcked).TransferID
				h.Feed.Events = slices.DeleteFunc(h.Feed.Events, func(e FeedEvent) bool { return e.Kind == "transfer" && e.Subject == id })
			},
			want: InvFeedExactlyOnce,
		},
		{
			name: "feed: out of order",
			editHist: func(h *History) {
				h.Feed.Events[1], h.Feed.Events[2] = h.Feed.Events[2], h.Feed.Events[1]
			},
			want: InvFeedExactlyOnce,
		},
		{
			name: "feed: the follower did not catch up",
			editHist: func(h *History) {
				h.Feed.Events = h.Feed.Events[:len(h.Feed.Events)-1]
				h.Feed.CaughtUp = false
			},
			want: InvFeedExactlyOnce,
		},
		{
			name: "reconcile: a finding",
			editHist: func(h *History) {
				h.Reconcile.Findings = append(h.Reconcile.Findings, formatFinding("balance_vs_entries", f.a, "", "USD", "balance 71, entries sum to 70"))
				h.Reconcile.SummaryFindings++
			},
			want: InvReconcileClean,
		},
		{
			name: "reconcile: did not complete",
			editHist: func(h *History) {
				h.Reconcile.Error = "tallyd 0: rpc error: code = Unavailable"
			},
			want: InvReconcileClean,
		},
		{
			name: "lifecycle: ACCOUNT_NOT_ACTIVE while nothing was frozen",
			editHist: func(h *History) {
				h.Lifecycle = slices.DeleteFunc(h.Lifecycle, func(c LifecycleCall) bool { return c.Account == f.d })
			},
			want: InvLifecycleAnswers,
		},
		{
			name: "lifecycle: an account left frozen",
			sql:  []string{fmt.Sprintf(`UPDATE accounts SET status = 2 WHERE account_id = '%s'`, f.a)},
			want: InvLifecycleAnswers,
		},
		{
			name: "lifecycle: a closed account reopened",
			sql:  []string{fmt.Sprintf(`UPDATE accounts SET status = 1 WHERE account_id = '%s'`, f.e)},
			want: InvLifecycleAnswers,
		},
		{
			name: "lifecycle: an unexpected answer",
			editHist: func(h *History) {
				for i := range h.Lifecycle {
					if h.Lifecycle[i].Action == ActionUpdate && h.Lifecycle[i].Code == "OK" {
						h.Lifecycle[i].Code, h.Lifecycle[i].Reason = "FAILED_PRECONDITION", reasonCreditLimitUsed
					}
				}
			},
			want: InvLifecycleAnswers,
		},
		{
			name: "floor: an entry below every credit limit the account ever had",
			sql:  []string{fmt.Sprintf(`UPDATE entries SET balance_after = -21 WHERE account_id = '%s' AND sequence = 1`, f.c)},
			want: InvFloorRespected,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := f.check(t, tc.sql, tc.editHist, tc.editCache)
			fails := failed(res)
			if !slices.Contains(fails, tc.want) {
				t.Fatalf("damage not caught by %s; failed: %v%s", tc.want, fails, describe(res))
			}
			t.Logf("caught by %v", fails)
		})
	}
}

// TestCheckerCacheSnapshot plants values under a private prefix in the
// shared Redis and checks that LoadCacheState reads them back and the
// checker catches a stale one.
func TestCheckerCacheSnapshot(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	opt, err := redis.ParseURL(testRedisURL())
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	if err := rdb.Ping(ctx).Err(); err != nil {
		t.Fatalf("shared test Redis (%s): %v", testRedisURL(), err)
	}
	prefix := "tally_torture_test_" + randomSuffix() + ":bal:"
	acct := uuid.NewString()
	other := uuid.NewString()
	t.Cleanup(func() { rdb.Del(context.Background(), prefix+acct, prefix+other) })
	if err := rdb.Set(ctx, prefix+acct, CacheValue(3, 70, 0, 70, "USD", time.Now()), 2*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Set(ctx, prefix+other, CacheValue(1, 5, 0, 5, "USD", time.Now()), 2*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	cs, err := LoadCacheState(ctx, rdb, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs.Values) != 2 {
		t.Fatalf("found %d values, want 2: %+v", len(cs.Values), cs.Values)
	}
	db := &DBState{
		Accounts: map[string]*AccountRow{
			acct:  {ID: acct, Currency: "USD", Floor: 1, Balance: 70, Version: 4, LastSequence: 4},
			other: {ID: other, Currency: "USD", Floor: 1, Balance: 5, Version: 1, LastSequence: 1},
		},
		Entries: map[string][]EntryRow{},
	}
	res := Check(NewHistory(), db, cs, CheckOptions{CacheTTL: 2 * time.Second})
	for _, r := range res {
		if r.Name != InvCacheMatchesDB {
			continue
		}
		if r.Pass || r.Violations != 1 || !strings.Contains(r.Examples[0], acct) {
			t.Fatalf("stale cached value of %s not caught exactly once: %+v", acct, r)
		}
		return
	}
	t.Fatal("no cache invariant in the results")
}

// TestCachedReadAgeBound checks the age bound on a hand-built state: a
// cached read of a pair superseded long ago fails, unless the nemesis
// planted that very pair just before.
func TestCachedReadAgeBound(t *testing.T) {
	acct := uuid.NewString()
	t0 := time.Now().Add(-time.Minute)
	db := &DBState{
		Accounts: map[string]*AccountRow{acct: {ID: acct, Currency: "USD", Floor: 2, Balance: 0, Version: 2, LastSequence: 2}},
		Entries: map[string][]EntryRow{acct: {
			{TransferID: "t1", Account: acct, Sequence: 1, Amount: 10, BalanceAfter: 10, VersionAfter: 1, CreatedAt: t0},
			{TransferID: "t2", Account: acct, Sequence: 2, Amount: -10, BalanceAfter: 0, VersionAfter: 2, CreatedAt: t0.Add(time.Second)},
		}},
	}
	read := Observation{Account: acct, Consistency: ReadCached, Version: 1, Balance: 10, Source: SourceCache, Start: time.Now()}
	ageResult := func(h *History) InvariantResult {
		h.Observations = append(h.Observations, read)
		for _, r := range Check(h, db, nil, CheckOptions{CacheTTL: 2 * time.Second}) {
			if r.Name == InvCachedReadAge {
				return r
			}
		}
		t.Fatal("no age invariant")
		return InvariantResult{}
	}
	if r := ageResult(NewHistory()); r.Pass {
		t.Fatalf("a pair superseded a minute ago passed the 2s age bound: %+v", r)
	}
	h := NewHistory()
	h.AddPlant(Plant{Account: acct, Version: 1, Balance: 10, At: time.Now().Add(-500 * time.Millisecond), TTL: 2 * time.Second})
	if r := ageResult(h); !r.Pass {
		t.Fatalf("a freshly planted stale pair was not excused: %+v", r)
	}
}

func TestCacheValueRoundTrip(t *testing.T) {
	v := CacheValue(42, -7, 10, 3, "CREDITS", time.Unix(1, 5))
	if v != "v2|42|-7|10|3|CREDITS|1000000005|0|0" {
		t.Fatalf("CacheValue = %q", v)
	}
	if ver, bal, ok := ParseCacheValue(v); !ok || ver != 42 || bal != -7 {
		t.Fatalf("ParseCacheValue(%q) = %d, %d, %v", v, ver, bal, ok)
	}
	for _, g := range garbageValues {
		if _, _, ok := ParseCacheValue(g); ok {
			t.Errorf("garbage %q parsed as a value", g)
		}
	}
}

// TestReconcileCleanCatchesTamperedBalance runs a real reconciliation over
// a ledger whose stored balance was tampered with: the finding must fail
// reconcile_clean (and the untampered ledger must pass it).
func TestReconcileCleanCatchesTamperedBalance(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dbURL := scratchDB(t, ctx)
	st, err := store.Open(ctx, store.Config{URL: dbURL})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l := ledger.New(ledger.Config{Store: st})
	a, err := l.CreateAccount(ctx, ledger.CreateAccountRequest{Currency: "USD"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Credit(ctx, ledger.MoveRequest{AccountID: a.ID, Amount: 70, IdempotencyKey: uuid.Must(uuid.NewV7()).String()}); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	run := func() []InvariantResult {
		h := NewHistory()
		h.Reconcile = reconcileLedger(t, ctx, l)
		db, err := LoadDBState(ctx, conn)
		if err != nil {
			t.Fatal(err)
		}
		return Check(h, db, nil, checkOpts)
	}
	pass := func(res []InvariantResult) bool {
		for _, r := range res {
			if r.Name == InvReconcileClean {
				return r.Pass && !r.Skipped
			}
		}
		t.Fatal("no reconcile_clean result")
		return false
	}
	if res := run(); !pass(res) {
		t.Fatalf("untampered ledger fails reconcile_clean:%s", describe(res))
	}
	if _, err := conn.Exec(ctx, `UPDATE accounts SET balance = balance + 1 WHERE account_id = $1`, a.ID); err != nil {
		t.Fatal(err)
	}
	res := run()
	if pass(res) {
		t.Fatal("a tampered balance passed reconcile_clean")
	}
	for _, r := range res {
		if r.Name == InvReconcileClean {
			t.Logf("caught: %v", r.Examples)
			if len(r.Examples) == 0 || !strings.Contains(r.Examples[0], "balance_vs_entries") {
				t.Errorf("expected a balance_vs_entries finding, got %v", r.Examples)
			}
		}
	}
}
