package cache

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// rttCounter is a go-redis hook counting round trips: every Process (one
// command) and every ProcessPipeline (one batch written and read at once)
// is one round trip to the server.
type rttCounter struct{ trips, cmds atomic.Int64 }

func (h *rttCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *rttCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.trips.Add(1)
		h.cmds.Add(1)
		return next(ctx, cmd)
	}
}

func (h *rttCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.trips.Add(1)
		h.cmds.Add(int64(len(cmds)))
		return next(ctx, cmds)
	}
}

// commandStats returns Redis's calls per command (INFO commandstats), and
// the microseconds Redis spent in them under the key name+"_usec".
func commandStats(t *testing.T, rc *redis.Client) map[string]int64 {
	t.Helper()
	info, err := rc.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		for _, kv := range strings.Split(rest, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				out[strings.TrimPrefix(name, "cmdstat_")] = n
			}
			if v, ok := strings.CutPrefix(kv, "usec="); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				out[strings.TrimPrefix(name, "cmdstat_")+"_usec"] = n
			}
		}
	}
	return out
}

// TestGetHitRoundTrips counts what a cached read (hit) costs in Redis calls:
// round trips seen by the client, and the commands Redis ran (a private
// Redis, so that no one else's commands are counted).
func TestGetHitRoundTrips(t *testing.T) {
	r := startPrivateRedis(t)
	c, _ := newCache(t, r.url(), Config{ProbeInterval: -1})
	ctx := context.Background()
	id := uuid.New()
	c.Put(ctx, bal(id, 1, 10))
	mustHit(t, c, id, 1, 10) // loads any script

	h := &rttCounter{}
	c.Client().AddHook(h)
	admin := r.client()
	before := commandStats(t, admin)
	const n = 1000
	for range n {
		mustHit(t, c, id, 1, 10)
	}
	after := commandStats(t, admin)
	delta := map[string]int64{}
	for k, v := range after {
		if d := v - before[k]; d != 0 && !strings.HasPrefix(k, "info") {
			delta[k] = d
		}
	}
	t.Logf("per Get hit: %.2f round trips, %.2f client commands; Redis commandstats delta over %d Gets: %v",
		float64(h.trips.Load())/n, float64(h.cmds.Load())/n, n, delta)
	if got := h.trips.Load(); got != n {
		t.Errorf("%d round trips for %d Gets, want one each", got, n)
	}
	for _, cmd := range []string{"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "del"} {
		if delta[cmd] != 0 {
			t.Errorf("a Get hit ran %s (%d calls for %d Gets): want plain reads only", cmd, delta[cmd], n)
		}
	}
	if delta["get"] != n || delta["pttl"] != n {
		t.Errorf("want one GET and one PTTL per Get, got %v", delta)
	}
}
