package main_test

import (
	"context"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/localsvc"
)

// A Redis turned read-only: a tallyd that writes nothing notices it through
// its probe (--cache-probe-interval) within about a second, and /healthz
// says why the cache is not serving; healed, it is ok again.
func TestHealthzReadOnlyRedis(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not on PATH")
	}
	r, err := localsvc.StartRedis(ctxT(t), localsvc.RedisOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	grpcAddr, httpAddr := addrs(t)
	p := serve(t, dbURL, grpcAddr, httpAddr, "--redis-url", r.URL(), "--cache-probe-interval", "200ms")
	p.waitReady(30 * time.Second)
	newAccount(t, newClient(t, grpcAddr, adminKey, client.Policy{}), 100)
	cacheIs := func(state string, detail ...string) bool {
		code, h := getHealthz(t, httpAddr)
		c := h.Dependencies["cache"]
		if code != http.StatusOK || c.State != state {
			return false
		}
		for _, d := range detail {
			if !strings.Contains(c.Detail, d) {
				return false
			}
		}
		return true
	}
	waitFor(t, 10*time.Second, "cache ok", func() bool { return cacheIs("ok") })

	admin := redis.NewClient(&redis.Options{Addr: r.Addr(), MaxRetries: -1})
	defer admin.Close()
	port, err := localsvc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.Do(ctxT(t), "REPLICAOF", "127.0.0.1", strconv.Itoa(port)).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "REPLICAOF", "NO", "ONE") })
	start := time.Now()
	waitFor(t, 3*time.Second, "healthz to say the cache is not serving", func() bool {
		return cacheIs("degraded", "not serving cached balances: last write failed: READONLY")
	})
	if el := time.Since(start); el > time.Second {
		t.Fatalf("/healthz showed the read-only Redis %v after it turned read-only, want within 1s", el)
	}
	_, h := getHealthz(t, httpAddr)
	t.Logf("/healthz cache with Redis read-only: %+v", h.Dependencies["cache"])

	if err := admin.Do(ctxT(t), "REPLICAOF", "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "cache ok after REPLICAOF NO ONE", func() bool { return cacheIs("ok") })
}

func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
	}
}
