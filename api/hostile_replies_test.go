package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Hostile clients (issue 16, parts 3 and 5): replies that cannot be sent,
// malformed protobuf, and the logs of wrong secrets.

// maxMetadata is the largest metadata the default limits accept.
func maxMetadata() map[string]string {
	m := map[string]string{}
	for i := 0; i < ledger.MetadataKeysMaxDefault; i++ {
		k := fmt.Sprintf("%02d", i)
		m[k+strings.Repeat("k", ledger.MetadataKeyBytesMaxDefault-len(k))] = strings.Repeat("v", ledger.MetadataValueBytesMaxDefault)
	}
	return m
}

var maxDescription = strings.Repeat("d", ledger.DescriptionBytesMaxDefault)

// maxKey is an idempotency key of the largest allowed length.
func maxKey(prefix string, i int) string {
	s := fmt.Sprintf("%s-%05d-", prefix, i)
	return s + strings.Repeat("x", ledger.IdempotencyKeyBytesMax-len(s))
}

func batchRows(t *testing.T, env *tallytest.Env, key string) int {
	t.Helper()
	var n int
	if err := env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM batches WHERE batch_key = $1`, key).Scan(&n); err != nil {
		t.Fatalf("count batches: %v", err)
	}
	return n
}

// currencyBooks is what one test's currency holds: other tests run in
// parallel on the same database, so global counts would move under us.
type currencyBooks struct {
	Entries, Holds, OpenHolds, Keys int64
	Accounts                        string
}

// countCurrencyBooks reads the books of currency cur.
func countCurrencyBooks(t *testing.T, env *tallytest.Env, cur string) currencyBooks {
	t.Helper()
	var b currencyBooks
	// Through indexes only (the shared database is large): accounts by
	// currency, entries and holds by account, keys by the scope of this
	// env's admin client (the scope of its holds).
	err := env.Store.Pool().QueryRow(context.Background(), `WITH a AS (SELECT * FROM accounts WHERE currency = $1)
		SELECT
		(SELECT count(*) FROM entries WHERE account_id IN (SELECT account_id FROM a)),
		(SELECT count(*) FROM holds WHERE account_id IN (SELECT account_id FROM a)),
		(SELECT count(*) FROM holds WHERE account_id IN (SELECT account_id FROM a) AND status = 1),
		(SELECT count(*) FROM idempotency_keys WHERE scope = (SELECT scope FROM holds WHERE account_id IN (SELECT account_id FROM a) LIMIT 1)),
		(SELECT coalesce(string_agg(account_id::text || ':' || balance || ':' || held || ':' || version, ',' ORDER BY account_id), '') FROM a)`, cur).
		Scan(&b.Entries, &b.Holds, &b.OpenHolds, &b.Keys, &b.Accounts)
	if err != nil {
		t.Fatalf("count: %v", err)
	}
	return b
}

// createHolds makes n holds on acct with the largest metadata and
// description, in batches that fit the request limit.
func createHolds(t *testing.T, env *tallytest.Env, acct string, n int) []string {
	t.Helper()
	return createHoldsWith(t, env, acct, n, maxMetadata())
}

func createHoldsWith(t *testing.T, env *tallytest.Env, acct string, n int, md map[string]string) []string {
	t.Helper()
	var ids []string
	for len(ids) < n {
		req := &tallyv1.SubmitBatchRequest{BatchKey: maxKey(tallytest.RandomSuffix(), len(ids)), Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT}
		for len(ids)+len(req.Operations) < n && len(req.Operations) < 100 {
			req.Operations = append(req.Operations, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Hold{Hold: &tallyv1.HoldRequest{
				AccountId: acct, Amount: 1, IdempotencyKey: maxKey("hold-"+tallytest.RandomSuffix(), len(ids)+len(req.Operations)),
				Description: maxDescription, Metadata: md}}})
		}
		res, err := env.Raw.SubmitBatch(ctxT(t), req)
		if err != nil {
			t.Fatalf("creating holds: %v", err)
		}
		for _, r := range res.GetResults() {
			if r.GetHold() == nil {
				t.Fatalf("creating holds: %v", r)
			}
			ids = append(ids, r.GetHold().GetHold().GetHoldId())
		}
	}
	return ids
}

// submitOrRefused submits req and checks the only two allowed outcomes:
// it commits and answers (every operation succeeded), or it is refused
// before commit with FAILED_PRECONDITION / BATCH_REPLY_TOO_LARGE and
// nothing is stored. A retry with the same batch key behaves the same.
// It reports whether the batch committed.
func submitOrRefused(t *testing.T, env *tallytest.Env, cur, name string, req *tallyv1.SubmitBatchRequest) bool {
	t.Helper()
	before := countCurrencyBooks(t, env, cur)
	res, err := env.Raw.SubmitBatch(ctxT(t), req)
	if err != nil {
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("%s (%d operations, %d bytes): got %v, want success or FAILED_PRECONDITION BATCH_REPLY_TOO_LARGE",
				name, len(req.Operations), proto.Size(req), err)
		}
		wantErr(t, err, codes.FailedPrecondition, "BATCH_REPLY_TOO_LARGE")
		if after := countCurrencyBooks(t, env, cur); after != before {
			t.Fatalf("%s: refused batch changed the currencyBooks: %+v -> %+v", name, before, after)
		}
		if n := batchRows(t, env, req.BatchKey); n != 0 {
			t.Fatalf("%s: refused batch stored its key", name)
		}
		_, err2 := env.Raw.SubmitBatch(ctxT(t), req)
		wantErr(t, err2, codes.FailedPrecondition, "BATCH_REPLY_TOO_LARGE")
		if after := countCurrencyBooks(t, env, cur); after != before {
			t.Fatalf("%s: retry of a refused batch changed the currencyBooks", name)
		}
		return false
	}
	if len(res.GetResults()) != len(req.Operations) || !res.GetApplied() {
		t.Fatalf("%s: %d results for %d operations, applied %v", name, len(res.GetResults()), len(req.Operations), res.GetApplied())
	}
	for i, r := range res.GetResults() {
		if r.GetError() != nil {
			t.Fatalf("%s: operation %d failed: %v", name, i, r.GetError())
		}
	}
	again, err := env.Raw.SubmitBatch(ctxT(t), req)
	if err != nil {
		t.Fatalf("%s: retry of a committed batch: %v", name, err)
	}
	if !again.GetReplayed() || len(again.GetResults()) != len(req.Operations) {
		t.Fatalf("%s: retry not replayed: replayed %v, %d results", name, again.GetReplayed(), len(again.GetResults()))
	}
	return true
}

// fill adds operations made by op until the batch holds the most
// operations allowed or the next one would pass the request's byte limit.
func fill(req *tallyv1.SubmitBatchRequest, op func(i int) *tallyv1.BatchOperation) {
	for i := len(req.Operations); i < ledger.SubmitBatchItemsMaxDefault; i++ {
		req.Operations = append(req.Operations, op(i))
		if proto.Size(req) > api.SubmitBatchBytesMaxDefault {
			req.Operations = req.Operations[:len(req.Operations)-1]
			return
		}
	}
}

func TestHostileLargestBatchOfEveryKindAnswers(t *testing.T) {
	t.Parallel()
	start := time.Now()
	env := newEnv(t)
	cur := newCurrency()
	a := createAccount(t, env, cur).GetAccountId()
	b := createAccount(t, env, cur).GetAccountId()
	credit(t, env, a, 1<<40)
	credit(t, env, b, 1<<40)
	// Charges to refund, and holds to capture and release (the largest
	// metadata, so the replies of tiny capture and release requests are big).
	var charges []string
	for i := 0; i < ledger.SubmitBatchItemsMaxDefault; i += 500 {
		req := &tallyv1.SubmitBatchRequest{BatchKey: maxKey("charges-"+cur, i), Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT}
		for j := 0; j < 500; j++ {
			req.Operations = append(req.Operations, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{
				AccountId: a, Amount: 10, IdempotencyKey: maxKey("tocharge-"+cur, i+j)}}})
		}
		res, err := env.Raw.SubmitBatch(ctxT(t), req)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range res.GetResults() {
			charges = append(charges, r.GetTransfer().GetTransfer().GetTransferId())
		}
	}
	// A quarter of the largest metadata is enough to make the replies of
	// 1,000 captures (10 MB) and releases (6 MB) too large, at a quarter of
	// the set-up; TestHostileCaptureBatchReplyTooLarge uses the largest.
	md := map[string]string{}
	for k, v := range maxMetadata() {
		if len(md) < ledger.MetadataKeysMaxDefault/4 {
			md[k] = v
		}
	}
	holds := createHoldsWith(t, env, a, ledger.SubmitBatchItemsMaxDefault, md)
	t.Logf("set-up done after %s", time.Since(start))

	// Both modes for the tiny capture and release requests; one mode each
	// for the others (each such batch carries 3 MiB).
	ind, atomic := tallyv1.BatchMode_BATCH_MODE_INDEPENDENT, tallyv1.BatchMode_BATCH_MODE_ATOMIC
	modes := map[string][]tallyv1.BatchMode{"charge": {ind}, "credit": {atomic}, "transfer": {ind}, "hold": {atomic}, "refund": {ind},
		"capture": {ind, atomic}, "release": {ind}}
	kinds := []struct {
		name string
		op   func(i int) *tallyv1.BatchOperation
	}{
		{"charge", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Charge{Charge: &tallyv1.ChargeRequest{
				AccountId: a, Amount: 1, IdempotencyKey: maxKey("charge-"+cur, i), Description: maxDescription, Metadata: maxMetadata()}}}
		}},
		{"credit", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Credit{Credit: &tallyv1.CreditRequest{
				AccountId: a, Amount: 1, IdempotencyKey: maxKey("credit-"+cur, i), Description: maxDescription, Metadata: maxMetadata()}}}
		}},
		{"transfer", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Transfer{Transfer: &tallyv1.TransferRequest{
				DebitAccountId: a, CreditAccountId: b, Amount: 1, IdempotencyKey: maxKey("transfer-"+cur, i), Description: maxDescription, Metadata: maxMetadata()}}}
		}},
		{"hold", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Hold{Hold: &tallyv1.HoldRequest{
				AccountId: b, Amount: 1, IdempotencyKey: maxKey("hold-"+cur, i), Description: maxDescription, Metadata: maxMetadata()}}}
		}},
		{"refund", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Refund{Refund: &tallyv1.RefundRequest{
				TransferId: charges[i], Amount: 1, IdempotencyKey: maxKey("refund-"+cur, i), Reason: maxDescription, Metadata: maxMetadata()}}}
		}},
		// Tiny requests whose replies carry the holds' metadata twice (the
		// hold and the capture transfer).
		{"capture", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_CaptureHold{CaptureHold: &tallyv1.CaptureHoldRequest{
				HoldId: holds[i], IdempotencyKey: maxKey("capture-"+cur, i)}}}
		}},
		{"release", func(i int) *tallyv1.BatchOperation {
			return &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_ReleaseHold{ReleaseHold: &tallyv1.ReleaseHoldRequest{
				HoldId: holds[i], IdempotencyKey: maxKey("release-"+cur, i)}}}
		}},
	}
	committed := map[string]bool{}
	for _, k := range kinds {
		for _, mode := range modes[k.name] {
			name := k.name + "/" + mode.String()
			req := &tallyv1.SubmitBatchRequest{BatchKey: maxKey(name+cur, 0), Mode: mode}
			fill(req, func(i int) *tallyv1.BatchOperation {
				op := k.op(i)
				// Distinct keys per mode.
				s := strings.Replace(fmt.Sprint(mode), "BATCH_MODE_", "", 1)[:1]
				switch o := op.GetOp().(type) {
				case *tallyv1.BatchOperation_Charge:
					o.Charge.IdempotencyKey = s + o.Charge.IdempotencyKey[1:]
				case *tallyv1.BatchOperation_Credit:
					o.Credit.IdempotencyKey = s + o.Credit.IdempotencyKey[1:]
				case *tallyv1.BatchOperation_Transfer:
					o.Transfer.IdempotencyKey = s + o.Transfer.IdempotencyKey[1:]
				case *tallyv1.BatchOperation_Hold:
					o.Hold.IdempotencyKey = s + o.Hold.IdempotencyKey[1:]
				case *tallyv1.BatchOperation_Refund:
					o.Refund.IdempotencyKey = s + o.Refund.IdempotencyKey[1:]
				case *tallyv1.BatchOperation_CaptureHold:
					o.CaptureHold.IdempotencyKey = s + o.CaptureHold.IdempotencyKey[1:]
				case *tallyv1.BatchOperation_ReleaseHold:
					o.ReleaseHold.IdempotencyKey = s + o.ReleaseHold.IdempotencyKey[1:]
				}
				return op
			})
			if k.name == "refund" && mode == tallyv1.BatchMode_BATCH_MODE_ATOMIC {
				// Refund other charges than the INDEPENDENT batch did.
				for i, op := range req.Operations {
					op.GetRefund().TransferId = charges[len(charges)-1-i]
				}
			}
			ok := submitOrRefused(t, env, cur, name, req)
			committed[name] = ok
			t.Logf("%s: %d operations, %d request bytes: committed %v (at %s)", name, len(req.Operations), proto.Size(req), ok, time.Since(start))
		}
	}
	// The largest capture and release batches reply with every hold's
	// metadata: they must be refused, not committed unanswered.
	for _, name := range []string{"capture/BATCH_MODE_INDEPENDENT", "release/BATCH_MODE_INDEPENDENT"} {
		if committed[name] {
			t.Errorf("%s committed a reply larger than the message limit", name)
		}
	}
	env.CheckBooks(t)
}

// The case: 250 captures of holds with large metadata.
func TestHostileCaptureBatchReplyTooLarge(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	acct := createAccount(t, env, cur).GetAccountId()
	credit(t, env, acct, 1<<40)
	holds := createHolds(t, env, acct, 250)
	req := &tallyv1.SubmitBatchRequest{BatchKey: "captures-" + cur, Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT}
	for i, h := range holds {
		req.Operations = append(req.Operations, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_CaptureHold{CaptureHold: &tallyv1.CaptureHoldRequest{
			HoldId: h, IdempotencyKey: fmt.Sprintf("capture-%s-%d", cur, i)}}})
	}
	t.Logf("request: %d bytes", proto.Size(req))
	before := countCurrencyBooks(t, env, cur)
	balance := strongBalance(t, env, acct)
	for attempt := 0; attempt < 2; attempt++ {
		_, err := env.Raw.SubmitBatch(ctxT(t), req)
		if c := status.Code(err); c == codes.ResourceExhausted || c == codes.Unavailable || c == codes.DeadlineExceeded || c == codes.OK {
			t.Fatalf("attempt %d: got %v: a retryable code (or success) for a reply that cannot be sent", attempt, err)
		}
		wantErr(t, err, codes.FailedPrecondition, "BATCH_REPLY_TOO_LARGE")
		if after := countCurrencyBooks(t, env, cur); after != before {
			t.Fatalf("attempt %d: the refused batch committed: %+v -> %+v", attempt, before, after)
		}
		if n := batchRows(t, env, req.BatchKey); n != 0 {
			t.Fatalf("attempt %d: the refused batch stored its key", attempt)
		}
		if b := strongBalance(t, env, acct); b.GetHeld() != balance.GetHeld() || b.GetBalance() != balance.GetBalance() {
			t.Fatalf("attempt %d: balance changed: %v -> %v", attempt, balance, b)
		}
	}
	h, err := env.Raw.GetHold(ctxT(t), &tallyv1.GetHoldRequest{HoldId: holds[0]})
	if err != nil || h.GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_OPEN {
		t.Fatalf("hold after the refused batch: %v %v", h.GetStatus(), err)
	}
	// Split, it goes through: every capture answered once.
	for i := 0; i < len(req.Operations); i += 50 {
		part := &tallyv1.SubmitBatchRequest{BatchKey: fmt.Sprintf("%s-part-%d", req.BatchKey, i), Mode: req.Mode, Operations: req.Operations[i : i+50]}
		res, err := env.Raw.SubmitBatch(ctxT(t), part)
		if err != nil {
			t.Fatalf("part %d: %v", i, err)
		}
		for j, r := range res.GetResults() {
			if r.GetHold().GetHold().GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_CAPTURED {
				t.Fatalf("part %d op %d: %v", i, j, r)
			}
		}
	}
	env.CheckBooks(t)
}

func TestHostileFindAccountsPageFits(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	cur := newCurrency()
	const n = 250 // 250 x ~19.5 KB of metadata: more than 4 MiB
	want := map[string]bool{}
	for i := 0; i < n; i++ {
		a := createAccount(t, env, cur, func(r *tallyv1.CreateAccountRequest) {
			r.Metadata = maxMetadata()
			r.ExternalRef = strings.Repeat("r", ledger.ExternalRefBytesMax)
		})
		want[a.GetAccountId()] = true
	}
	got := map[string]bool{}
	tok, pages := "", 0
	for {
		res, err := env.Raw.FindAccounts(ctxT(t), &tallyv1.FindAccountsRequest{Currency: cur, Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, PageSize: ledger.PageSizeMaxDefault, PageToken: tok})
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		pages++
		if sz := proto.Size(res); sz > api.MsgBytesMaxDefault {
			t.Fatalf("page %d is %d bytes", pages, sz)
		}
		if len(res.GetAccounts()) == 0 {
			t.Fatalf("page %d is empty", pages)
		}
		for _, a := range res.GetAccounts() {
			if got[a.GetAccountId()] {
				t.Fatalf("account %s on two pages", a.GetAccountId())
			}
			got[a.GetAccountId()] = true
		}
		if tok = res.GetNextPageToken(); tok == "" {
			break
		}
		if pages > n {
			t.Fatal("pages never end")
		}
	}
	if len(got) != len(want) || pages < 2 {
		t.Fatalf("reached %d of %d accounts in %d pages", len(got), len(want), pages)
	}
	for id := range want {
		if !got[id] {
			t.Fatalf("account %s never listed", id)
		}
	}
}

// rawCodec sends []byte as is and decodes replies as protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	if b, ok := v.([]byte); ok {
		return b, nil
	}
	return proto.Marshal(v.(proto.Message))
}
func (rawCodec) Unmarshal(b []byte, v any) error { return proto.Unmarshal(b, v.(proto.Message)) }
func (rawCodec) Name() string                    { return "proto" }

func TestHostileMalformedRequest(t *testing.T) {
	t.Parallel()
	env := newAuthEnv(t)
	acct := createAccount(t, env, newCurrency())
	conn := rawConn(t, env)
	bodies := map[string][]byte{
		"invalid UTF-8":         {0x0a, 0x02, 0xff, 0xfe},
		"truncated string":      {0x0a, 0x20, 'a'},
		"truncated varint":      {0x10, 0xff},
		"bad wire type":         {0x0f},
		"nested invalid UTF-8":  append([]byte{0x2a, 0x06, 0x0a, 0x04}, 0xc3, 0x28, 'x', 'y'),
		"truncated after field": append([]byte{0x0a, 0x24}, []byte(acct.GetAccountId()[:20])...),
	}
	ctx := withAuthz(ctxT(t), "Bearer "+env.AdminKey)
	check := func(what string, err error) {
		t.Helper()
		if c := status.Code(err); c == codes.Internal || c == codes.OK {
			t.Fatalf("%s: got %v, want INVALID_ARGUMENT MALFORMED_REQUEST", what, err)
		}
		wantErr(t, err, codes.InvalidArgument, "MALFORMED_REQUEST")
	}
	for name, body := range bodies {
		for _, m := range []string{tallyv1.LedgerService_GetAccount_FullMethodName, tallyv1.LedgerService_Charge_FullMethodName,
			tallyv1.LedgerService_CreateAccount_FullMethodName} {
			if name == "nested invalid UTF-8" && m != tallyv1.LedgerService_Charge_FullMethodName {
				continue
			}
			err := conn.Invoke(ctx, m, body, &tallyv1.Account{}, grpc.ForceCodec(rawCodec{}))
			check(name+" "+m, err)
		}
		if name == "nested invalid UTF-8" {
			continue // field 5 is unknown to ExportTransfersRequest: valid
		}
		// A server stream: the request is read after the interceptors.
		desc := &grpc.StreamDesc{ServerStreams: true}
		st, err := conn.NewStream(ctx, desc, tallyv1.LedgerService_ExportTransfers_FullMethodName, grpc.ForceCodec(rawCodec{}))
		if err != nil {
			t.Fatal(err)
		}
		if err := st.SendMsg(body); err != nil {
			t.Fatal(err)
		}
		_ = st.CloseSend()
		err = st.RecvMsg(&tallyv1.ExportTransfersResponse{})
		check(name+" ExportTransfers", err)
	}
	// Without credentials a malformed body is still refused (by auth first).
	err := conn.Invoke(ctxT(t), tallyv1.LedgerService_GetAccount_FullMethodName, bodies["invalid UTF-8"], &tallyv1.Account{}, grpc.ForceCodec(rawCodec{}))
	if c := status.Code(err); c != codes.Unauthenticated && c != codes.InvalidArgument {
		t.Fatalf("malformed without credentials: %v", err)
	}
	// The connection still serves well-formed calls, raw or not.
	good, _ := proto.Marshal(&tallyv1.GetAccountRequest{AccountId: acct.GetAccountId()})
	var got tallyv1.Account
	if err := conn.Invoke(ctx, tallyv1.LedgerService_GetAccount_FullMethodName, good, &got, grpc.ForceCodec(rawCodec{})); err != nil || got.GetAccountId() != acct.GetAccountId() {
		t.Fatalf("well-formed raw call: %v %v", err, got.GetAccountId())
	}
	if _, err := tallyv1.NewLedgerServiceClient(conn).GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: acct.GetAccountId()}); err != nil {
		t.Fatalf("well-formed call: %v", err)
	}
}

func TestHostileWrongSecretLoggedWithKeyID(t *testing.T) {
	t.Parallel()
	logs := &syncBuffer{}
	env := newAuthEnv(t, func(o *tallytest.Options) { o.LogWriter = logs })
	acct := createAccount(t, env, newCurrency())
	viewer := env.NewKey(t, auth.RoleViewer, "")
	other, _ := auth.NewKey()
	id := viewer.Key.ID
	attempts := map[string]string{
		"well-formed wrong secret": auth.Key{ID: id, Secret: other.Secret}.String(),
		"short secret":             auth.KeyPrefix + id + "_wrong",
		"long secret":              viewer.Key.String() + "x",
		"empty secret":             auth.KeyPrefix + id + "_",
		"non-canonical base64":     auth.KeyPrefix + id + "_" + viewer.Key.Secret[:42] + "_",
	}
	cl := tallyv1.NewLedgerServiceClient(rawConn(t, env))
	for name, key := range attempts {
		_, err := cl.GetAccount(withAuthz(ctxT(t), "Bearer "+key), &tallyv1.GetAccountRequest{AccountId: acct.GetAccountId()})
		wantErr(t, err, codes.Unauthenticated, api.ReasonUnauthenticated)
		found := false
		for _, line := range strings.Split(logs.String(), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != "auth: invalid API key" {
				continue
			}
			if rec["key_id"] == id {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: refused attempt not logged with key_id %q; logs:\n%s", name, id, grepLines(logs.String(), "invalid API key"))
		}
		if strings.Contains(logs.String(), viewer.Key.Secret) || strings.Contains(logs.String(), other.Secret) {
			t.Fatalf("%s: logs contain a secret", name)
		}
		// Forget the lines seen so far.
		logs.mu.Lock()
		logs.b.Reset()
		logs.mu.Unlock()
	}
	// One message for every bad credential, a missing one included.
	_, errBad := cl.GetAccount(withAuthz(ctxT(t), "Bearer "+attempts["short secret"]), &tallyv1.GetAccountRequest{AccountId: acct.GetAccountId()})
	_, errNone := cl.GetAccount(ctxT(t), &tallyv1.GetAccountRequest{AccountId: acct.GetAccountId()})
	wantErr(t, errNone, codes.Unauthenticated, api.ReasonUnauthenticated)
	if a, b := status.Convert(errBad).Message(), status.Convert(errNone).Message(); a != b {
		t.Errorf("a missing credential reads %q, a bad one %q", b, a)
	}
	// Garbage is not echoed as a key id.
	_, err := cl.GetAccount(withAuthz(ctxT(t), "Bearer tly_NOTANID!!!!_x"), &tallyv1.GetAccountRequest{AccountId: acct.GetAccountId()})
	wantErr(t, err, codes.Unauthenticated, api.ReasonUnauthenticated)
	if strings.Contains(logs.String(), "NOTANID") {
		t.Fatalf("caller-chosen garbage logged as a key id: %s", logs.String())
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// The last line: with the ledger's bound raised past the message limit, a
// committed batch whose reply cannot be sent is answered with the final
// REPLY_TOO_LARGE (committed=true), never RESOURCE_EXHAUSTED, and each
// operation's outcome can still be learned by its own key.
func TestHostileReplyTooLargeIsFinal(t *testing.T) {
	t.Parallel()
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: tallytest.RedisURL(), ClientPolicy: noRetry,
		Limits: ledger.Limits{BatchReplyBytesMax: 64 << 20}})
	cur := newCurrency()
	acct := createAccount(t, env, cur).GetAccountId()
	credit(t, env, acct, 1<<40)
	holds := createHolds(t, env, acct, 120) // 120 captures reply ~4.8 MB
	req := &tallyv1.SubmitBatchRequest{BatchKey: "last-line-" + cur, Mode: tallyv1.BatchMode_BATCH_MODE_INDEPENDENT}
	for i, h := range holds {
		req.Operations = append(req.Operations, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_CaptureHold{CaptureHold: &tallyv1.CaptureHoldRequest{
			HoldId: h, IdempotencyKey: fmt.Sprintf("last-line-%s-%d", cur, i)}}})
	}
	for attempt := 0; attempt < 2; attempt++ {
		_, err := env.Raw.SubmitBatch(ctxT(t), req)
		wantErr(t, err, codes.FailedPrecondition, api.ReasonReplyTooLarge)
		info, _ := api.ErrorInfo(err)
		if info.GetMetadata()["committed"] != "true" || !strings.Contains(status.Convert(err).Message(), "idempotency key") {
			t.Fatalf("attempt %d: %v %v", attempt, info.GetMetadata(), err)
		}
	}
	// The batch did commit; each capture replays alone by its key.
	res, err := env.Raw.CaptureHold(ctxT(t), req.Operations[7].GetCaptureHold())
	if err != nil || !res.GetReplayed() || res.GetHold().GetStatus() != tallyv1.HoldStatus_HOLD_STATUS_CAPTURED {
		t.Fatalf("capture alone after the batch: %v replayed=%v", err, res.GetReplayed())
	}
	env.CheckBooks(t)
}

// A refund's text field is "reason": its errors say so.
func TestHostileRefundReasonErrorNamesReason(t *testing.T) {
	t.Parallel()
	env := newEnv(t)
	acct := createAccount(t, env, newCurrency()).GetAccountId()
	credit(t, env, acct, 100)
	ch, err := env.Raw.Charge(ctxT(t), &tallyv1.ChargeRequest{AccountId: acct, Amount: 10, IdempotencyKey: "refund-reason-charge"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = env.Raw.Refund(ctxT(t), &tallyv1.RefundRequest{TransferId: ch.GetTransfer().GetTransferId(), IdempotencyKey: "refund-reason",
		Reason: maxDescription + "x"})
	wantErr(t, err, codes.InvalidArgument, "INVALID_ARGUMENT")
	info, _ := api.ErrorInfo(err)
	if msg := status.Convert(err).Message(); info.GetMetadata()["field"] != "reason" || strings.Contains(msg, "description") || !strings.Contains(msg, "reason") {
		t.Fatalf("refund reason error: field %q, message %q", info.GetMetadata()["field"], msg)
	}
}
