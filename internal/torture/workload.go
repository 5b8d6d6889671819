package torture

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Retry bounds of the workload. Each round is one call through the client
// package (which retries UNAVAILABLE and DEADLINE_EXCEEDED itself); between
// rounds the op moves on to the next tallyd.
const (
	opDeadline   = 3 * time.Minute
	readDeadline = 30 * time.Second
	// hedgeFraction of ops send their first attempt twice concurrently.
	hedgeFraction = 0.05
	// batchFraction of ops are a SubmitBatch of a few operations.
	batchFraction = 0.12
	// shortHoldFraction of holds expire within shortHoldSecondsMax seconds
	// (the others in an hour).
	shortHoldFraction   = 0.7
	shortHoldSecondsMax = 5
	// sharedRefsMax bounds the charges and holds remembered for refunds,
	// captures and releases.
	sharedRefsMax = 256
)

// chargeRef is an acknowledged CHARGE, for refunds.
type chargeRef struct {
	id            string
	debit, credit string
	amount        int64
}

// holdRef is an acknowledged hold, for captures and releases.
type holdRef struct {
	id      string
	account string
	revenue string // as sent ("" for the default)
	amount  int64
}

// shared is what the clients learn from each other: charges to refund and
// holds to capture or release, so that several clients act on one at once.
type shared struct {
	mu         sync.Mutex
	charges    []chargeRef
	holds      []holdRef
	lastExpiry time.Time // latest expiry of a short hold any client sent
}

func (s *shared) addCharge(c chargeRef) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.charges = append(s.charges, c)
	if len(s.charges) > sharedRefsMax {
		s.charges = s.charges[len(s.charges)-sharedRefsMax:]
	}
}

func (s *shared) pickCharge(rng *rand.Rand) (chargeRef, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.charges) == 0 {
		return chargeRef{}, false
	}
	return s.charges[rng.IntN(len(s.charges))], true
}

func (s *shared) addHold(h holdRef) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.holds = append(s.holds, h)
	if len(s.holds) > sharedRefsMax {
		s.holds = s.holds[len(s.holds)-sharedRefsMax:]
	}
}

// pickHold returns a known hold, favouring recent ones (more likely open).
func (s *shared) pickHold(rng *rand.Rand) (holdRef, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.holds)
	if n == 0 {
		return holdRef{}, false
	}
	return s.holds[n-1-rng.IntN(min(n, 16))], true
}

// dropHold forgets a hold that got its final answer (other clients may
// still be trying theirs: a second final action must be refused).
func (s *shared) dropHold(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, h := range s.holds {
		if h.id == id {
			s.holds = append(s.holds[:i], s.holds[i+1:]...)
			return
		}
	}
}

func (s *shared) noteExpiry(t time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.After(s.lastExpiry) {
		s.lastExpiry = t
	}
}

func (s *shared) latestExpiry() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastExpiry
}

// clientPolicy is the retry contract's policy for the torture clients: a
// short per-attempt timeout, so a blackholed or killed tallyd costs little.
func clientPolicy() client.Policy {
	return client.Policy{
		CallTimeout: 3 * time.Second, RetryAttemptsMax: 4,
		BackoffBase: 50 * time.Millisecond, BackoffMax: time.Second, ExhaustedBackoffBase: 300 * time.Millisecond,
	}
}

// recorder collects what the interceptor sees of one op's or read's attempts.
type recorder struct {
	what    string
	hist    *History
	mu      sync.Mutex
	n       int
	tallyds map[int]bool
	last    error
}

type recorderKey struct{}

func withRecorder(ctx context.Context, r *recorder) context.Context {
	return context.WithValue(ctx, recorderKey{}, r)
}

func (r *recorder) attempts() (n, tallyds int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n, len(r.tallyds)
}

// interceptor counts every attempt's answer, attributes it to the op or
// read in the context, and records INTERNAL/UNKNOWN answers as violations.
func interceptor(idx int, hist *History) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		code := status.Code(err)
		hist.CountAnswer(codeName(code))
		r, _ := ctx.Value(recorderKey{}).(*recorder)
		if r != nil {
			r.mu.Lock()
			r.n++
			r.tallyds[idx] = true
			r.last = err
			r.mu.Unlock()
		}
		if code == codes.Internal || code == codes.Unknown {
			what := method
			if r != nil {
				what = r.what
			}
			hist.AddBadAnswer(Answer{What: what, Tallyd: idx, Code: codeName(code), Message: status.Convert(err).Message(), At: time.Now()})
		}
		return err
	}
}

