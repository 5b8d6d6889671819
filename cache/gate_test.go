package cache

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// The write gate's state machine on its own: one missed write closes it,
// only a later successful write reopens it, and not while an account's
// missed update is still in Redis.
func TestWriteGateStates(t *testing.T) {
	g := newWriteGate()
	if !g.open() {
		t.Fatal("new gate closed")
	}
	t0 := time.Now()
	before := t0.Add(-time.Millisecond)
	id := uuid.New()
	if !g.missed(&id, t0, "last write failed: READONLY") || g.open() {
		t.Fatal("a missed write did not close the gate")
	}
	if g.wrote(nil, before) || g.open() {
		t.Fatal("a write begun before the failure reopened the gate")
	}
	after := t0.Add(time.Millisecond)
	if g.wrote(nil, after) || g.open() {
		t.Fatal("reopened while the account's missed update is still in Redis")
	}
	if r, n := g.state(); !strings.Contains(r, "READONLY") || n != 1 {
		t.Fatalf("state %q %d, want READONLY and 1 pending", r, n)
	}
	g.missed(nil, after, reasonSkipped)
	if r, _ := g.state(); !strings.Contains(r, "READONLY") {
		t.Fatalf("a skipped write replaced the reason: %q", r)
	}
	later := after.Add(time.Millisecond)
	if ids := g.pendingIDs(10); len(ids) != 1 || ids[0] != id {
		t.Fatalf("pending %v, want [%s]", ids, id)
	}
	if !g.deleted([]uuid.UUID{id}, later) || !g.open() {
		t.Fatal("deleting the missed entry after a successful write did not reopen the gate")
	}
	if !g.refuses(before) || g.refuses(later) {
		t.Fatal("floor: want entries stamped before the first missed write refused, later ones served")
	}

	// A successful write of the account itself repairs its entry.
	t1 := time.Now()
	g.missed(&id, t1, "last write failed: i/o timeout")
	if !g.wrote(&id, t1.Add(time.Millisecond)) || !g.open() {
		t.Fatal("writing the account again did not reopen the gate")
	}
}

// One failed Put stops cached reads at once, with the breaker still closed
// (5 failures to open it); reads do not undo that; a successful write of
// the account makes the cache serve again, its new value.
func TestOneFailedWriteStopsServing(t *testing.T) {
	r := startPrivateRedis(t)
	c, _ := newCache(t, r.url(), Config{OpTimeout: time.Second, FailuresMax: 5, ProbeInterval: -1})
	ctx := context.Background()
	id, other := uuid.New(), uuid.New()
	c.Put(ctx, bal(id, 1, 100))
	c.Put(ctx, bal(other, 1, 5))
	mustHit(t, c, id, 1, 100)

	admin := r.client()
	if err := admin.Do(ctx, "REPLICAOF", "127.0.0.1", itoa(freePort(t))).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "REPLICAOF", "NO", "ONE") })
	c.Put(ctx, bal(id, 2, 70))
	for i := 0; i < 20; i++ {
		mustMiss(t, c, id)
		mustMiss(t, c, other)
	}
	st, s := c.Status(), c.Stats()
	if !strings.Contains(st.Detail, "not serving cached balances: last write failed: READONLY") || s.Breaker != "closed" || !s.NotServing {
		t.Fatalf("after one failed Put: status %+v stats %+v, want not serving with READONLY and the breaker closed", st, s)
	}

	if err := admin.Do(ctx, "REPLICAOF", "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
	c.Put(ctx, bal(other, 2, 6))
	mustMiss(t, c, id) // the stale v1 of id is still in Redis
	c.Put(ctx, bal(id, 2, 70))
	mustHit(t, c, id, 2, 70)
	mustHit(t, c, other, 2, 6)
	if st := c.Status(); st.State != StateOK {
		t.Fatalf("status %+v after the missed account was written, want ok", st)
	}
}

// A cache that writes nothing itself notices a read-only Redis through its
// probe within about a second and stops serving what another process may
// no longer be able to update; healed, its probe reopens it, and an entry
// stored before the outage (which may have missed an update) is refused.
func TestProbeNoticesReadOnlyRedis(t *testing.T) {
	r := startPrivateRedis(t)
	prefix := "tallytest:" + uuid.NewString() + ":"
	writer, _ := newCache(t, r.url(), Config{KeyPrefix: prefix, OpTimeout: time.Second, ProbeInterval: -1})
	reader, _ := newCache(t, r.url(), Config{KeyPrefix: prefix, OpTimeout: time.Second, ProbeInterval: 250 * time.Millisecond})
	ctx := context.Background()
	id := uuid.New()
	writer.Put(ctx, bal(id, 1, 100))
	mustHit(t, reader, id, 1, 100)

	admin := r.client()
	if err := admin.Do(ctx, "REPLICAOF", "127.0.0.1", itoa(freePort(t))).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "REPLICAOF", "NO", "ONE") })
	start := time.Now()
	eventually(t, time.Second, "the reader's probe to notice", func() bool { return !reader.gate.open() })
	t.Logf("reader stopped serving %v after Redis turned read-only", time.Since(start))
	mustMiss(t, reader, id)
	if st := reader.Status(); !strings.Contains(st.Detail, "READONLY") {
		t.Fatalf("reader status %+v, want READONLY", st)
	}

	if err := admin.Do(ctx, "REPLICAOF", "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "the reader's probe to reopen", func() bool { return reader.Status().State == StateOK })
	mustMiss(t, reader, id) // stored before the outage: refused and deleted
	if n, _ := admin.Exists(ctx, reader.key(id)).Result(); n != 0 {
		t.Fatal("the refused entry was not deleted")
	}
	writer.Put(ctx, bal(id, 1, 100))
	mustHit(t, reader, id, 1, 100)
}
