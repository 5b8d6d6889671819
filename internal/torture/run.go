package torture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/stripetest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Config configures a torture run.
type Config struct {
	Duration time.Duration
	Seed     int64
	Tallyds  int // >= 2
	Clients  int
	// Accounts is the number of customer accounts (split over two
	// currencies); the workload also creates revenue and funding accounts.
	Accounts int
	CacheTTL time.Duration
	// TallydBin is a prebuilt tallyd; empty builds ./cmd/tallyd from the
	// module at RepoDir (default: found from the working directory).
	TallydBin string
	RepoDir   string
	// OldTallydBin, when set, turns the run into a rolling upgrade: the
	// database is migrated by TallydBin (the new release, as a rollout's
	// migration job does first), every tallyd starts on OldTallydBin (the
	// previous release), and during the run they are replaced one at a
	// time (SIGTERM, drain, start on TallydBin), so both versions serve
	// one schema side by side. The rolling upgrade replaces the nemesis,
	// and the clients use only the previous release's calls (charge,
	// credit, transfer, balance reads).
	OldTallydBin string
	// PGFailover runs PostgreSQL as a primary with a synchronous streaming
	// standby (synchronous_standby_names = '*'); every tallyd names both
	// servers with target_session_attrs=read-write. Once per run, at 40%
	// of Duration, the nemesis kills the primary with SIGKILL and promotes
	// the standby (FaultPGFailover); the other faults go on, PostgreSQL
	// restarts hitting whichever server is the primary. The check runs
	// against the new primary.
	PGFailover bool
	// Topology, when set, replaces the private PostgreSQL: the run
	// creates its database on the deployment, tallyds connect to its
	// TallydTarget, and the nemesis's PostgreSQL restarts are replaced by
	// Faults, the deployment's own (a Patroni failover, a switchover).
	Topology Topology
	Faults   []ScheduledFault
	// TallydArgs are extra flags for every tallyd (for example
	// --database-pooler transaction behind PgBouncer).
	TallydArgs []string
	// PgBouncer puts a PgBouncer in transaction pooling mode (a pool of
	// PgBouncerServerConns server connections) in front of PostgreSQL:
	// every tallyd's PostgreSQL fault proxy leads to PgBouncer, and tallyd
	// runs with --database-pooler transaction. Migrations, key creation
	// and the checker connect to PostgreSQL directly, as an operator's
	// would. PostgreSQL restarts then happen behind PgBouncer, which must
	// reconnect by itself. It cannot be combined with OldTallydBin (the
	// previous release may lack --database-pooler) nor with PGFailover
	// (PgBouncer names one server; failing over is HAProxy's job).
	PgBouncer bool
	// Keep keeps the temp dir (logs, the stopped PostgreSQL data dir).
	Keep    bool
	Verbose bool
	// Out receives progress and the summary; default os.Stdout.
	Out io.Writer
}

// Defaults for the zero fields of Config (and the tally-torture flags).
const (
	DefaultDuration = 60 * time.Second
	DefaultTallyds  = 2
	DefaultClients  = 8
	DefaultAccounts = 16
	DefaultCacheTTL = 2 * time.Second
	// PgBouncerServerConns is the server pool of a Config.PgBouncer run:
	// far fewer than the tallyds' client connections, so they take turns.
	PgBouncerServerConns = 10
)

// Currencies the workload uses.
var currencies = []string{"USD", "CREDITS"}

const keyPrefix = "tally:bal:"

// runner is one torture run in progress.
type runner struct {
	cfg       Config
	outMu     sync.Mutex // serializes writes to out
	out       io.Writer
	log       *slog.Logger
	hist      *History
	dir       string
	cacheTTL  time.Duration
	keyPrefix string

	// pg is the current primary; dbURL points at it.
	pg *localsvc.Postgres
	// standby is the synchronous standby of a failover run until it is
	// promoted (then it is pg, and oldPG is the killed primary).
	standby  *localsvc.Postgres
	oldPG    *localsvc.Postgres
	failover failoverInfo
	// scheduledDone marks the Config.Faults that ran; faultRecords are
	// what they did, in order. workloadStart is when the workload began.
	scheduledDone []bool
	faultRecords  []FaultRecord
	workloadStart time.Time
	redis         *localsvc.Redis
	rdb           *redis.Client
	// pgb is the PgBouncer of a Config.PgBouncer run (nil otherwise).
	pgb *localsvc.PgBouncer
	// stripe is the top-up provider of every tallyd (nil in a rolling
	// upgrade: the previous release may lack auto top-up).
	stripe *stripetest.Server
	dbURL  string
	// newBin is the tallyd binary of this build (the upgrade target).
	newBin   string
	upgraded atomic.Int64
	tds      []*tallyd
	pools    pools
	apiKey   string

	// fol follows the change feed from the start of the workload until the
	// check; folStop stops it, folDone is closed when it has.
	fol     *follower
	folStop context.CancelFunc
	folDone chan struct{}

	faultsMu sync.Mutex
	faults   map[string]int

	shared shared

	opsDone     atomic.Int64
	opsAcked    atomic.Int64
	batchesDone atomic.Int64
	readsDone   atomic.Int64
}