// newClient connects a retry-contract client to one tallyd. gRPC's
// reconnect backoff is capped at a second so a restarted tallyd is used
// again quickly.
func newClient(idx int, addr, apiKey string, hist *History) (*client.Client, error) {
	bc := backoff.DefaultConfig
	bc.BaseDelay = 50 * time.Millisecond
	bc.MaxDelay = time.Second
	return client.New(client.Config{
		Addr:   addr,
		APIKey: apiKey,
		Policy: clientPolicy(),
		DialOptions: []grpc.DialOption{
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithChainUnaryInterceptor(interceptor(idx, hist)),
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc, MinConnectTimeout: 2 * time.Second}),
		},
	})
}

// codeNames are the canonical gRPC code names (as in google.rpc.Code and
// the idempotency_keys.error_code column).
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN", codes.InvalidArgument: "INVALID_ARGUMENT",
	codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

// codeName returns the canonical name of a gRPC code.
func codeName(c codes.Code) string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return c.String()
}

// reasonOf returns the ErrorInfo reason of a status error.
func reasonOf(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return ""
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}

// account pools of the workload, per currency.
type pools struct {
	currencies []string
	customers  map[string][]AccountSpec // all customers
	hot        map[string][]AccountSpec
	small      map[string][]AccountSpec // small balances and limits: INSUFFICIENT_FUNDS is common
	revenue    map[string][]AccountSpec // revenue accounts the workload created
	funding    map[string][]AccountSpec
	all        []AccountSpec
	byID       map[string]AccountSpec
	// closable are empty customers only the lifecycle client uses (it
	// closes them); not in all.
	closable []AccountSpec
}

// opResult is what a successful answer acknowledged, whatever the RPC.
type opResult struct {
	transferID string
	holdID     string
	replayed   bool
	version    int64
	balance    int64
	// The transfer's accounts and amount, when the op made one.
	debit, credit string
	amount        int64
	// batch is a SubmitBatch's whole response.
	batch *tallyv1.SubmitBatchResponse
}

func fromTransfer(res *tallyv1.TransferResult, err error) (*opResult, error) {
	if err != nil {
		return nil, err
	}
	t := res.GetTransfer()
	return &opResult{transferID: t.GetTransferId(), replayed: res.GetReplayed(), version: res.GetBalance().GetVersion(),
		balance: res.GetBalance().GetBalance(), debit: t.GetDebitAccountId(), credit: t.GetCreditAccountId(), amount: t.GetAmount()}, nil
}

func fromHold(res *tallyv1.HoldResult, err error) (*opResult, error) {
	if err != nil {
		return nil, err
	}
	t := res.GetTransfer()
	return &opResult{transferID: t.GetTransferId(), holdID: res.GetHold().GetHoldId(), replayed: res.GetReplayed(),
		version: res.GetBalance().GetVersion(), balance: res.GetBalance().GetBalance(),
		debit: t.GetDebitAccountId(), credit: t.GetCreditAccountId(), amount: t.GetAmount()}, nil
}

// moveCall is one request, resent unchanged on every attempt.
type moveCall func(ctx context.Context, c *client.Client) (*opResult, error)

// singleCall sends one operation on its own, by its own RPC.
func singleCall(bo *tallyv1.BatchOperation) moveCall {
	switch x := bo.GetOp().(type) {
	case *tallyv1.BatchOperation_Charge:
		return func(ctx context.Context, c *client.Client) (*opResult, error) {
			return fromTransfer(c.Charge(ctx, x.Charge))
		}
	case *tallyv1.BatchOperation_Credit:
		return func(ctx context.Context, c *client.Client) (*opResult, error) {
			return fromTransfer(c.Credit(ctx, x.Credit))
		}
	case *tallyv1.BatchOperation_Transfer:
		return func(ctx context.Context, c *client.Client) (*opResult, error) {
			return fromTransfer(c.Transfer(ctx, x.Transfer))
		}
	case *tallyv1.BatchOperation_Refund:
		return func(ctx context.Context, c *client.Client) (*opResult, error) {
			return fromTransfer(c.Refund(ctx, x.Refund))
		}
	case *tallyv1.BatchOperation_Hold:
		return func(ctx context.Context, c *client.Client) (*opResult, error) { return fromHold(c.Hold(ctx, x.Hold)) }
	case *tallyv1.BatchOperation_CaptureHold:
		return func(ctx context.Context, c *client.Client) (*opResult, error) {
			return fromHold(c.CaptureHold(ctx, x.CaptureHold))
		}
	case *tallyv1.BatchOperation_ReleaseHold:
		return func(ctx context.Context, c *client.Client) (*opResult, error) {
			return fromHold(c.ReleaseHold(ctx, x.ReleaseHold))
		}
	}
	panic(fmt.Sprintf("torture: unknown batch operation %T", bo.GetOp()))
}

