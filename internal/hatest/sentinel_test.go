package hatest

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Bounds of the Sentinel failover test.
const (
	sentinelTestTimeout = 60 * time.Second
	// sentinelDownAfter is how long the master must be silent before the
	// Sentinels act; short, to keep the test short.
	sentinelDownAfter       = time.Second
	sentinelFailoverTimeout = 5 * time.Second
	// sentinelFailoverWaitMax bounds the wait for a new master.
	sentinelFailoverWaitMax = 20 * time.Second
	// sentinelWarmup is the workload's run time before the master dies.
	sentinelWarmup = 2 * time.Second
	// cacheHitsAfterFailoverMin is how many reads must come from the cache
	// after the failover to show the cache is back in use.
	cacheHitsAfterFailoverMin = 50
	// cacheReturnWaitMax bounds the wait for those hits.
	cacheReturnWaitMax = 15 * time.Second
	sentinelMaster     = "tally"
	sentinelWorkers    = 4
)

// readObs is one CACHED read and what the worker knew when it was sent.
type readObs struct {
	account          string
	version, balance int64
	source           tallyv1.BalanceSource
	ackedVersion     int64 // the worker's last acknowledged version of the account
	ackedBalance     int64
	at               time.Time
}

// Redis runs as a master with two replicas and three Sentinels; tally's
// cache is given the Sentinels (redis-sentinel://...). A charge-and-read
// workload runs while the master is killed with SIGKILL and the Sentinels
// promote a replica. Every read must succeed and return a (version,
// balance) pair PostgreSQL really had; once the failover is over the cache
// must serve reads again, exactly equal to PostgreSQL's.
func TestRedisSentinelFailover(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("SKIPPED: redis-server is not installed, so no private Redis/Sentinel can be started")
	}
	ctx, cancel := context.WithTimeout(context.Background(), sentinelTestTimeout)
	defer cancel()
	dir := t.TempDir()

	master, err := localsvc.StartRedis(ctx, localsvc.RedisOptions{Dir: filepath.Join(dir, "m")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = master.Close() })
	for i := range 2 {
		r, err := localsvc.StartRedis(ctx, localsvc.RedisOptions{Dir: filepath.Join(dir, fmt.Sprintf("r%d", i)),
			Args: []string{"--replicaof", "127.0.0.1", fmt.Sprint(master.Port())}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Close() })
	}
	var sentinels []string
	for i := range 3 {
		s, err := localsvc.StartSentinel(ctx, localsvc.SentinelOptions{Dir: filepath.Join(dir, fmt.Sprintf("s%d", i)),
			MasterName: sentinelMaster, MasterAddr: master.Addr(), Quorum: 2,
			DownAfter: sentinelDownAfter, FailoverTimeout: sentinelFailoverTimeout})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		sentinels = append(sentinels, s.Addr())
	}
	// The Sentinels must know both replicas and each other before a
	// failover can work.
	sc := redis.NewSentinelClient(&redis.Options{Addr: sentinels[0]})
	defer sc.Close()
	waitFor(t, ctx, 20*time.Second, "sentinels to discover 2 replicas and 2 peers", func() bool {
		reps, err1 := sc.Replicas(ctx, sentinelMaster).Result()
		peers, err2 := sc.Sentinels(ctx, sentinelMaster).Result()
		return err1 == nil && err2 == nil && len(reps) == 2 && len(peers) == 2
	})

	url := "redis-sentinel://" + strings.Join(sentinels, ",") + "/" + sentinelMaster
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: url, CacheTTL: 10 * time.Second,
		CacheOpTimeout: 100 * time.Millisecond, FailuresMax: 3, BreakerCooldown: 500 * time.Millisecond})
	if got := env.Cache.Topology(); got != "sentinel" {
		t.Fatalf("cache topology %q, want sentinel", got)
	}
	cl := env.Client
	accounts := make([]string, sentinelWorkers)
	for i := range accounts {
		a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "EUR", Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER,
			Floor: tallyv1.Floor_FLOOR_NON_NEGATIVE})
		if err != nil {
			t.Fatal(err)
		}
		accounts[i] = a.GetAccountId()
		if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: accounts[i], Amount: 1_000_000,
			IdempotencyKey: "fund-" + accounts[i]}); err != nil {
			t.Fatal(err)
		}
	}

	// Each worker owns one account, so it knows the account's latest
	// acknowledged (version, balance) when it reads.
	var (
		stop      atomic.Bool
		mu        sync.Mutex
		reads     []readObs
		errs      []string
		cacheHits atomic.Int64
		wg        sync.WaitGroup
	)
	for w := range sentinelWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			acct := accounts[w]
			for n := 0; !stop.Load() && ctx.Err() == nil; n++ {
				res, err := cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: acct, Amount: 1, IdempotencyKey: fmt.Sprintf("w%d-%d", w, n)})
				if err != nil {
					mu.Lock()
					errs = append(errs, "charge: "+err.Error())
					mu.Unlock()
					continue
				}
				v, b := res.GetBalance().GetVersion(), res.GetBalance().GetBalance()
				for range 3 {
					bal, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_CACHED})
					mu.Lock()
					if err != nil {
						errs = append(errs, "read: "+err.Error())
					} else {
						reads = append(reads, readObs{account: acct, version: bal.GetVersion(), balance: bal.GetBalance(),
							source: bal.GetSource(), ackedVersion: v, ackedBalance: b, at: time.Now()})
						if bal.GetSource() == tallyv1.BalanceSource_BALANCE_SOURCE_CACHE {
							cacheHits.Add(1)
						}
					}
					mu.Unlock()
				}
			}
		}()
	}
	defer func() { stop.Store(true); wg.Wait() }()

	time.Sleep(sentinelWarmup)
	hitsBefore := cacheHits.Load()
	if hitsBefore == 0 {
		t.Fatalf("no read came from the cache before the failover")
	}
	oldMaster := master.Addr()
	killedAt := time.Now()
	if err := master.Kill(); err != nil {
		t.Fatal(err)
	}
	var newMaster string
	waitFor(t, ctx, sentinelFailoverWaitMax, "a new master", func() bool {
		a, err := sc.GetMasterAddrByName(ctx, sentinelMaster).Result()
		if err == nil && len(a) == 2 && a[0]+":"+a[1] != oldMaster {
			newMaster = a[0] + ":" + a[1]
			return true
		}
		return false
	})
	failedOverAt := time.Now()
	t.Logf("master %s killed; sentinels promoted %s after %s", oldMaster, newMaster, failedOverAt.Sub(killedAt).Round(time.Millisecond))

	// The cache returns: reads come from Redis (the new master) again.
	hitsAtFailover := cacheHits.Load()
	waitFor(t, ctx, cacheReturnWaitMax, "cache hits after the failover", func() bool {
		return cacheHits.Load()-hitsAtFailover >= cacheHitsAfterFailoverMin
	})
	returnedAt := time.Now()
	// Keep going a little in the healed state.
	time.Sleep(time.Second)
	stop.Store(true)
	wg.Wait()
	t.Logf("cache hits: %d before the kill, %d by the failover, %d after it (cache back %s after the promotion)",
		hitsBefore, hitsAtFailover, cacheHits.Load()-hitsAtFailover, returnedAt.Sub(failedOverAt).Round(time.Millisecond))

	if len(errs) > 0 {
		t.Errorf("%d calls failed (a Redis failover must never fail a call), first: %s", len(errs), errs[0])
	}
	// Every read returned a pair PostgreSQL really had: the account's
	// balance_after at that version_after.
	type pair struct {
		acct string
		v    int64
	}
	history := map[pair]int64{}
	rows, err := env.Store.Pool().Query(ctx, `SELECT account_id::text, version_after, balance_after FROM entries WHERE account_id = ANY($1::uuid[])`, accounts)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var p pair
		var b int64
		if err := rows.Scan(&p.acct, &p.v, &b); err != nil {
			t.Fatal(err)
		}
		history[p] = b
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	var stale, staleAfterReturn, fromCacheAfter int
	for _, r := range reads {
		b, ok := history[pair{r.account, r.version}]
		if !ok || b != r.balance {
			t.Errorf("read of %s returned version %d balance %d, which PostgreSQL never had", r.account, r.version, r.balance)
			continue
		}
		if r.version < r.ackedVersion {
			stale++ // allowed by the promise (within the TTL), but only while Redis is sick
			if r.at.After(returnedAt) {
				staleAfterReturn++
			}
		}
		if r.version > r.ackedVersion {
			t.Errorf("read of %s returned version %d, newer than its only writer's last (%d)", r.account, r.version, r.ackedVersion)
		}
		if r.at.After(returnedAt) && r.source == tallyv1.BalanceSource_BALANCE_SOURCE_CACHE {
			fromCacheAfter++
		}
	}
	t.Logf("%d reads checked against PostgreSQL's history: %d older than the writer's last ack (during the failover), %d from the cache after it returned",
		len(reads), stale, fromCacheAfter)
	if staleAfterReturn > 0 {
		t.Errorf("%d reads after the cache returned were older than the last acknowledged write", staleAfterReturn)
	}

	// Healed: a CACHED read now equals PostgreSQL's current state, and
	// comes from the new master.
	for _, acct := range accounts {
		strong, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
		if err != nil {
			t.Fatal(err)
		}
		cached, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_CACHED})
		if err != nil {
			t.Fatal(err)
		}
		if cached.GetVersion() != strong.GetVersion() || cached.GetBalance() != strong.GetBalance() ||
			cached.GetSource() != tallyv1.BalanceSource_BALANCE_SOURCE_CACHE {
			t.Errorf("%s after the failover: cached %d@v%d (%s), PostgreSQL %d@v%d", acct, cached.GetBalance(), cached.GetVersion(),
				cached.GetSource(), strong.GetBalance(), strong.GetVersion())
		}
	}
	nm := redis.NewClient(&redis.Options{Addr: newMaster})
	defer nm.Close()
	if n, err := nm.Exists(ctx, env.KeyPrefix+accounts[0]).Result(); err != nil || n != 1 {
		t.Errorf("the new master %s does not hold the cached balance (exists=%d, err=%v)", newMaster, n, err)
	}
	env.CheckBooks(t)
}

// waitFor polls cond every 50 ms until it holds, failing the test after d.
func waitFor(t *testing.T, ctx context.Context, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