func (r *runner) countFault(kind string) {
	r.faultsMu.Lock()
	r.faults[kind]++
	r.faultsMu.Unlock()
}

func (r *runner) faultCount() int {
	r.faultsMu.Lock()
	defer r.faultsMu.Unlock()
	n := 0
	for _, v := range r.faults {
		n += v
	}
	return n
}

// event logs to the run log, and to Out when verbose.
func (r *runner) event(msg string, args ...any) {
	r.log.Info(msg, args...)
	if r.cfg.Verbose {
		line := fmt.Sprintf("%s %s", time.Now().Format("15:04:05.000"), msg)
		for i := 0; i+1 < len(args); i += 2 {
			line += fmt.Sprintf(" %v=%v", args[i], args[i+1])
		}
		r.printf("%s\n", line)
	}
}

func (r *runner) printf(format string, args ...any) {
	// The progress loop and the rolling upgrade print concurrently.
	r.outMu.Lock()
	defer r.outMu.Unlock()
	fmt.Fprintf(r.out, format, args...)
}

// FindRepo returns the root of the tally module containing dir.
func FindRepo(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && modulePath(string(b)) == "github.com/tallyledger/tally" {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no github.com/tallyledger/tally module above %s", dir)
		}
	}
}

// modulePath returns the module path declared in a go.mod file.
func modulePath(gomod string) string {
	for _, line := range strings.Split(gomod, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}

// Run performs one torture run and returns its report. An error means the
// run itself could not be carried out (a server would not start); a run
// that found violations returns a report with Pass false and no error.
func Run(ctx context.Context, cfg Config) (rep *Report, err error) {
	if cfg.Duration <= 0 {
		cfg.Duration = DefaultDuration
	}
	if cfg.Tallyds == 0 {
		cfg.Tallyds = DefaultTallyds
	}
	if cfg.Clients == 0 {
		cfg.Clients = DefaultClients
	}
	if cfg.Accounts == 0 {
		cfg.Accounts = DefaultAccounts
	}
	if cfg.Tallyds < 2 {
		return nil, errors.New("torture: need at least 2 tallyds")
	}
	if cfg.Clients < 1 {
		return nil, errors.New("torture: need at least 1 client")
	}
	if cfg.Accounts < 8 {
		return nil, errors.New("torture: need at least 8 accounts")
	}
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = DefaultCacheTTL
	}
	if cfg.Out == nil {
		cfg.Out = os.Stdout
	}
	if cfg.PGFailover && cfg.OldTallydBin != "" {
		return nil, errors.New("torture: a PostgreSQL failover run cannot also be a rolling upgrade")
	}
	if cfg.PgBouncer && (cfg.OldTallydBin != "" || cfg.PGFailover) {
		return nil, errors.New("torture: a PgBouncer run can be neither a rolling upgrade nor a PostgreSQL failover run")
	}
	if err := validateTopology(cfg); err != nil {
		return nil, err
	}
	r := &runner{cfg: cfg, out: cfg.Out, hist: NewHistory(), cacheTTL: cfg.CacheTTL, keyPrefix: keyPrefix, faults: map[string]int{},
		scheduledDone: make([]bool, len(cfg.Faults))}
	started := time.Now()

	r.dir, err = os.MkdirTemp("", "tally-torture-")
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(r.dir, "torture.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.log = slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	r.printf("tally-torture: seed %d, duration %s, %d tallyds, %d clients, %d accounts; work dir %s\n",
		cfg.Seed, cfg.Duration, cfg.Tallyds, cfg.Clients, cfg.Accounts, r.dir)

	keep := cfg.Keep
	defer func() {
		r.teardown(keep)
		if !keep {
			os.RemoveAll(r.dir)
		}
	}()

	if err := r.setup(ctx); err != nil {
		keep = true
		return nil, fmt.Errorf("setup: %w (logs kept in %s)", err, r.dir)
	}
	if err := r.fund(ctx); err != nil {
		keep = true
		return nil, fmt.Errorf("funding: %w (logs kept in %s)", err, r.dir)
	}

	if err := r.torture(ctx); err != nil {
		keep = true
		return nil, fmt.Errorf("%w (logs kept in %s)", err, r.dir)
	}

	rep, err = r.check(ctx, started)
	if err != nil {
		keep = true
		return nil, fmt.Errorf("check: %w (logs kept in %s)", err, r.dir)
	}
	if !rep.Pass {
		keep = true
		// The whole history, for working out what went wrong.
		if b, err := json.Marshal(r.hist); err == nil {
			_ = os.WriteFile(filepath.Join(r.dir, "history.json"), b, 0o644)
		}
	}
	if keep {
		rep.TempDir = r.dir
	}
	return rep, nil
}