// answer is one attempt's (or round's) result, classified.
type answer struct {
	definite bool
	outcome  Outcome
	code     string
	reason   string
	res      *opResult
	err      error
}

func classify(res *opResult, err error) answer {
	code := status.Code(err)
	a := answer{code: codeName(code), reason: reasonOf(err), res: res, err: err, definite: true}
	switch code {
	case codes.OK:
		a.outcome = OutcomeAcked
	case codes.FailedPrecondition, codes.OutOfRange:
		a.outcome = OutcomeRejected
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Internal, codes.Unknown:
		a.definite = false
	default:
		a.outcome = OutcomeUnexpected
	}
	return a
}

// execution is how one request (with one key) ended, over all its rounds.
type execution struct {
	final  *answer // nil: no definite answer before the deadline
	last   answer
	hedged bool
	hedges []HedgeAnswer
	// hedgeRes are the hedges' results (nil for an error), in order.
	hedgeRes []*opResult
	attempts int
	tallyds  int
	start    time.Time
	end      time.Time
}

// execute runs one request to a definite answer: each round is a call
// through the client's retry contract on one tallyd; retryable endings (and
// INTERNAL or UNKNOWN, which are recorded as violations) move on to the next
// tallyd after a backoff, until opDeadline. A hedged request sends its first
// round twice at once (to the same tallyd or to two), the way an impatient
// client or a proxy that retries might: exactly one may execute, and both
// answers must agree.
func (r *runner) execute(ctx context.Context, rng *rand.Rand, what string, hedge bool, call moveCall) execution {
	rec := &recorder{what: what, hist: r.hist, tallyds: map[int]bool{}}
	ctx, cancel := context.WithTimeout(ctx, opDeadline)
	defer cancel()
	ctx = withRecorder(ctx, rec)
	ex := execution{start: time.Now()}
	first := rng.IntN(len(r.tds))
	for round := 0; ex.final == nil; round++ {
		t := r.tds[(first+round)%len(r.tds)]
		var answers []answer
		if round == 0 && hedge {
			ex.hedged = true
			t2 := t
			if rng.IntN(2) == 0 {
				t2 = r.tds[(first+1)%len(r.tds)]
			}
			ch := make(chan answer, 2)
			for _, tt := range []*tallyd{t, t2} {
				go func() {
					res, err := call(ctx, tt.cl)
					ch <- classify(res, err)
				}()
			}
			answers = []answer{<-ch, <-ch}
		} else {
			res, err := call(ctx, t.cl)
			answers = []answer{classify(res, err)}
		}
		for i := range answers {
			a := &answers[i]
			if !a.definite {
				continue
			}
			if ex.final == nil {
				ex.final = a
				continue
			}
			h := HedgeAnswer{Code: a.code, Reason: a.reason}
			if a.res != nil {
				h.TransferID, h.HoldID, h.Replayed = a.res.transferID, a.res.holdID, a.res.replayed
			}
			ex.hedges = append(ex.hedges, h)
			ex.hedgeRes = append(ex.hedgeRes, a.res)
		}
		ex.last = answers[len(answers)-1]
		if ex.final != nil || ctx.Err() != nil {
			break
		}
		wait := time.Duration(50+rng.IntN(100)) * time.Millisecond * time.Duration(min(round+1, 8))
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	ex.end = time.Now()
	ex.attempts, ex.tallyds = rec.attempts()
	return ex
}

// execOp runs one op to a definite answer (see execute), records it, and
// returns what was acknowledged (nil unless acked).
func (r *runner) execOp(ctx context.Context, rng *rand.Rand, o *Op, hedge bool, call moveCall) *opResult {
	ex := r.execute(ctx, rng, fmt.Sprintf("op %s %s", o.Kind, o.Key), hedge, call)
	o.Start, o.End, o.Attempts, o.Tallyds = ex.start, ex.end, ex.attempts, ex.tallyds
	o.Hedged, o.HedgeAnswers = ex.hedged, ex.hedges
	var res *opResult
	if final := ex.final; final != nil {
		o.Outcome, o.FinalCode, o.FinalReason = final.outcome, final.code, final.reason
		if final.outcome == OutcomeAcked {
			res = final.res
			o.TransferID, o.Replayed = res.transferID, res.replayed
			if o.Kind == KindHold {
				o.HoldID = res.holdID
			}
			o.BalanceVersion, o.BalanceAfter = res.version, res.balance
		}
	} else {
		o.Outcome, o.FinalCode, o.FinalReason = OutcomeUnknown, ex.last.code, ex.last.reason
	}
	o.EarlierAnswers = max(o.Attempts-1, 0)
	o.FirstAnswerReplayed = o.Outcome == OutcomeAcked && o.Replayed && o.Attempts == 1
	r.hist.AddOp(o)
	r.opsDone.Add(1)
	if o.Outcome == OutcomeAcked {
		r.opsAcked.Add(1)
	}
	return res
}

// execBatch runs one SubmitBatch to a definite answer, resending the same
// batch_key (and items) on every attempt, and records the batch and each of
// its items with the outcome the answer gave it. It returns the acked items'
// results (nil entries for the others).
//
// A hedged batch sends its first attempt twice at once: one may execute,
// the other must wait for it and replay its results. Each item then gets
// the other answer's result for it as a hedge answer, so the checker holds
// both to the same rules as a hedged op's.
func (r *runner) execBatch(ctx context.Context, rng *rand.Rand, b *Batch, items []*Op, req *tallyv1.SubmitBatchRequest, hedge bool) []*opResult {
	call := func(ctx context.Context, c *client.Client) (*opResult, error) {
		resp, err := c.SubmitBatch(ctx, req)
		if err != nil {
			return nil, err
		}
		return &opResult{batch: resp, replayed: resp.GetReplayed()}, nil
	}
	ex := r.execute(ctx, rng, fmt.Sprintf("batch %s %s", b.Mode, b.Key), hedge, call)
	b.Start, b.End, b.Attempts, b.Hedged = ex.start, ex.end, ex.attempts, ex.hedged
	b.FailedIndex = -1
	out := make([]*opResult, len(items))
	var resp *tallyv1.SubmitBatchResponse
	switch {
	case ex.final == nil:
		b.Outcome, b.FinalCode, b.FinalReason = OutcomeUnknown, ex.last.code, ex.last.reason
	case ex.final.outcome == OutcomeAcked && len(ex.final.res.batch.GetResults()) == len(items):
		resp = ex.final.res.batch
		b.Outcome, b.FinalCode = OutcomeAcked, "OK"
		b.Applied, b.FailedIndex, b.Replayed = resp.GetApplied(), int(resp.GetFailedIndex()), resp.GetReplayed()
	case ex.final.outcome == OutcomeAcked:
		b.Outcome, b.FinalCode, b.FinalReason = OutcomeUnexpected, "OK", fmt.Sprintf("%d results for %d items",
			len(ex.final.res.batch.GetResults()), len(items))
	default:
		// A batch as a whole is never a business rejection.
		b.Outcome, b.FinalCode, b.FinalReason = OutcomeUnexpected, ex.final.code, ex.final.reason
	}
	for i, o := range items {
		o.Start, o.End, o.Attempts, o.Tallyds = ex.start, ex.end, ex.attempts, ex.tallyds
		o.EarlierAnswers = max(o.Attempts-1, 0)
		o.BatchKey, o.BatchIndex = b.Key, i
		o.Hedged = ex.hedged
		for j, h := range ex.hedges {
			o.HedgeAnswers = append(o.HedgeAnswers, batchItemAnswer(h, ex.hedgeRes[j], i, len(items)))
		}
		if resp == nil {
			o.Outcome, o.FinalCode, o.FinalReason = b.Outcome, b.FinalCode, b.FinalReason
			if b.Outcome == OutcomeUnexpected {
				o.FinalCode = "BATCH_" + o.FinalCode
			}
		} else {
			res := resp.GetResults()[i]
			switch x := res.GetOutcome().(type) {
			case *tallyv1.BatchOperationResult_Error:
				code := codes.Code(x.Error.GetCode())
				o.FinalCode, o.FinalReason = codeName(code), x.Error.GetReason()
				switch {
				case !b.Applied:
					o.Outcome = OutcomeNotApplied
				case code == codes.FailedPrecondition || code == codes.OutOfRange:
					o.Outcome = OutcomeRejected
				default:
					o.Outcome = OutcomeUnexpected
				}
			case *tallyv1.BatchOperationResult_Transfer:
				out[i], _ = fromTransfer(x.Transfer, nil)
			case *tallyv1.BatchOperationResult_Hold:
				out[i], _ = fromHold(x.Hold, nil)
			default:
				o.Outcome, o.FinalCode = OutcomeUnexpected, "EMPTY_RESULT"
			}
			if out[i] != nil {
				if !b.Applied {
					o.Outcome, o.FinalCode, o.FinalReason = OutcomeUnexpected, "OK", "a result in a batch that was not applied"
					out[i] = nil
				} else {
					o.Outcome, o.FinalCode = OutcomeAcked, "OK"
					o.TransferID, o.Replayed = out[i].transferID, out[i].replayed || b.Replayed
					if o.Kind == KindHold {
						o.HoldID = out[i].holdID
					}
					o.BalanceVersion, o.BalanceAfter = out[i].version, out[i].balance
				}
			}
		}
		o.FirstAnswerReplayed = o.Outcome == OutcomeAcked && o.Replayed && o.Attempts == 1
		r.hist.AddOp(o)
		r.opsDone.Add(1)
		if o.Outcome == OutcomeAcked {
			r.opsAcked.Add(1)
		}
	}
	r.hist.AddBatch(b)
	r.batchesDone.Add(1)
	return out
}

// batchItemAnswer is what another answer to a batch said about item i.
func batchItemAnswer(h HedgeAnswer, res *opResult, i, n int) HedgeAnswer {
	if h.Code != "OK" || res == nil || res.batch == nil || len(res.batch.GetResults()) != n {
		return HedgeAnswer{Code: "BATCH_" + h.Code, Reason: h.Reason}
	}
	replayed := res.batch.GetReplayed()
	switch x := res.batch.GetResults()[i].GetOutcome().(type) {
	case *tallyv1.BatchOperationResult_Error:
		return HedgeAnswer{Code: codeName(codes.Code(x.Error.GetCode())), Reason: x.Error.GetReason()}
	case *tallyv1.BatchOperationResult_Transfer:
		t, _ := fromTransfer(x.Transfer, nil)
		return HedgeAnswer{Code: "OK", TransferID: t.transferID, Replayed: t.replayed || replayed}
	case *tallyv1.BatchOperationResult_Hold:
		t, _ := fromHold(x.Hold, nil)
		return HedgeAnswer{Code: "OK", TransferID: t.transferID, HoldID: t.holdID, Replayed: t.replayed || replayed}
	}
	return HedgeAnswer{Code: "EMPTY_RESULT"}
}

// worker is one sequential client.
type worker struct {
	r         *runner
	id        int
	rng       *rand.Rand
	lastAcked map[string]int64
	touched   []string
	seq       int
}

func (w *worker) pick(s []AccountSpec) AccountSpec { return s[w.rng.IntN(len(s))] }

func (w *worker) meta() (string, map[string]string) {
	w.seq++
	return fmt.Sprintf("torture client %d op %d", w.id, w.seq),
		map[string]string{"client": strconv.Itoa(w.id), "seq": strconv.Itoa(w.seq), "tool": "tally-torture"}
}

func amountFor(rng *rand.Rand, a AccountSpec) int64 {
	switch a.Role {
	case "hot":
		return 1 + rng.Int64N(500)
	case "small", "limit":
		return 1 + rng.Int64N(80)
	}
	return 1 + rng.Int64N(300)
}

// customer picks a customer account: half the time a hot one, a quarter of
// the time one with a small balance.
func (w *worker) customer(cur string) AccountSpec {
	p := w.r.pools
	switch x := w.rng.Float64(); {
	case x < 0.5:
		return w.pick(p.hot[cur])
	case x < 0.75:
		return w.pick(p.small[cur])
	}
	return w.pick(p.customers[cur])
}

func (w *worker) otherCurrency(cur string) string {
	for _, c := range w.r.pools.currencies {
		if c != cur {
			return c
		}
	}
	return cur
}

// nextOp builds a random Charge, Credit or Transfer with a fresh key.
func (w *worker) nextOp(cur string) (*Op, *tallyv1.BatchOperation) {
	p := w.r.pools
	desc, md := w.meta()
	o := &Op{Client: w.id, Key: client.NewIdempotencyKey()}
	switch x := w.rng.Float64(); {
	case x < 0.40: // Charge
		a := w.customer(cur)
		o.Kind, o.Account, o.Amount = KindCharge, a.ID, amountFor(w.rng, a)
		switch y := w.rng.Float64(); {
		case y < 0.20:
			o.Counterparty = w.pick(p.revenue[cur]).ID
		case y < 0.23: // a revenue account of another currency: CURRENCY_MISMATCH
			o.Counterparty = w.pick(p.revenue[w.otherCurrency(cur)]).ID
		case y < 0.25: // not a revenue account: ACCOUNT_TYPE_MISMATCH
			o.Counterparty = w.pick(p.customers[cur]).ID
			if o.Counterparty == o.Account {
				o.Counterparty = ""
			}
		}
		req := &tallyv1.ChargeRequest{AccountId: o.Account, Amount: o.Amount, IdempotencyKey: o.Key,
			Description: desc, Metadata: md, RevenueAccountId: o.Counterparty}
		return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Charge{Charge: req}}
	case x < 0.65: // Credit
		a, amount := w.pick(p.customers[cur]), 1+w.rng.Int64N(60)
		if w.rng.Float64() < 0.3 { // top-ups of the small accounts, smaller than what they spend
			a, amount = w.pick(p.small[cur]), 1+w.rng.Int64N(25)
		}
		o.Kind, o.Account, o.Amount = KindCredit, a.ID, amount
		if w.rng.Float64() < 0.2 {
			o.Counterparty = w.pick(p.funding[cur]).ID
		}
		req := &tallyv1.CreditRequest{AccountId: o.Account, Amount: o.Amount, IdempotencyKey: o.Key,
			Description: desc, Metadata: md, FundingAccountId: o.Counterparty}
		return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Credit{Credit: req}}
	default: // Transfer
		from := w.customer(cur)
		toCur := cur
		if w.rng.Float64() < 0.03 { // CURRENCY_MISMATCH
			toCur = w.otherCurrency(cur)
		}
		to := w.pick(p.customers[toCur])
		for to.ID == from.ID {
			to = w.pick(p.customers[toCur])
		}
		o.Kind, o.Account, o.Counterparty, o.Amount = KindTransfer, from.ID, to.ID, amountFor(w.rng, from)
		if to.Role == "small" || to.Role == "limit" {
			// Keep what small accounts receive below what they spend, so
			// they hover near their floor and INSUFFICIENT_FUNDS is common.
			o.Amount = 1 + w.rng.Int64N(20)
		}
		req := &tallyv1.TransferRequest{DebitAccountId: o.Account, CreditAccountId: o.Counterparty, Amount: o.Amount,
			IdempotencyKey: o.Key, Description: desc, Metadata: md}
		return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Transfer{Transfer: req}}
	}
}

