package cache

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

const (
	// ProbeIntervalDefault is how often each tallyd writes its own probe
	// key. A tallyd that writes nothing else still notices a Redis that
	// stopped taking writes (and so may hold values another tallyd could
	// not update) within about this plus OpTimeout, and stops serving
	// cached balances.
	ProbeIntervalDefault = 250 * time.Millisecond
	// probeKeyTTLMin keeps probe keys from piling up: each expires soon
	// after its tallyd stops writing it.
	probeKeyTTLMin = 2 * time.Second
	// pendingDeleteBatch bounds the entries one probe deletes after missed
	// updates, so one probe stays one short round trip.
	pendingDeleteBatch = 500
	// reasonBytesMax bounds the error text kept for Status.
	reasonBytesMax = 200
)

// probeLoop writes the probe key every interval until Close.
func (c *Cache) probeLoop(interval time.Duration) {
	defer close(c.probeDone)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
			c.probe()
		}
	}
}

// probe deletes entries that missed updates (when Redis takes writes) and
// then writes this process's probe key. The write is what reopens the gate
// and, after the breaker's cooldown, closes the breaker: a read would not
// show that Redis can be kept up to date.
func (c *Cache) probe() {
	ctx := context.Background()
	start := time.Now()
	err := c.do(ctx, func(ctx context.Context) error {
		return c.client.Set(ctx, c.probeKey, start.UnixNano(), c.probeKeyTTL).Err()
	})
	c.afterWrite(nil, start, err)
	if err == nil {
		c.deletePending(ctx)
	}
}

// deletePending deletes one batch of entries whose updates were missed, in
// a pipeline of single-key DELs (a multi-key DEL fails across Cluster
// slots).
func (c *Cache) deletePending(ctx context.Context) {
	ids := c.gate.pendingIDs(pendingDeleteBatch)
	if len(ids) == 0 {
		return
	}
	start := time.Now()
	err := c.do(ctx, func(ctx context.Context) error {
		_, err := c.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, id := range ids {
				p.Del(ctx, c.key(id))
			}
			return nil
		})
		return err
	})
	if err == nil && c.gate.deleted(ids, start) {
		c.log.Info("redis cache serving again: entries that missed updates deleted")
	}
}

// reasonSkipped is why a write did not reach Redis when the breaker
// stopped it.
const reasonSkipped = "a write was skipped while the breaker is open"

// afterWrite feeds the outcome of a write (Put, Delete or probe) begun at
// start to the gate; id is the account written (nil for the probe key).
func (c *Cache) afterWrite(id *uuid.UUID, start time.Time, err error) {
	if err == nil || errors.Is(err, redis.Nil) {
		if c.gate.wrote(id, start) {
			c.log.Info("redis cache serving again: a write succeeded")
		}
		return
	}
	reason := writeFailure(err)
	if c.gate.missed(id, start, reason) {
		c.log.Warn("redis cache not serving cached balances", "reason", reason, "account", idString(id))
	}
}

// writeFailure says why a write did not reach Redis, for Status and logs.
// Redis error text names no credentials; it is bounded all the same.
func writeFailure(err error) string {
	switch {
	case errors.Is(err, gobreaker.ErrOpenState), errors.Is(err, gobreaker.ErrTooManyRequests):
		return reasonSkipped
	case errors.Is(err, errCallerGone):
		return "a write was abandoned by its caller"
	}
	s := err.Error()
	if len(s) > reasonBytesMax {
		s = s[:reasonBytesMax] + "..."
	}
	return "last write failed: " + strings.TrimSpace(s)
}

func idString(id *uuid.UUID) string {
	if id == nil {
		return "probe"
	}
	return id.String()
}