// setup builds tallyd, starts PostgreSQL and Redis, creates and migrates
// the database, and starts the tallyds behind their proxies.
func (r *runner) setup(ctx context.Context) error {
	bin := r.cfg.TallydBin
	if bin == "" {
		repo := r.cfg.RepoDir
		if repo == "" {
			wd, err := os.Getwd()
			if err != nil {
				return err
			}
			if repo, err = FindRepo(wd); err != nil {
				return err
			}
		}
		bin = filepath.Join(r.dir, "tallyd")
		r.printf("building tallyd from %s ...\n", repo)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/tallyd")
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./cmd/tallyd: %w\n%s", err, out)
		}
	}

	var err error
	adminURL, pgTarget, err := r.startPostgres(ctx)
	if err != nil {
		return err
	}
	r.redis, err = localsvc.StartRedis(ctx, localsvc.RedisOptions{Dir: filepath.Join(r.dir, "redis"), Logger: r.log})
	if err != nil {
		return err
	}
	r.rdb = redis.NewClient(&redis.Options{Addr: r.redis.Addr(), DialTimeout: time.Second, ReadTimeout: 2 * time.Second,
		WriteTimeout: 2 * time.Second, MaxRetries: 2})

	conn, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE tally")
	conn.Close(ctx)
	if err != nil {
		return err
	}
	r.dbURL = r.databaseURL("tally")
	mig := exec.CommandContext(ctx, bin, "migrate", "--database-url", r.dbURL)
	mig.Env = childEnv()
	if out, err := mig.CombinedOutput(); err != nil {
		return fmt.Errorf("tallyd migrate: %w\n%s", err, out)
	}
	// Authentication is on, as in production: the workload runs as an
	// admin client (it creates accounts and credits as well as charges).
	mk := exec.CommandContext(ctx, bin, "keys", "create", "--database-url", r.dbURL, "--name", "torture", "--role", "admin", "--quiet")
	mk.Env = childEnv()
	out, err := mk.Output()
	if err != nil {
		return fmt.Errorf("tallyd keys create: %w", err)
	}
	apiKey := strings.TrimSpace(string(out))
	r.apiKey = apiKey

	standbyTarget := ""
	if r.cfg.PGFailover {
		if err := r.startStandby(ctx); err != nil {
			return err
		}
		standbyTarget = fmt.Sprintf("127.0.0.1:%d", r.standby.Port())
		r.printf("PostgreSQL failover mode: primary :%d, synchronous standby :%d; the primary is killed and the standby promoted at t=%s\n",
			r.pg.Port(), r.standby.Port(), r.failoverAt())
	}
	r.newBin = bin
	startBin := bin
	if r.cfg.OldTallydBin != "" {
		startBin = r.cfg.OldTallydBin
		r.printf("rolling upgrade: tallyds start on %s, are replaced by %s during the run\n", startBin, bin)
	}
	var topupFlags []string
	if r.cfg.OldTallydBin == "" {
		if topupFlags, err = r.startStripe(); err != nil {
			return err
		}
		r.printf("auto top-up: Stripe-compatible test server at %s\n", r.stripe.URL)
	}
	var poolerFlags []string
	if r.cfg.PgBouncer {
		r.pgb, err = localsvc.StartPgBouncer(ctx, localsvc.PgBouncerOptions{Dir: filepath.Join(r.dir, "pgbouncer"), Target: pgTarget,
			PoolMode: "transaction", DefaultPoolSize: PgBouncerServerConns, Logger: r.log})
		if err != nil {
			return err
		}
		pgTarget = r.pgb.Addr()
		poolerFlags = []string{"--database-pooler", "transaction"}
		r.printf("PgBouncer (transaction pooling, %d server connections) at %s in front of PostgreSQL :%d; tallyds run with --database-pooler transaction\n",
			PgBouncerServerConns, r.pgb.Addr(), r.pg.Port())
	}
	for i := 0; i < r.cfg.Tallyds; i++ {
		t, err := newTallyd(i, startBin, r.dir, pgTarget, standbyTarget, r.redis.Addr(), r.cacheTTL.String(), r.hist, r.log)
		if err != nil {
			return err
		}
		t.args = append(t.args, poolerFlags...)
		t.args = append(append(t.args, topupFlags...), r.cfg.TallydArgs...)
		if r.cfg.OldTallydBin != "" {
			known, err := serveFlags(ctx, r.cfg.OldTallydBin)
			if err != nil {
				return err
			}
			kept, dropped := filterArgs(t.args, known)
			t.argsByBin = map[string][]string{r.cfg.OldTallydBin: kept}
			if len(dropped) > 0 && i == 0 {
				r.printf("the previous release lacks flags %v: started without them\n", dropped)
			}
		}
		r.tds = append(r.tds, t)
		if t.cl, err = newClient(i, t.grpcAddr, apiKey, r.hist); err != nil {
			return err
		}
		if err := t.start(ctx); err != nil {
			return err
		}
	}
	r.printf("started %d tallyds (%s)\n", len(r.tds), r.tds[0].grpcAddr)
	return nil
}