// holdOp builds a Hold: most expire within seconds (so they expire during
// the run, some under a pending capture), the rest in an hour.
func (w *worker) holdOp(cur string) (*Op, *tallyv1.BatchOperation) {
	p := w.r.pools
	a := w.customer(cur)
	desc, md := w.meta()
	o := &Op{Client: w.id, Key: client.NewIdempotencyKey(), Kind: KindHold, Account: a.ID, Amount: amountFor(w.rng, a)}
	if w.rng.Float64() < 0.2 {
		o.Counterparty = w.pick(p.revenue[cur]).ID
	}
	o.ExpiresIn = 3600
	if w.rng.Float64() < shortHoldFraction {
		o.ExpiresIn = 1 + w.rng.Int64N(shortHoldSecondsMax)
	}
	req := &tallyv1.HoldRequest{AccountId: o.Account, Amount: o.Amount, IdempotencyKey: o.Key, ExpiresInSeconds: o.ExpiresIn,
		RevenueAccountId: o.Counterparty, Description: desc, Metadata: md}
	return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Hold{Hold: req}}
}

// finalizeOp builds a CaptureHold (full, partial, or more than held) or a
// ReleaseHold of a hold some client created; nil when none is known.
func (w *worker) finalizeOp() (*Op, *tallyv1.BatchOperation) {
	h, ok := w.r.shared.pickHold(w.rng)
	if !ok {
		return nil, nil
	}
	o := &Op{Client: w.id, Key: client.NewIdempotencyKey(), Account: h.account, Counterparty: h.revenue, HoldID: h.id}
	if w.rng.Float64() < 0.35 {
		o.Kind, o.Amount = KindRelease, h.amount
		req := &tallyv1.ReleaseHoldRequest{HoldId: h.id, IdempotencyKey: o.Key}
		return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_ReleaseHold{ReleaseHold: req}}
	}
	o.Kind = KindCapture
	var amount int64
	switch x := w.rng.Float64(); {
	case x < 0.45: // all of it
		o.Amount, o.CaptureAll = h.amount, true
	case x < 0.92: // part of it
		o.Amount = 1 + w.rng.Int64N(h.amount)
		amount = o.Amount
	default: // more than held: HOLD_AMOUNT_EXCEEDED
		o.Amount = h.amount + 1 + w.rng.Int64N(10)
		amount = o.Amount
	}
	req := &tallyv1.CaptureHoldRequest{HoldId: h.id, Amount: amount, IdempotencyKey: o.Key}
	return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_CaptureHold{CaptureHold: req}}
}

