package hatest

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Bounds of the Redis Cluster test.
const (
	clusterTestTimeout = 60 * time.Second
	clusterNodes       = 3
	clusterAccounts    = 24
	// clusterReadyWaitMax bounds the wait for the cluster to report ok.
	clusterReadyWaitMax = 20 * time.Second
)

// The cache on a three-master Redis Cluster (redis-cluster://...): balances
// are cached on every master (keys spread over the slots), reads come from
// the cache and equal PostgreSQL's; with one master killed, reads of its
// slots fall back to PostgreSQL and stay correct, and no call fails.
func TestRedisClusterCache(t *testing.T) {
	if _, err := exec.LookPath("redis-cli"); err != nil {
		t.Skip("SKIPPED: redis-cli is not installed, so no private Redis Cluster can be created")
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterTestTimeout)
	defer cancel()
	dir := t.TempDir()
	var nodes []*localsvc.Redis
	var addrs []string
	for i := range clusterNodes {
		r, err := localsvc.StartRedis(ctx, localsvc.RedisOptions{Dir: filepath.Join(dir, fmt.Sprintf("n%d", i)),
			Args: []string{"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Close() })
		nodes = append(nodes, r)
		addrs = append(addrs, r.Addr())
	}
	create := exec.CommandContext(ctx, "redis-cli", append(append([]string{"--cluster", "create"}, addrs...), "--cluster-replicas", "0", "--cluster-yes")...)
	if out, err := create.CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer cc.Close()
	waitFor(t, ctx, clusterReadyWaitMax, "cluster_state:ok", func() bool {
		info, err := cc.ClusterInfo(ctx).Result()
		return err == nil && strings.Contains(info, "cluster_state:ok")
	})

	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL, RedisURL: "redis-cluster://" + strings.Join(addrs, ","),
		CacheTTL: 10 * time.Second, CacheOpTimeout: 100 * time.Millisecond, FailuresMax: 3, BreakerCooldown: 500 * time.Millisecond})
	if got := env.Cache.Topology(); got != "cluster" {
		t.Fatalf("cache topology %q, want cluster", got)
	}
	cl := env.Client
	accounts := make([]string, clusterAccounts)
	for i := range accounts {
		a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "EUR", Type: tallyv1.AccountType_ACCOUNT_TYPE_CUSTOMER,
			Floor: tallyv1.Floor_FLOOR_NON_NEGATIVE})
		if err != nil {
			t.Fatal(err)
		}
		accounts[i] = a.GetAccountId()
		if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: accounts[i], Amount: 1000, IdempotencyKey: "fund-" + accounts[i]}); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: accounts[i], Amount: int64(i + 1), IdempotencyKey: "c-" + accounts[i]}); err != nil {
			t.Fatal(err)
		}
	}
	// readAll reads every account CACHED and STRONG and checks they agree;
	// it returns how many came from the cache.
	readAll := func() int {
		hits := 0
		for _, acct := range accounts {
			cached, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_CACHED})
			if err != nil {
				t.Fatalf("cached read: %v", err)
			}
			strong, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: acct, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
			if err != nil {
				t.Fatalf("strong read: %v", err)
			}
			if cached.GetVersion() != strong.GetVersion() || cached.GetBalance() != strong.GetBalance() {
				t.Errorf("%s: cached %d@v%d, PostgreSQL %d@v%d", acct, cached.GetBalance(), cached.GetVersion(), strong.GetBalance(), strong.GetVersion())
			}
			if cached.GetSource() == tallyv1.BalanceSource_BALANCE_SOURCE_CACHE {
				hits++
			}
		}
		return hits
	}
	if hits := readAll(); hits != len(accounts) {
		t.Fatalf("%d of %d reads from the cache on a healthy cluster", hits, len(accounts))
	}
	// The balances are spread over the masters.
	holding := 0
	for _, n := range nodes {
		c := redis.NewClient(&redis.Options{Addr: n.Addr()})
		keys, err := c.Keys(ctx, env.KeyPrefix+"*").Result()
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) > 0 {
			holding++
		}
	}
	if holding < 2 {
		t.Errorf("cached balances on %d of %d masters: keys not spread over the slots", holding, len(nodes))
	}

	// One master dies (no replica to take over): its slots are gone, the
	// rest of the cache keeps working, and every read stays correct.
	if err := nodes[0].Kill(); err != nil {
		t.Fatal(err)
	}
	hits := readAll()
	t.Logf("cluster of %d masters, cached balances on %d; after killing one master: %d of %d reads from the cache, all equal to PostgreSQL",
		len(nodes), holding, hits, len(accounts))
	env.CheckBooks(t)
}