// startPostgres starts the private PostgreSQL (unless the run is on a
// Topology) and returns the URL of its postgres database, for creating
// the run's, and the host:port tallyds connect to.
func (r *runner) startPostgres(ctx context.Context) (adminURL, tallydTarget string, err error) {
	if t := r.cfg.Topology; t != nil {
		r.printf("starting private Redis; PostgreSQL is the given topology (tallyds connect to %s) ...\n", t.TallydTarget())
		return t.DirectURL("postgres"), t.TallydTarget(), nil
	}
	r.printf("starting private PostgreSQL and Redis ...\n")
	var pgConf map[string]string
	if r.cfg.PGFailover {
		pgConf = map[string]string{"wal_level": "replica", "max_wal_senders": "5"}
	}
	r.pg, err = localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Dir: filepath.Join(r.dir, "pg"), Logger: r.log, ExtraConf: pgConf})
	if err != nil {
		return "", "", err
	}
	return r.pg.URL("postgres"), fmt.Sprintf("127.0.0.1:%d", r.pg.Port()), nil
}

// databaseURL is the direct URL of database db on the current primary.
func (r *runner) databaseURL(db string) string {
	if r.cfg.Topology != nil {
		return r.cfg.Topology.DirectURL(db)
	}
	return r.pg.URL(db)
}