// refundOp builds a Refund of part of a charge some client made (now and
// then more than remains: REFUND_EXCEEDS_CHARGE); nil when none is known.
func (w *worker) refundOp() (*Op, *tallyv1.BatchOperation) {
	ch, ok := w.r.shared.pickCharge(w.rng)
	if !ok {
		return nil, nil
	}
	desc, md := w.meta()
	o := &Op{Client: w.id, Key: client.NewIdempotencyKey(), Kind: KindRefund, Account: ch.debit, Counterparty: ch.credit,
		ChargeID: ch.id, Amount: 1 + w.rng.Int64N(max(ch.amount/2, 1))}
	if w.rng.Float64() < 0.08 {
		o.Amount = ch.amount + 1
	}
	req := &tallyv1.RefundRequest{TransferId: ch.id, Amount: o.Amount, IdempotencyKey: o.Key, Reason: desc, Metadata: md}
	return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Refund{Refund: req}}
}

// failingOp builds an item designed to be rejected: a charge far beyond any
// balance (INSUFFICIENT_FUNDS).
func (w *worker) failingOp(cur string) (*Op, *tallyv1.BatchOperation) {
	a := w.customer(cur)
	desc, md := w.meta()
	o := &Op{Client: w.id, Key: client.NewIdempotencyKey(), Kind: KindCharge, Account: a.ID, Amount: 1_000_000_000_000}
	req := &tallyv1.ChargeRequest{AccountId: o.Account, Amount: o.Amount, IdempotencyKey: o.Key, Description: desc, Metadata: md}
	return o, &tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Charge{Charge: req}}
}

