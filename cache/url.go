package cache

import (
	"crypto/tls"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Topology names, as reported by Cache.Topology and in tallyd's log.
const (
	TopologySingle   = "single"
	TopologySentinel = "sentinel"
	TopologyCluster  = "cluster"
)

// URL schemes of Config.URL. Besides these, redis://, rediss:// and
// unix:// name a single node, parsed by go-redis's ParseURL.
const (
	schemeSentinel    = "redis-sentinel"
	schemeSentinelTLS = "rediss-sentinel"
	schemeCluster     = "redis-cluster"
	schemeClusterTLS  = "rediss-cluster"
)

// clientLimits are the settings that bound the cost of a sick Redis. They
// override whatever a URL says (see New).
type clientLimits struct {
	opTimeout   time.Duration
	dialTimeout time.Duration
}

// newClient returns a go-redis client for a cache URL and its topology:
//
//	redis://[user:pass@]host:port[/db][?opts]       one node (also rediss://, unix://)
//	redis-sentinel://[user:pass@]h1:p1,h2:p2,.../MASTER[/db][?opts]
//	                                                a Sentinel group: the Sentinels' addresses and
//	                                                the monitored master's name (rediss-sentinel:// for TLS)
//	redis-cluster://[user:pass@]h1:p1,h2:p2,...[?opts]
//	                                                a Redis Cluster: any of its nodes (rediss-cluster:// for TLS)
//
// The user and password apply to the data nodes and, for Sentinel, to the
// Sentinels too. opts are go-redis's URL options (client_name, pool_size,
// route_randomly, ...); the timeouts and retries are always the cache's own.
func newClient(rawURL string, lim clientLimits) (redis.UniversalClient, string, error) {
	scheme, rest, ok := strings.Cut(rawURL, "://")
	if !ok {
		return nil, "", fmt.Errorf("cache: bad redis URL %q: no scheme", redact(rawURL))
	}
	switch scheme {
	case schemeSentinel, schemeSentinelTLS:
		opt, err := parseSentinelURL(scheme, rest)
		if err != nil {
			return nil, "", err
		}
		opt.ContextTimeoutEnabled = true
		opt.ReadTimeout, opt.WriteTimeout = lim.opTimeout, lim.opTimeout
		opt.MaxRetries = -1
		opt.DialTimeout = lim.dialTimeout
		opt.DialerRetries = 1
		opt.PoolTimeout = lim.opTimeout
		return redis.NewFailoverClient(opt), TopologySentinel, nil
	case schemeCluster, schemeClusterTLS:
		opt, err := parseClusterURL(scheme, rest)
		if err != nil {
			return nil, "", err
		}
		opt.ContextTimeoutEnabled = true
		opt.ReadTimeout, opt.WriteTimeout = lim.opTimeout, lim.opTimeout
		opt.MaxRetries = -1
		opt.DialTimeout = lim.dialTimeout
		opt.DialerRetries = 1
		opt.PoolTimeout = lim.opTimeout
		// One MOVED/ASK redirect is normal during resharding or after a
		// failover; a loop of them is not, and each costs a round trip.
		opt.MaxRedirects = clusterRedirectsMax
		return redis.NewClusterClient(opt), TopologyCluster, nil
	default:
		opt, err := redis.ParseURL(rawURL)
		if err != nil {
			return nil, "", fmt.Errorf("cache: bad redis URL: %w", err)
		}
		opt.ContextTimeoutEnabled = true
		opt.ReadTimeout, opt.WriteTimeout = lim.opTimeout, lim.opTimeout
		opt.MaxRetries = -1 // -1 disables retries in go-redis v9 (0 means 3)
		opt.DialTimeout = lim.dialTimeout
		opt.DialerRetries = 1
		opt.PoolTimeout = lim.opTimeout
		return redis.NewClient(opt), TopologySingle, nil
	}
}

// clusterRedirectsMax bounds MOVED/ASK redirects per Cluster command.
const clusterRedirectsMax = 2

// splitHosts parses "user:pass@h1:p1,h2:p2" into its user info and hosts.
func splitHosts(scheme, authority string, defaultPort int) (*url.Userinfo, []string, error) {
	var ui *url.Userinfo
	if i := strings.LastIndex(authority, "@"); i >= 0 {
		u, err := url.Parse("x://" + authority[:i+1] + "h")
		if err != nil {
			return nil, nil, fmt.Errorf("cache: bad %s:// user info: %w", scheme, err)
		}
		ui, authority = u.User, authority[i+1:]
	}
	var hosts []string
	for _, h := range strings.Split(authority, ",") {
		h = strings.TrimSpace(h)
		if h == "" {
			return nil, nil, fmt.Errorf("cache: %s:// URL has an empty host", scheme)
		}
		if !strings.Contains(h, ":") || strings.HasSuffix(h, "]") {
			h += ":" + strconv.Itoa(defaultPort)
		}
		hosts = append(hosts, h)
	}
	return ui, hosts, nil
}

// parseSentinelURL parses the part after "redis-sentinel://". It rebuilds
// the URL in go-redis's own failover form (redis://h1?addr=h2&master_name=M)
// so every go-redis option keeps working.
func parseSentinelURL(scheme, rest string) (*redis.FailoverOptions, error) {
	authority, pathQuery, _ := strings.Cut(rest, "/")
	path, query, _ := strings.Cut(pathQuery, "?")
	ui, hosts, err := splitHosts(scheme, authority, 26379)
	if err != nil {
		return nil, err
	}
	parts := strings.Split(strings.Trim(path, "/"), "/")
	if parts[0] == "" || len(parts) > 2 {
		return nil, fmt.Errorf("cache: %s:// URL must name the master: %s://host:port,.../MASTER[/db]", scheme, scheme)
	}
	q, err := url.ParseQuery(query)
	if err != nil {
		return nil, fmt.Errorf("cache: bad %s:// query: %w", scheme, err)
	}
	if q.Has("master_name") || q.Has("addr") {
		return nil, fmt.Errorf("cache: %s:// URL: give the master in the path and the Sentinels in the host list, not as master_name/addr", scheme)
	}
	q.Set("master_name", parts[0])
	for _, h := range hosts[1:] {
		q.Add("addr", h)
	}
	u := url.URL{Scheme: "redis", User: ui, Host: hosts[0], RawQuery: q.Encode()}
	if len(parts) == 2 {
		u.Path = "/" + parts[1]
	}
	opt, err := redis.ParseFailoverURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("cache: bad %s:// URL: %w", scheme, err)
	}
	// go-redis takes the URL's user info for the Sentinels; the data nodes
	// normally share it.
	opt.Username, opt.Password = opt.SentinelUsername, opt.SentinelPassword
	if scheme == schemeSentinelTLS {
		host, _, _ := strings.Cut(hosts[0], ":")
		opt.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	return opt, nil
}

// parseClusterURL parses the part after "redis-cluster://".
func parseClusterURL(scheme, rest string) (*redis.ClusterOptions, error) {
	authority, query, _ := strings.Cut(rest, "?")
	if strings.Trim(strings.TrimPrefix(authority, strings.Split(authority, "/")[0]), "/") != "" {
		return nil, fmt.Errorf("cache: %s:// URL takes no path (a Cluster has only database 0)", scheme)
	}
	authority = strings.Split(authority, "/")[0]
	ui, hosts, err := splitHosts(scheme, authority, 6379)
	if err != nil {
		return nil, err
	}
	q, err := url.ParseQuery(query)
	if err != nil {
		return nil, fmt.Errorf("cache: bad %s:// query: %w", scheme, err)
	}
	if q.Has("addr") {
		return nil, fmt.Errorf("cache: %s:// URL: list the nodes in the host part, not as addr", scheme)
	}
	for _, h := range hosts[1:] {
		q.Add("addr", h)
	}
	s := "redis"
	if scheme == schemeClusterTLS {
		s = "rediss"
	}
	u := url.URL{Scheme: s, User: ui, Host: hosts[0], RawQuery: q.Encode()}
	opt, err := redis.ParseClusterURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("cache: bad %s:// URL: %w", scheme, err)
	}
	return opt, nil
}

// redact hides a URL's password in error messages.
func redact(raw string) string {
	if i := strings.Index(raw, "@"); i >= 0 {
		if j := strings.Index(raw, "://"); j >= 0 && j < i {
			return raw[:j+3] + "***" + raw[i:]
		}
	}
	return raw
}