// fund creates the accounts and gives each customer its starting balance
// with Credits (ordinary ops of the history), before any fault.
func (r *runner) fund(ctx context.Context) error {
	p := pools{customers: map[string][]AccountSpec{}, hot: map[string][]AccountSpec{}, small: map[string][]AccountSpec{},
		revenue: map[string][]AccountSpec{}, funding: map[string][]AccountSpec{}, byID: map[string]AccountSpec{}, currencies: currencies}
	cl := r.tds[0].cl
	create := func(spec AccountSpec, typ tallyv1.AccountType, floor tallyv1.Floor) (AccountSpec, error) {
		req := &tallyv1.CreateAccountRequest{Currency: spec.Currency, Type: typ, Floor: floor, CreditLimit: spec.CreditLimit,
			ExternalRef: "torture-" + spec.Role, Metadata: map[string]string{"role": spec.Role}}
		a, err := cl.CreateAccount(ctx, req)
		if err != nil {
			return spec, fmt.Errorf("create %s account: %w", spec.Role, err)
		}
		spec.ID = a.GetAccountId()
		r.hist.AddAccount(spec)
		p.all = append(p.all, spec)
		p.byID[spec.ID] = spec
		return spec, nil
	}
	type funding struct {
		acct   AccountSpec
		amount int64
	}
	var funds []funding
	for i := 0; i < r.cfg.Accounts; i++ {
		cur := currencies[i%len(currencies)]
		n := i / len(currencies) // index within the currency
		spec := AccountSpec{Currency: cur, Type: "CUSTOMER", Floor: "NON_NEGATIVE"}
		var amount int64
		switch {
		case n < 2:
			spec.Role, amount = "hot", 1_000_000_000
		case n%3 == 2:
			spec.Role, amount = "small", 100
		case n%3 == 0:
			spec.Role, spec.CreditLimit, amount = "limit", 50, 20
		default:
			spec.Role, amount = "normal", 100_000
		}
		spec, err := create(spec, tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, tallyv1.Floor_FLOOR_NON_NEGATIVE)
		if err != nil {
			return err
		}
		p.customers[cur] = append(p.customers[cur], spec)
		switch spec.Role {
		case "hot":
			p.hot[cur] = append(p.hot[cur], spec)
		case "small", "limit":
			p.small[cur] = append(p.small[cur], spec)
		}
		funds = append(funds, funding{spec, amount})
	}
	if r.stripe != nil {
		specs, err := r.fundTopUps(ctx, &p)
		if err != nil {
			return err
		}
		for _, s := range specs {
			funds = append(funds, funding{s, 600})
		}
	}
	for _, cur := range currencies {
		if len(p.small[cur]) == 0 { // few accounts: let a normal one stand in
			p.small[cur] = p.customers[cur][len(p.customers[cur])-1:]
		}
		rev, err := create(AccountSpec{Currency: cur, Type: "REVENUE", Floor: "NONE", Role: "revenue"},
			tallyv1.AccountType_ACCOUNT_TYPE_REVENUE, tallyv1.Floor_FLOOR_NONE)
		if err != nil {
			return err
		}
		p.revenue[cur] = append(p.revenue[cur], rev)
		fnd, err := create(AccountSpec{Currency: cur, Type: "FUNDING", Floor: "NONE", Role: "funding"},
			tallyv1.AccountType_ACCOUNT_TYPE_FUNDING, tallyv1.Floor_FLOOR_NONE)
		if err != nil {
			return err
		}
		p.funding[cur] = append(p.funding[cur], fnd)
	}
	// Two empty customers for the lifecycle client to close; kept out of
	// the pools the other clients and the final reads use.
	for i := 0; i < 2; i++ {
		spec := AccountSpec{Currency: currencies[i%len(currencies)], Type: "CUSTOMER", Floor: "NON_NEGATIVE", Role: "closable"}
		spec, err := create(spec, tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER, tallyv1.Floor_FLOOR_NON_NEGATIVE)
		if err != nil {
			return err
		}
		p.all = p.all[:len(p.all)-1]
		p.closable = append(p.closable, spec)
	}
	r.pools = p

	rng := rand.New(rand.NewPCG(uint64(r.cfg.Seed), 0x66756e64))
	for i, f := range funds {
		o := &Op{Client: -1, Key: client.NewIdempotencyKey(), Kind: KindCredit, Account: f.acct.ID, Amount: f.amount}
		req := &tallyv1.CreditRequest{AccountId: o.Account, Amount: o.Amount, IdempotencyKey: o.Key,
			Description: fmt.Sprintf("torture opening balance %d", i)}
		r.execOp(ctx, rng, o, false, singleCall(&tallyv1.BatchOperation{Op: &tallyv1.BatchOperation_Credit{Credit: req}}))
		if o.Outcome != OutcomeAcked {
			return fmt.Errorf("opening credit of %s: %s %s", f.acct.ID, o.FinalCode, o.FinalReason)
		}
	}
	r.printf("created %d accounts and funded %d customers\n", len(p.all), len(funds))
	return nil
}

// rollingUpgrade replaces the tallyds one at a time, evenly spread over the
// run, as a Deployment rollout does: SIGTERM (the old process must drain
// and exit 0), then start the new binary on the same ports and wait until
// it is ready.
func (r *runner) rollingUpgrade(stop context.Context) error {
	step := r.cfg.Duration / time.Duration(len(r.tds)+1)
	for _, t := range r.tds {
		hold(stop, step)
		if stop.Err() != nil {
			return nil
		}
		bg, cancel := context.WithTimeout(context.WithoutCancel(stop), readyTimeout+30*time.Second)
		start := time.Now()
		err := t.term(20 * time.Second)
		if err == nil {
			t.mu.Lock()
			t.bin = r.newBin
			t.mu.Unlock()
			err = t.start(bg)
		}
		cancel()
		r.countFault(FaultRollingUpgrade)
		if err != nil {
			return fmt.Errorf("upgrading tallyd %d: %w", t.idx, err)
		}
		r.upgraded.Add(1)
		r.event("fault", "kind", FaultRollingUpgrade, "detail", fmt.Sprintf("tallyd %d replaced by the new release", t.idx),
			"took", time.Since(start).Round(time.Millisecond).String())
		r.printf("  upgraded tallyd %d to the new release (%s)\n", t.idx, time.Since(start).Round(time.Millisecond))
	}
	<-stop.Done()
	return nil
}

