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
)

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
}

// moveCall is one money-moving request, resent unchanged on every attempt.
type moveCall func(ctx context.Context, c *client.Client) (*tallyv1.TransferResult, error)

// answer is one attempt's (or round's) result, classified.
type answer struct {
	definite bool
	outcome  Outcome
	code     string
	reason   string
	res      *tallyv1.TransferResult
	err      error
}

func classify(res *tallyv1.TransferResult, err error) answer {
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

// execOp runs one op to a definite answer: each round is a call through the
// client's retry contract on one tallyd; retryable endings (and INTERNAL or
// UNKNOWN, which are recorded as violations) move on to the next tallyd
// after a backoff, until opDeadline. A hedged op sends its first round twice
// at once (to the same tallyd or to two), the way an impatient client or a
// proxy that retries might: exactly one may execute, and both answers must
// agree.
func (r *runner) execOp(ctx context.Context, rng *rand.Rand, o *Op, hedge bool, call moveCall) {
	rec := &recorder{what: fmt.Sprintf("op %s %s", o.Kind, o.Key), hist: r.hist, tallyds: map[int]bool{}}
	ctx, cancel := context.WithTimeout(ctx, opDeadline)
	defer cancel()
	ctx = withRecorder(ctx, rec)
	o.Start = time.Now()
	first := rng.IntN(len(r.tds))
	var final *answer
	for round := 0; final == nil; round++ {
		t := r.tds[(first+round)%len(r.tds)]
		var answers []answer
		if round == 0 && hedge {
			o.Hedged = true
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
			if final == nil {
				final = a
				continue
			}
			h := HedgeAnswer{Code: a.code, Reason: a.reason}
			if a.res != nil {
				h.TransferID, h.Replayed = a.res.GetTransfer().GetTransferId(), a.res.GetReplayed()
			}
			o.HedgeAnswers = append(o.HedgeAnswers, h)
		}
		if final != nil {
			break
		}
		last := answers[len(answers)-1]
		if ctx.Err() != nil {
			o.Outcome, o.FinalCode, o.FinalReason = OutcomeUnknown, last.code, last.reason
			break
		}
		wait := time.Duration(50+rng.IntN(100)) * time.Millisecond * time.Duration(min(round+1, 8))
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	if final != nil {
		o.Outcome, o.FinalCode, o.FinalReason = final.outcome, final.code, final.reason
		if final.outcome == OutcomeAcked {
			o.TransferID = final.res.GetTransfer().GetTransferId()
			o.Replayed = final.res.GetReplayed()
			o.BalanceVersion = final.res.GetBalance().GetVersion()
			o.BalanceAfter = final.res.GetBalance().GetBalance()
		}
	}
	o.End = time.Now()
	o.Attempts, o.Tallyds = rec.attempts()
	o.EarlierAnswers = max(o.Attempts-1, 0)
	o.FirstAnswerReplayed = o.Outcome == OutcomeAcked && o.Replayed && o.Attempts == 1
	r.hist.AddOp(o)
	r.opsDone.Add(1)
	if o.Outcome == OutcomeAcked {
		r.opsAcked.Add(1)
	}
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
func (w *worker) nextOp() (*Op, moveCall) {
	p := w.r.pools
	cur := p.currencies[w.rng.IntN(len(p.currencies))]
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
		return o, func(ctx context.Context, c *client.Client) (*tallyv1.TransferResult, error) {
			return c.Charge(ctx, req)
		}
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
		return o, func(ctx context.Context, c *client.Client) (*tallyv1.TransferResult, error) {
			return c.Credit(ctx, req)
		}
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
		return o, func(ctx context.Context, c *client.Client) (*tallyv1.TransferResult, error) {
			return c.Transfer(ctx, req)
		}
	}
}

func (w *worker) doOp(ctx context.Context) {
	o, call := w.nextOp()
	w.r.execOp(ctx, w.rng, o, w.rng.Float64() < hedgeFraction, call)
	if o.Outcome == OutcomeAcked && o.BalanceVersion > w.lastAcked[o.Account] {
		w.lastAcked[o.Account] = o.BalanceVersion
		w.touched = append(w.touched, o.Account)
		if len(w.touched) > 32 {
			w.touched = w.touched[len(w.touched)-32:]
		}
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