// anyOp builds one operation of any kind, for itself or for a batch.
func (w *worker) anyOp(cur string) (*Op, *tallyv1.BatchOperation) {
	switch x := w.rng.Float64(); {
	case x < 0.62:
	case x < 0.76:
		return w.holdOp(cur)
	case x < 0.89:
		if o, bo := w.finalizeOp(); o != nil {
			return o, bo
		}
	default:
		if o, bo := w.refundOp(); o != nil {
			return o, bo
		}
	}
	return w.nextOp(cur)
}

// learn notes what an acknowledged op tells the worker and the other
// clients: versions it saw, charges that can be refunded, holds that can be
// captured or released.
func (w *worker) learn(o *Op, res *opResult) {
	switch {
	case o.Kind == KindHold && o.ExpiresIn <= shortHoldSecondsMax:
		// Created at the latest when the answer came, so expired by then.
		w.r.shared.noteExpiry(o.End.Add(time.Duration(o.ExpiresIn) * time.Second))
	case (o.Kind == KindCapture || o.Kind == KindRelease) && o.Outcome != OutcomeUnknown && o.Outcome != OutcomeNotApplied:
		w.r.shared.dropHold(o.HoldID)
	}
	if o.Outcome != OutcomeAcked || res == nil {
		return
	}
	switch o.Kind {
	case KindHold:
		w.r.shared.addHold(holdRef{id: res.holdID, account: o.Account, revenue: o.Counterparty, amount: o.Amount})
	case KindCharge, KindCapture:
		if res.transferID != "" && res.amount > 0 {
			w.r.shared.addCharge(chargeRef{id: res.transferID, debit: res.debit, credit: res.credit, amount: res.amount})
		}
	}
	if res.version > w.lastAcked[o.Account] {
		w.lastAcked[o.Account] = res.version
		w.touched = append(w.touched, o.Account)
		if len(w.touched) > 32 {
			w.touched = w.touched[len(w.touched)-32:]
		}
	}
}

