// Package bench is the load generator behind `tally bench`: it drives a
// running tallyd's gRPC API through package api/client (the one home of the
// retry contract) with N concurrent clients, and reports throughput, latency
// percentiles, errors by code, and, when it can see the server, the batch
// sizes group commit achieved and the server's peak RSS.
//
// Speed is measured here, never asserted by a test.
package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Scenarios, in the order `tally bench -h` lists them.
var Scenarios = []string{
	"charge-uniform", "charge-hot", "transfer-uniform", "balance-cached", "balance-nocache", "mixed", "noop",
}

// Defaults of Config; each is a flag of `tally bench`.
const (
	ClientsDefault      = 32
	DurationDefault     = 20 * time.Second
	WarmupDefault       = 3 * time.Second
	AccountsDefault     = 10000
	ConnsDefault        = 1
	SetupClientsDefault = 64
	CurrencyDefault     = "USD"
	// FundingDefault is what each account is credited at setup: enough that
	// no run of amount-1 charges or transfers can exhaust it.
	FundingDefault = int64(1_000_000_000_000)
	// HotFundingDefault funds the charge-hot account.
	HotFundingDefault = int64(1_000_000_000_000_000)
)

// Config configures Run.
type Config struct {
	// Addr is tallyd's gRPC address, or several separated by commas
	// (several tallyd replicas): the connections go to them in turn.
	Addr     string
	APIKey   string
	Scenario string
	Clients  int
	// Conns is how many gRPC connections the clients share (round robin).
	Conns    int
	Duration time.Duration
	Warmup   time.Duration
	// Accounts is how many accounts the uniform scenarios spread over.
	Accounts int
	// SetupClients is the concurrency of account setup.
	SetupClients int
	Currency     string
	// Seed names the accounts: the same seed reuses the same account ids
	// (CreateAccount with a client-supplied id is idempotent), so a repeated
	// run against the same database skips most of the setup.
	Seed string
	// Consistency overrides the scenario's read consistency: "cached" or
	// "strong". Empty: cached.
	Consistency string
	// ServerPID, when set, lets the bench read the server's peak RSS
	// (VmHWM) and CPU time from /proc. ServerPIDs adds more servers (their
	// CPU is summed, the peak RSS is the largest).
	ServerPID  int
	ServerPIDs []int
	// ServerHTTP, when set (host:port of tallyd's --http-addr, or several
	// separated by commas), lets the bench read the servers' batch
	// statistics from /debug/stats (summed over the servers).
	ServerHTTP string
	// DatabaseURL, when set, is the bench database (the one tallyd writes):
	// the bench reads its commits (pg_stat_database), its tables' sequential
	// scans (pg_stat_user_tables) and, when PostgreSQL runs on this host, its
	// backends' and the whole server's CPU time from /proc.
	DatabaseURL string
	// Policy is the client retry policy (client.DefaultPolicy when zero).
	Policy client.Policy
	// Log receives progress lines (setup); nil discards them.
	Log func(format string, args ...any)
}

func (c *Config) fill() error {
	if c.Addr == "" {
		c.Addr = client.AddrDefault
	}
	if !slices.Contains(Scenarios, c.Scenario) {
		return fmt.Errorf("unknown scenario %q (one of %s)", c.Scenario, strings.Join(Scenarios, ", "))
	}
	if c.Clients <= 0 {
		c.Clients = ClientsDefault
	}
	if c.Conns <= 0 {
		c.Conns = ConnsDefault
	}
	// At least one connection per server, so every server gets load.
	c.Conns = max(c.Conns, len(c.addrs()))
	if c.Duration <= 0 {
		c.Duration = DurationDefault
	}
	if c.Warmup < 0 {
		c.Warmup = 0
	}
	if c.Accounts <= 0 {
		c.Accounts = AccountsDefault
	}
	if c.SetupClients <= 0 {
		c.SetupClients = SetupClientsDefault
	}
	if c.Currency == "" {
		c.Currency = CurrencyDefault
	}
	if c.Seed == "" {
		c.Seed = uuid.NewString()
	}
	switch c.Consistency {
	case "", "cached", "strong":
	default:
		return fmt.Errorf("consistency must be cached or strong, got %q", c.Consistency)
	}
	if c.Log == nil {
		c.Log = func(string, ...any) {}
	}
	return nil
}