// torture runs the clients and the nemesis for the duration, then heals
// everything and lets every client finish its retries.
func (r *runner) torture(ctx context.Context) error {
	stop, cancelStop := context.WithTimeout(ctx, r.cfg.Duration)
	defer cancelStop()
	// hard bounds the retries of ops still in flight when the run ends.
	hard, cancelHard := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelHard()
	go func() {
		select {
		case <-ctx.Done(): // interrupted: give up on retries too
			cancelHard()
		case <-hard.Done():
		}
	}()

	r.printf("running workload and nemesis for %s ...\n", r.cfg.Duration)
	r.workloadStart = time.Now()
	if r.cfg.OldTallydBin == "" {
		// The previous release of a rolling upgrade may lack the feed.
		fol, err := r.newFollower()
		if err != nil {
			return err
		}
		fctx, fstop := context.WithCancel(context.WithoutCancel(ctx))
		r.fol, r.folStop, r.folDone = fol, fstop, make(chan struct{})
		go func() {
			defer close(r.folDone)
			fol.run(fctx)
		}()
	}
	var wg sync.WaitGroup
	if r.cfg.OldTallydBin == "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.lifecycle(stop, hard)
		}()
	}
	for i := 0; i < r.cfg.Clients; i++ {
		w := &worker{r: r, id: i, rng: rand.New(rand.NewPCG(uint64(r.cfg.Seed), uint64(i+1))), lastAcked: map[string]int64{}}
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run(stop, hard)
		}()
	}
	nemErr := make(chan error, 1)
	if r.cfg.OldTallydBin != "" {
		go func() { nemErr <- r.rollingUpgrade(stop) }()
	} else {
		go func() { nemErr <- r.nemesis(stop, r.cfg.Seed) }()
	}

	start := r.workloadStart
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	var err error
loop:
	for {
		select {
		case <-tick.C:
			r.printf("  t=%-4s ops %d (acked %d; %d batches), reads %d, faults %d\n", time.Since(start).Round(time.Second),
				r.opsDone.Load(), r.opsAcked.Load(), r.batchesDone.Load(), r.readsDone.Load(), r.faultCount())
		case err = <-nemErr:
			if err != nil {
				cancelStop()
			}
			break loop
		}
	}
	if err == nil {
		err = ctx.Err()
	}
	// Heal anything left (the nemesis heals each fault itself; this covers
	// a nemesis that failed half-way and tallyds that crashed).
	for _, t := range r.tds {
		t.heal()
		t.redisProxy.SetLatency(0)
	}
	if err == nil {
		for _, t := range r.tds {
			if !t.isRunning() {
				r.event("restarting tallyd that was down at the end", "tallyd", t.idx)
				if serr := t.start(ctx); serr != nil {
					err = serr
				}
			}
		}
	}
	r.printf("workload stopped after %s; healed; waiting for in-flight ops to finish their retries ...\n",
		time.Since(start).Round(time.Second))
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(opDeadline + time.Minute):
		cancelHard()
		<-done
	}
	return err
}

