package cache

import (
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The URL forms select the topology, and every topology gets the cache's
// bounds (timeouts, no retries) whatever the URL asks for.
func TestURLTopologies(t *testing.T) {
	lim := clientLimits{opTimeout: 40 * time.Millisecond, dialTimeout: 80 * time.Millisecond}
	bounded := func(t *testing.T, ctxTimeout bool, read, write, pool, dial time.Duration, retries int) {
		t.Helper()
		if !ctxTimeout || read != lim.opTimeout || write != lim.opTimeout || pool != lim.opTimeout || dial != lim.dialTimeout || retries > 0 {
			t.Fatalf("client not bounded: ctxTimeout=%v read=%v write=%v pool=%v dial=%v retries=%d", ctxTimeout, read, write, pool, dial, retries)
		}
	}

	t.Run("single", func(t *testing.T) {
		c, topo, err := newClient("redis://u:p@10.0.0.1:6380/3?read_timeout=10s&max_retries=5", lim)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		o := c.(*redis.Client).Options()
		if topo != TopologySingle || o.Addr != "10.0.0.1:6380" || o.DB != 3 || o.Username != "u" || o.Password != "p" {
			t.Fatalf("topology %s options %+v", topo, o)
		}
		bounded(t, o.ContextTimeoutEnabled, o.ReadTimeout, o.WriteTimeout, o.PoolTimeout, o.DialTimeout, o.MaxRetries)
	})

	t.Run("sentinel", func(t *testing.T) {
		opt, err := parseSentinelURL(schemeSentinel, "u:s%40cret@s1:26379,s2,s3:26380/mymaster/2?client_name=tally")
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"s1:26379", "s2:26379", "s3:26380"}
		if strings.Join(opt.SentinelAddrs, " ") != strings.Join(want, " ") || opt.MasterName != "mymaster" || opt.DB != 2 ||
			opt.SentinelPassword != "s@cret" || opt.Password != "s@cret" || opt.Username != "u" || opt.ClientName != "tally" || opt.TLSConfig != nil {
			t.Fatalf("sentinel options %+v", opt)
		}
		c, topo, err := newClient("redis-sentinel://s1:26379,s2:26379/mymaster?read_timeout=9s", lim)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		o := c.(*redis.Client).Options()
		if topo != TopologySentinel {
			t.Fatalf("topology %s", topo)
		}
		bounded(t, o.ContextTimeoutEnabled, o.ReadTimeout, o.WriteTimeout, o.PoolTimeout, o.DialTimeout, o.MaxRetries)
		if tls, err := parseSentinelURL(schemeSentinelTLS, "s1:1/m"); err != nil || tls.TLSConfig == nil || tls.TLSConfig.ServerName != "s1" {
			t.Fatalf("rediss-sentinel: %+v %v", tls, err)
		}
	})

	t.Run("cluster", func(t *testing.T) {
		c, topo, err := newClient("redis-cluster://u:p@n1:7000,n2:7001,n3?read_timeout=9s", lim)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		o := c.(*redis.ClusterClient).Options()
		if topo != TopologyCluster || strings.Join(o.Addrs, " ") != "n1:7000 n2:7001 n3:6379" || o.Username != "u" || o.Password != "p" ||
			o.MaxRedirects != clusterRedirectsMax {
			t.Fatalf("topology %s options %+v", topo, o)
		}
		bounded(t, o.ContextTimeoutEnabled, o.ReadTimeout, o.WriteTimeout, o.PoolTimeout, o.DialTimeout, o.MaxRetries)
	})

	for _, bad := range []string{
		"redis-sentinel://s1:26379",               // no master
		"redis-sentinel://s1:26379/m/0/x",         // too much path
		"redis-sentinel://s1,,s2/m",               // empty host
		"redis-sentinel://s1/m?master_name=other", // ambiguous
		"redis-cluster://n1:7000/2",               // a Cluster has no db
		"redis-cluster://n1:7000?addr=n2:7001",    // ambiguous
		"redis-sentinel://s1/m?no_such_option=1",  // unknown go-redis option
		"s1:26379",                                // no scheme
		"http://example.com",                      // not Redis
	} {
		if c, _, err := newClient(bad, lim); err == nil {
			c.Close()
			t.Errorf("%s: accepted", bad)
		}
	}
}

func TestRedactURL(t *testing.T) {
	if got := redact("redis-sentinel://u:secret@h1,h2/m"); strings.Contains(got, "secret") {
		t.Fatalf("redact: %s", got)
	}
}