func (w *worker) doOp(ctx context.Context) {
	cur := w.r.pools.currencies[w.rng.IntN(len(w.r.pools.currencies))]
	if w.r.cfg.OldTallydBin != "" {
		// A rolling upgrade: clients use only the calls the previous
		// release serves (charge, credit, transfer), as real clients adopt
		// new calls only once the rollout is over.
		o, bo := w.nextOp(cur)
		res := w.r.execOp(ctx, w.rng, o, w.rng.Float64() < hedgeFraction, singleCall(bo))
		w.learn(o, res)
		return
	}
	if w.rng.Float64() < batchFraction {
		w.doBatch(ctx, cur)
		return
	}
	o, bo := w.anyOp(cur)
	res := w.r.execOp(ctx, w.rng, o, w.rng.Float64() < hedgeFraction, singleCall(bo))
	w.learn(o, res)
}

// doBatch sends a SubmitBatch of a few operations of every kind, ATOMIC or
// INDEPENDENT, sometimes with an item built to fail.
func (w *worker) doBatch(ctx context.Context, cur string) {
	b := &Batch{Client: w.id, Key: client.NewIdempotencyKey(), Mode: BatchAtomic, DesignedToFail: -1}
	req := &tallyv1.SubmitBatchRequest{BatchKey: b.Key, Mode: tallyv1.BatchMode_BATCH_MODE_ATOMIC}
	if w.rng.IntN(2) == 0 {
		b.Mode, req.Mode = BatchIndependent, tallyv1.BatchMode_BATCH_MODE_INDEPENDENT
	}
	n := 2 + w.rng.IntN(4)
	if w.rng.Float64() < 0.3 {
		b.DesignedToFail = w.rng.IntN(n)
	}
	items := make([]*Op, 0, n)
	for i := 0; i < n; i++ {
		c := cur
		if w.rng.Float64() < 0.2 {
			c = w.r.pools.currencies[w.rng.IntN(len(w.r.pools.currencies))]
		}
		var o *Op
		var bo *tallyv1.BatchOperation
		if i == b.DesignedToFail {
			o, bo = w.failingOp(c)
		} else {
			o, bo = w.anyOp(c)
		}
		items = append(items, o)
		b.ItemKeys = append(b.ItemKeys, o.Key)
		req.Operations = append(req.Operations, bo)
	}
	results := w.r.execBatch(ctx, w.rng, b, items, req, w.rng.Float64() < hedgeFraction)
	for i, o := range items {
		w.learn(o, results[i])
	}
}