// Latency summarizes call latencies, in milliseconds.
type Latency struct {
	P50 float64 `json:"p50_ms"`
	P95 float64 `json:"p95_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
	Avg float64 `json:"avg_ms"`
}

// ServerStats is what the bench could learn about the server.
type ServerStats struct {
	// PeakRSSBytes is VmHWM of the server process at the end of the run (the
	// peak since the process started), 0 when unknown.
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
	// CPUCores is the server's CPU time during the measured window divided
	// by the window: 1.0 is one core busy all the time.
	CPUCores float64 `json:"cpu_cores"`
	// Batch statistics during the measured window (from /debug/stats).
	Batches         int64   `json:"batches"`
	BatchItems      int64   `json:"batch_items"`
	BatchItemsAvg   float64 `json:"batch_items_avg"`
	BatchItemsPeak  int64   `json:"batch_items_peak_since_start"`
	BatchSplits     int64   `json:"batch_splits"`
	BatchStatsKnown bool    `json:"batch_stats_known"`
}

// Result is the outcome of one run.
type Result struct {
	Scenario   string  `json:"scenario"`
	Clients    int     `json:"clients"`
	Conns      int     `json:"conns"`
	Accounts   int     `json:"accounts"`
	DurationS  float64 `json:"duration_s"`
	SetupS     float64 `json:"setup_s"`
	Ops        int64   `json:"ops"`
	Throughput float64 `json:"throughput_ops_s"`
	Latency    Latency `json:"latency"`
	// Errors counts failed calls (after the client's retries) by gRPC code
	// and, when the server said, ErrorInfo reason.
	Errors map[string]int64 `json:"errors"`
	// Sources counts balance reads by where the server said they came from.
	Sources map[string]int64 `json:"balance_sources,omitempty"`
	// ClientCPUCores is this process's CPU time during the window divided by
	// the window.
	ClientCPUCores float64     `json:"client_cpu_cores"`
	Server         ServerStats `json:"server"`
	// Cost is what one operation cost in CPU, batches and commits.
	Cost Cost `json:"cost"`
	// LoadAvg1 is the 1-minute load average when the measured window began.
	LoadAvg1 float64 `json:"load_avg_1_at_start"`
}

// env is what the scenario workers share.
type env struct {
	cfg      Config
	clients  []*client.Client
	health   []healthpb.HealthClient
	accounts []uuid.UUID
	hot      uuid.UUID
	cons     tallyv1.Consistency
}

// Run sets up the scenario's accounts, warms up, measures and returns the
// result.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if err := cfg.fill(); err != nil {
		return Result{}, err
	}
	e := &env{cfg: cfg, cons: tallyv1.Consistency_CONSISTENCY_CACHED}
	if cfg.Consistency == "strong" {
		e.cons = tallyv1.Consistency_CONSISTENCY_STRONG
	}
	addrs := cfg.addrs()
	for i := 0; i < cfg.Conns; i++ {
		cl, err := client.New(client.Config{Addr: addrs[i%len(addrs)], APIKey: cfg.APIKey, Policy: cfg.Policy})
		if err != nil {
			return Result{}, err
		}
		defer cl.Close()
		e.clients = append(e.clients, cl)
		if cfg.Scenario == "noop" {
			hc, closeFn, err := healthConn(cfg, addrs[i%len(addrs)])
			if err != nil {
				return Result{}, err
			}
			defer closeFn()
			e.health = append(e.health, hc)
		}
	}

	var pg *pgWatch
	if cfg.DatabaseURL != "" {
		var err error
		if pg, err = newPGWatch(ctx, cfg.DatabaseURL, cfg.Log); err != nil {
			return Result{}, err
		}
		defer pg.close()
	}

	setupStart := time.Now()
	if err := e.setup(ctx); err != nil {
		return Result{}, fmt.Errorf("setup: %w", err)
	}
	if pg != nil {
		// The setup may have just created the accounts: a table that grew
		// from empty within seconds still has the statistics of an empty
		// one until autovacuum analyzes it (up to a minute later), and
		// plans made meanwhile scan it. Measure what a database in service
		// sees, as PostgreSQL's own advice after a bulk load says.
		if err := pg.analyze(ctx); err != nil {
			return Result{}, err
		}
	}
	res := Result{
		Scenario: cfg.Scenario, Clients: cfg.Clients, Conns: cfg.Conns, Accounts: len(e.accounts),
		SetupS: time.Since(setupStart).Seconds(), Errors: map[string]int64{},
	}

	op := e.op()
	var (
		measuring atomic.Bool
		stop      atomic.Bool
		wg        sync.WaitGroup
	)
	type worker struct {
		lat     []int64
		errs    map[string]int64
		sources map[string]int64
	}
	workers := make([]*worker, cfg.Clients)
	for i := range workers {
		w := &worker{errs: map[string]int64{}, sources: map[string]int64{}}
		workers[i] = w
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for !stop.Load() && ctx.Err() == nil {
				rec := measuring.Load()
				t0 := time.Now()
				src, err := op(ctx, i, rng)
				d := time.Since(t0)
				// Count only calls that started and ended inside the window.
				if !rec || !measuring.Load() {
					continue
				}
				if err != nil {
					w.errs[errKey(err)]++
					continue
				}
				w.lat = append(w.lat, int64(d))
				if src != "" {
					w.sources[src]++
				}
			}
		}(i)
	}

	sleep(ctx, cfg.Warmup)
	var win window
	res.LoadAvg1 = loadAvg1("/proc")
	win.server[0], win.pg[0] = e.serverSample(ctx), pg.sample(ctx)
	win.clientCPU[0] = selfCPU()
	t0 := time.Now()
	measuring.Store(true)
	cfg.Log("measuring for %s (load average %.2f)", cfg.Duration, res.LoadAvg1)
	sleep(ctx, cfg.Duration)
	measuring.Store(false)
	window := time.Since(t0)
	win.clientCPU[1] = selfCPU()
	win.server[1], win.pg[1] = e.serverSample(ctx), pg.sample(ctx)
	stop.Store(true)
	wg.Wait()
	if ctx.Err() != nil {
		return Result{}, ctx.Err()
	}

	var all []int64
	res.Sources = map[string]int64{}
	for _, w := range workers {
		all = append(all, w.lat...)
		for k, v := range w.errs {
			res.Errors[k] += v
		}
		for k, v := range w.sources {
			res.Sources[k] += v
		}
	}
	if len(res.Sources) == 0 {
		res.Sources = nil
	}
	res.DurationS = window.Seconds()
	res.Ops = int64(len(all))
	res.Throughput = float64(res.Ops) / window.Seconds()
	res.Latency = summarize(all)
	res.ClientCPUCores = (win.clientCPU[1] - win.clientCPU[0]).Seconds() / window.Seconds()
	res.Server = diffServer(win.server[0], win.server[1], window)
	win.d, win.ops = window, res.Ops
	res.Cost = win.cost()
	return res, nil
}

// healthConn dials a connection for grpc.health.v1 with the same transport
// options api/client uses, so the no-op reference pays for exactly the same
// transport as the Tally scenarios.
func healthConn(cfg Config, addr string) (healthpb.HealthClient, func() error, error) {
	opts := []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(client.MsgBytesMaxDefault)),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}
	if cfg.APIKey != "" {
		key := cfg.APIKey
		opts = append(opts, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
			cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
			return invoker(ctx, method, req, reply, cc, o...)
		}))
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, nil, err
	}
	return healthpb.NewHealthClient(conn), conn.Close, nil
}

// opFunc runs one call for worker i; it returns the balance source of a
// read ("" otherwise).
type opFunc func(ctx context.Context, i int, rng *rand.Rand) (string, error)

func (e *env) op() opFunc {
	cl := func(i int) *client.Client { return e.clients[i%len(e.clients)] }
	pick := func(rng *rand.Rand) uuid.UUID { return e.accounts[rng.IntN(len(e.accounts))] }
	charge := func(ctx context.Context, c *client.Client, acct uuid.UUID) error {
		_, err := c.Charge(ctx, &tallyv1.ChargeRequest{
			AccountId: acct.String(), Amount: 1, IdempotencyKey: client.NewIdempotencyKey(),
		})
		return err
	}
	read := func(ctx context.Context, c *client.Client, acct uuid.UUID) (string, error) {
		b, err := c.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct.String(), Consistency: e.cons})
		if err != nil {
			return "", err
		}
		return strings.TrimPrefix(b.GetSource().String(), "BALANCE_SOURCE_"), nil
	}
	policy := e.clients[0].Policy()
	switch e.cfg.Scenario {
	case "charge-uniform":
		return func(ctx context.Context, i int, rng *rand.Rand) (string, error) {
			return "", charge(ctx, cl(i), pick(rng))
		}
	case "charge-hot":
		return func(ctx context.Context, i int, _ *rand.Rand) (string, error) {
			return "", charge(ctx, cl(i), e.hot)
		}
	case "transfer-uniform":
		return func(ctx context.Context, i int, rng *rand.Rand) (string, error) {
			from := rng.IntN(len(e.accounts))
			to := (from + 1 + rng.IntN(len(e.accounts)-1)) % len(e.accounts)
			_, err := cl(i).Transfer(ctx, &tallyv1.TransferRequest{
				DebitAccountId: e.accounts[from].String(), CreditAccountId: e.accounts[to].String(),
				Amount: 1, IdempotencyKey: client.NewIdempotencyKey(),
			})
			return "", err
		}
	case "balance-cached", "balance-nocache":
		return func(ctx context.Context, i int, rng *rand.Rand) (string, error) {
			return read(ctx, cl(i), pick(rng))
		}
	case "mixed":
		return func(ctx context.Context, i int, rng *rand.Rand) (string, error) {
			if rng.IntN(10) == 0 {
				return "", charge(ctx, cl(i), pick(rng))
			}
			return read(ctx, cl(i), pick(rng))
		}
	case "noop":
		return func(ctx context.Context, i int, _ *rand.Rand) (string, error) {
			h := e.health[i%len(e.health)]
			return "", client.Retry(ctx, policy, func(ctx context.Context) error {
				_, err := h.Check(ctx, &healthpb.HealthCheckRequest{})
				return err
			})
		}
	}
	panic("unreachable")
}

// setup creates and funds the accounts the scenario needs. Account ids are
// derived from the seed, so a second run with the same seed finds them
// (CreateAccount with a supplied id is idempotent) and funds only accounts
// that have never moved.
func (e *env) setup(ctx context.Context) error {
	var n int
	switch e.cfg.Scenario {
	case "noop":
		return nil
	case "charge-hot":
		n = 0
	default:
		n = e.cfg.Accounts
	}
	ns := uuid.NewSHA1(uuid.NameSpaceURL, []byte("tally-bench:"+e.cfg.Seed+":"+e.cfg.Currency))
	e.accounts = make([]uuid.UUID, n)
	for i := range e.accounts {
		e.accounts[i] = uuid.NewSHA1(ns, fmt.Appendf(nil, "account-%d", i))
	}
	if e.cfg.Scenario == "charge-hot" {
		e.hot = uuid.NewSHA1(ns, []byte("hot"))
		return e.ensure(ctx, e.clients[0], e.hot, HotFundingDefault)
	}
	start := time.Now()
	var (
		next     atomic.Int64
		firstErr error
		mu       sync.Mutex
		wg       sync.WaitGroup
	)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for w := 0; w < e.cfg.SetupClients; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := e.clients[w%len(e.clients)]
			for {
				i := int(next.Add(1)) - 1
				if i >= n || sctx.Err() != nil {
					return
				}
				if err := e.ensure(sctx, c, e.accounts[i], FundingDefault); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
					return
				}
				if done := i + 1; done%2000 == 0 {
					e.cfg.Log("setup: %d/%d accounts (%.1fs)", done, n, time.Since(start).Seconds())
				}
			}
		}(w)
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	e.cfg.Log("setup: %d accounts ready in %.1fs", n, time.Since(start).Seconds())
	return ctx.Err()
}

// ensure creates account id (idempotently) and credits it from the default
// funding account unless it already has history. The credit's key is derived
// from the account, so a retried or repeated setup never funds twice.
func (e *env) ensure(ctx context.Context, c *client.Client, id uuid.UUID, amount int64) error {
	a, err := c.CreateAccount(ctx, &tallyv1.CreateAccountRequest{
		AccountId: id.String(), Currency: e.cfg.Currency, Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER,
		ExternalRef: "tally-bench",
	})
	if err != nil {
		return fmt.Errorf("create account %s: %w", id, err)
	}
	if a.GetVersion() > 0 {
		return nil
	}
	_, err = c.Credit(ctx, &tallyv1.CreditRequest{
		AccountId: id.String(), Amount: amount, IdempotencyKey: "tally-bench-fund:" + id.String(),
		Description: "tally bench funding",
	})
	if err != nil {
		return fmt.Errorf("fund account %s: %w", id, err)
	}
	return nil
}

func errKey(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return codes.DeadlineExceeded.String()
		}
		return "client:" + err.Error()
	}
	if info, ok := api.ErrorInfo(err); ok && info.GetReason() != "" {
		return st.Code().String() + "/" + info.GetReason()
	}
	return st.Code().String()
}

func summarize(ns []int64) Latency {
	if len(ns) == 0 {
		return Latency{}
	}
	sort.Slice(ns, func(i, j int) bool { return ns[i] < ns[j] })
	q := func(p float64) float64 {
		i := int(p*float64(len(ns))+0.5) - 1
		i = max(0, min(i, len(ns)-1))
		return ms(ns[i])
	}
	var sum float64
	for _, v := range ns {
		sum += float64(v)
	}
	return Latency{P50: q(0.50), P95: q(0.95), P99: q(0.99), Max: ms(ns[len(ns)-1]), Avg: sum / float64(len(ns)) / 1e6}
}

func ms(ns int64) float64 { return float64(ns) / 1e6 }

func sleep(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// addrs splits Addr into the servers' addresses.
func (c *Config) addrs() []string { return splitList(c.Addr) }

// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}