// check waits one cache TTL (and until every short hold has expired and
// the hold sweeper has written its expiry down, so no version changes
// between the final reads and the snapshot), snapshots Redis and
// PostgreSQL, and runs the checker.
func (r *runner) check(ctx context.Context, started time.Time) (*Report, error) {
	wait := r.cacheTTL + time.Second
	if until := time.Until(r.shared.latestExpiry().Add(2*holdSweepInterval + time.Second)); until > wait {
		wait = until
	}
	r.printf("all clients done; waiting %s (one cache TTL) before checking ...\n", wait)
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(wait):
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute+feedCatchUpMax+reconcileMax+topUpSettleMax)
	defer cancel()
	r.settleTopUps(cctx)
	if r.fol != nil {
		r.catchUp(cctx, r.fol, r.folStop, r.folDone)
		r.fol = nil
	}
	if r.cfg.OldTallydBin == "" || int(r.upgraded.Load()) == len(r.tds) {
		// (A previous release left running lacks Reconcile.)
		r.reconcile(cctx)
	}
	r.finalReads(cctx)
	cs, err := LoadCacheState(cctx, r.rdb, r.keyPrefix)
	if err != nil {
		return nil, err
	}
	conn, err := pgx.Connect(cctx, r.dbURL)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	db, err := LoadDBStateSnapshot(cctx, conn)
	if err != nil {
		return nil, err
	}
	db.Payments = r.payments()
	invs := Check(r.hist, db, cs, CheckOptions{CacheTTL: r.cacheTTL})
	if r.cfg.PGFailover {
		invs = append(invs, r.checkFailover(cctx, conn))
	}
	if len(r.cfg.Faults) > 0 {
		invs = append(invs, r.checkScheduled(db))
	}
	rep := &Report{
		Seed: r.cfg.Seed, Duration: r.cfg.Duration.String(), StartedAt: started,
		Elapsed: time.Since(started).Round(time.Second).String(),
		Tallyds: r.cfg.Tallyds, Clients: r.cfg.Clients, Accounts: len(r.pools.all), CacheTTL: r.cacheTTL.String(),
		Faults: map[string]int{}, AnswerCodes: map[string]int{}, Invariants: invs,
	}
	rep.Ops, rep.Reads = Summarize(r.hist, db)
	rep.ScheduledFaults = r.faultRecords
	r.faultsMu.Lock()
	kinds := slices.Clone(r.nemesisKinds())
	if r.cfg.OldTallydBin != "" {
		kinds = []string{FaultRollingUpgrade}
	}
	if r.cfg.PGFailover {
		kinds = append(kinds, FaultPGFailover)
	}
	for _, f := range r.cfg.Faults {
		kinds = append(kinds, f.Name)
	}
	for _, k := range kinds {
		rep.Faults[k] = r.faults[k]
		if r.faults[k] == 0 {
			rep.FaultsMissing = append(rep.FaultsMissing, k)
		}
	}
	r.faultsMu.Unlock()
	r.hist.mu.Lock()
	for k, v := range r.hist.AnswerCodes {
		rep.AnswerCodes[k] = v
	}
	r.hist.mu.Unlock()
	rep.Finish()
	return rep, nil
}

// finalReads reads every account twice through every tallyd with cached
// consistency (the first read may fill the cache, the second should hit it).
// Nothing is written any more, so each must return the current state.
func (r *runner) finalReads(ctx context.Context) {
	for _, t := range r.tds {
		for _, a := range r.pools.all {
			for i := 0; i < 2; i++ {
				obs := Observation{Client: -1, Account: a.ID, Consistency: ReadCached, Final: true, Start: time.Now()}
				b, err := t.cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a.ID})
				if err != nil {
					r.hist.AddReadFailure(ReadFailure{Client: -1, Account: a.ID, Consistency: ReadCached,
						Code: codeName(status.Code(err)), Reason: reasonOf(err), Message: status.Convert(err).Message()})
					continue
				}
				obs.End, obs.Version, obs.Balance, obs.Source = time.Now(), b.GetVersion(), b.GetBalance(), sourceName(b.GetSource())
				r.hist.AddObservation(obs)
			}
		}
	}
}

// teardown stops every process. With keep, PostgreSQL is stopped cleanly
// and its data directory left in the work dir for inspection.
func (r *runner) teardown(keep bool) {
	if r.fol != nil {
		r.folStop()
		<-r.folDone
		r.fol.close()
	}
	var wg sync.WaitGroup
	for _, t := range r.tds {
		wg.Add(1)
		go func() { defer wg.Done(); t.close() }()
	}
	wg.Wait()
	if r.rdb != nil {
		r.rdb.Close()
	}
	if r.redis != nil {
		_ = r.redis.Close()
	}
	if r.stripe != nil {
		r.stripe.Close()
	}
	if r.pgb != nil {
		_ = r.pgb.Close()
	}
	for _, pg := range []*localsvc.Postgres{r.pg, r.standby, r.oldPG} {
		if pg == nil {
			continue
		}
		if keep {
			_ = pg.Stop("fast")
		} else {
			_ = pg.Close()
		}
	}
}