func sourceName(s tallyv1.BalanceSource) string {
	switch s {
	case tallyv1.BalanceSource_BALANCE_SOURCE_CACHE:
		return SourceCache
	case tallyv1.BalanceSource_BALANCE_SOURCE_STORE:
		return SourceStore
	}
	return s.String()
}

// doRead reads one balance (cached, strong or with min_version) and records
// what it saw.
func (w *worker) doRead(ctx context.Context) {
	var acct string
	if len(w.touched) > 0 && w.rng.Float64() < 0.6 {
		acct = w.touched[w.rng.IntN(len(w.touched))]
	} else {
		acct = w.pick(w.r.pools.all).ID
	}
	obs := Observation{Client: w.id, Account: acct, LastAcked: w.lastAcked[acct]}
	req := &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_CACHED}
	switch x := w.rng.Float64(); {
	case x < 0.30:
		obs.Consistency = ReadStrong
		req.Consistency = tallyv1.Consistency_CONSISTENCY_STRONG
	case x < 0.65 && obs.LastAcked > 0:
		obs.Consistency = ReadMinVersion
		obs.MinVersion = obs.LastAcked
		req.MinVersion = obs.LastAcked
	default:
		obs.Consistency = ReadCached
	}
	rec := &recorder{what: fmt.Sprintf("read %s %s", obs.Consistency, acct), hist: w.r.hist, tallyds: map[int]bool{}}
	ctx, cancel := context.WithTimeout(ctx, readDeadline)
	defer cancel()
	ctx = withRecorder(ctx, rec)
	obs.Start = time.Now()
	first := w.rng.IntN(len(w.r.tds))
	for round := 0; ; round++ {
		t := w.r.tds[(first+round)%len(w.r.tds)]
		b, err := t.cl.GetBalance(ctx, req)
		code := status.Code(err)
		if err == nil {
			obs.End = time.Now()
			obs.Version, obs.Balance, obs.Source = b.GetVersion(), b.GetBalance(), sourceName(b.GetSource())
			w.r.hist.AddObservation(obs)
			w.r.readsDone.Add(1)
			return
		}
		retry := code == codes.Unavailable || code == codes.DeadlineExceeded || code == codes.ResourceExhausted ||
			code == codes.Internal || code == codes.Unknown
		if !retry || ctx.Err() != nil {
			w.r.hist.AddReadFailure(ReadFailure{Client: w.id, Account: acct, Consistency: obs.Consistency, MinVersion: obs.MinVersion,
				Code: codeName(code), Reason: reasonOf(err), Message: status.Convert(err).Message()})
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(50+w.rng.IntN(100)) * time.Millisecond * time.Duration(min(round+1, 8))):
		}
	}
}

// run issues ops and reads until stop ends; each started op is finished
// (retried to a definite answer) under hard.
func (w *worker) run(stop, hard context.Context) {
	for stop.Err() == nil {
		if w.rng.Float64() < 0.55 {
			w.doOp(hard)
		} else {
			w.doRead(hard)
		}
	}
}
