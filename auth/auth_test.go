package auth

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

func TestKeyRoundTripAndShape(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 200; i++ {
		k, err := NewKey()
		if err != nil {
			t.Fatal(err)
		}
		s := k.String()
		if !strings.HasPrefix(s, "tly_") || len(s) != keyTotalLength || seen[k.ID] {
			t.Fatalf("bad key %q", s)
		}
		seen[k.ID] = true
		got, err := ParseKey(s)
		if err != nil || got != k {
			t.Fatalf("ParseKey(%q) = %+v, %v", s, got, err)
		}
	}
	for _, bad := range []string{"", "tly_", "tly_abcdefghijkl_", "xyz_abcdefghijkl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
		"tly_ABCDEFGHIJKL_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "tly_abcdefghijk1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
		"tly_abcdefghijkl-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "tly_abcdefghijkl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"tly_abcdefghijkl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB"} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}

// FuzzParseKey: any string either parses into a key that prints back to
// exactly that string, or is rejected; never a panic.
func FuzzParseKey(f *testing.F) {
	k, _ := NewKey()
	f.Add(k.String())
	f.Add("tly_abcdefghijkl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
	f.Add("Bearer tly_")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParseKey(s)
		if err != nil {
			return
		}
		if k.String() != s || !ValidKeyID(k.ID) || len(HashSecret(k.Secret)) != 32 {
			t.Fatalf("ParseKey(%q) = %+v", s, k)
		}
	})
}

func TestParseRole(t *testing.T) {
	for _, r := range Roles {
		if got, err := ParseRole(string(r)); err != nil || got != r {
			t.Fatal(r, err)
		}
	}
	if _, err := ParseRole("root"); err == nil {
		t.Fatal("unknown role accepted")
	}
}

type fakeStore struct {
	mu      sync.Mutex
	keys    map[string]store.APIKey
	fail    bool
	lookups atomic.Int64
	touched map[string]time.Time
}

func (f *fakeStore) GetAPIKey(ctx context.Context, id string) (store.APIKey, error) {
	f.lookups.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return store.APIKey{}, store.ErrUnavailable
	}
	k, ok := f.keys[id]
	if !ok {
		return store.APIKey{}, store.ErrNotFound
	}
	return k, nil
}

func (f *fakeStore) TouchAPIKeys(ctx context.Context, used map[string]time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return store.ErrUnavailable
	}
	for id, at := range used {
		f.touched[id] = at
	}
	return nil
}

func (f *fakeStore) add(role Role) Key {
	k, _ := NewKey()
	f.mu.Lock()
	f.keys[k.ID] = store.APIKey{ID: k.ID, ClientID: uuid.New(), Role: string(role), SecretHash: HashSecret(k.Secret)}
	f.mu.Unlock()
	return k
}

func (f *fakeStore) revoke(id string) {
	f.mu.Lock()
	k := f.keys[id]
	now := time.Now()
	k.RevokedAt = &now
	f.keys[id] = k
	f.mu.Unlock()
}

func TestVerifierCachesAndBoundsRevocation(t *testing.T) {
	fs := &fakeStore{keys: map[string]store.APIKey{}, touched: map[string]time.Time{}}
	v := NewVerifier(VerifierConfig{Store: fs, CacheTTL: time.Minute, TouchInterval: time.Hour})
	defer v.Close()
	clock := time.Now()
	var clockMu sync.Mutex
	v.now = func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return clock }
	advance := func(d time.Duration) { clockMu.Lock(); clock = clock.Add(d); clockMu.Unlock() }
	ctx := context.Background()

	k := fs.add(RoleCharger)
	p, err := v.Verify(ctx, k.String())
	if err != nil || p.Role != RoleCharger || p.KeyID != k.ID {
		t.Fatalf("Verify: %+v %v", p, err)
	}
	for i := 0; i < 100; i++ {
		if _, err := v.Verify(ctx, k.String()); err != nil {
			t.Fatal(err)
		}
	}
	if n := fs.lookups.Load(); n != 1 {
		t.Fatalf("%d look-ups for one cached key, want 1", n)
	}
	// A wrong secret for a cached key is refused without a look-up.
	other, _ := NewKey()
	if _, err := v.Verify(ctx, KeyPrefix+k.ID+"_"+other.Secret); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("wrong secret: %v", err)
	}
	// Revocation is seen once the TTL has passed, not before.
	fs.revoke(k.ID)
	advance(59 * time.Second)
	if _, err := v.Verify(ctx, k.String()); err != nil {
		t.Fatalf("within TTL: %v", err)
	}
	advance(2 * time.Second)
	if _, err := v.Verify(ctx, k.String()); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("after TTL: %v", err)
	}
	// Unknown keys are remembered briefly (at most NegativeTTLMax).
	u, _ := NewKey()
	before := fs.lookups.Load()
	for i := 0; i < 10; i++ {
		if _, err := v.Verify(ctx, u.String()); !errors.Is(err, ErrUnauthenticated) {
			t.Fatal(err)
		}
	}
	if n := fs.lookups.Load() - before; n != 1 {
		t.Fatalf("%d look-ups for a repeated unknown key, want 1", n)
	}
	fs.mu.Lock()
	fs.keys[u.ID] = store.APIKey{ID: u.ID, ClientID: uuid.New(), Role: "viewer", SecretHash: HashSecret(u.Secret)}
	fs.mu.Unlock()
	advance(NegativeTTLMax)
	if _, err := v.Verify(ctx, u.String()); err != nil {
		t.Fatalf("key created after a negative look-up: %v", err)
	}
	// Malformed keys never reach the store.
	before = fs.lookups.Load()
	if _, err := v.Verify(ctx, "tly_nope"); !errors.Is(err, ErrUnauthenticated) {
		t.Fatal(err)
	}
	if fs.lookups.Load() != before {
		t.Fatal("malformed key looked up")
	}
	// The store failing is ErrUnavailable, not ErrUnauthenticated.
	fs.mu.Lock()
	fs.fail = true
	fs.mu.Unlock()
	n, _ := NewKey()
	if _, err := v.Verify(ctx, n.String()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("store down: %v", err)
	}
	// Key use is flushed in a batch; a failed flush is kept for the next.
	v.Flush(ctx)
	fs.mu.Lock()
	fs.fail = false
	fs.mu.Unlock()
	v.Flush(ctx)
	fs.mu.Lock()
	_, ok := fs.touched[k.ID]
	fs.mu.Unlock()
	if !ok {
		t.Fatal("key use not recorded after a failed flush")
	}
}

func TestVerifierCoalescesConcurrentLookups(t *testing.T) {
	fs := &fakeStore{keys: map[string]store.APIKey{}, touched: map[string]time.Time{}}
	v := NewVerifier(VerifierConfig{Store: fs, CacheTTL: time.Minute})
	defer v.Close()
	k := fs.add(RoleViewer)
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := v.Verify(context.Background(), k.String()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := fs.lookups.Load(); n > 2 {
		t.Fatalf("%d look-ups for 50 concurrent calls of one key", n)
	}
}

func TestLimiterIsPerKeyAndEvictsIdleBuckets(t *testing.T) {
	if NewLimiter(0, 10) != nil {
		t.Fatal("rate 0 must mean no limiter")
	}
	var none *Limiter
	if !none.Allow("x") {
		t.Fatal("nil limiter must allow")
	}
	l := NewLimiter(1, 2)
	first, second, third := l.Allow("a"), l.Allow("a"), l.Allow("a")
	if !first || !second || third {
		t.Fatalf("burst of 2 not enforced: allowed %v, %v, %v", first, second, third)
	}
	if !l.Allow("b") {
		t.Fatal("limit leaked across keys")
	}
	l.mu.Lock()
	for _, b := range l.buckets {
		b.last = b.last.Add(-time.Hour)
	}
	l.lastSweep = time.Now().Add(-time.Hour)
	l.mu.Unlock()
	l.Allow("c")
	if n := l.Len(); n != 1 {
		t.Fatalf("%d buckets after idle eviction, want 1", n)
	}
}

func TestCertPrincipalIsStable(t *testing.T) {
	a, b := CertPrincipal("ops", RoleAdmin), CertPrincipal("ops", RoleAdmin)
	if a != b || a.KeyID != "tls:CN=ops" || a.ClientID == CertPrincipal("ops2", RoleAdmin).ClientID {
		t.Fatalf("%+v %+v", a, b)
	}
}

// gatedStore reads a key's row, then waits for the gate: a look-up that
// read the row before a revocation and answers after it.
type gatedStore struct {
	*fakeStore
	gate    chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (g *gatedStore) GetAPIKey(ctx context.Context, id string) (store.APIKey, error) {
	k, err := g.fakeStore.GetAPIKey(ctx, id)
	first := false
	g.once.Do(func() { first = true })
	if first {
		close(g.entered)
		<-g.gate
	}
	return k, err
}

// A call that begins after the TTL never takes the answer of a look-up that
// started (and read the row) before: it looks again.
func TestVerifierDoesNotJoinAStaleLookup(t *testing.T) {
	fs := &fakeStore{keys: map[string]store.APIKey{}, touched: map[string]time.Time{}}
	gs := &gatedStore{fakeStore: fs, gate: make(chan struct{}), entered: make(chan struct{})}
	v := NewVerifier(VerifierConfig{Store: gs, CacheTTL: time.Second, TouchInterval: time.Hour})
	defer v.Close()
	clock := time.Now()
	var clockMu sync.Mutex
	v.now = func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return clock }
	k := fs.add(RoleCharger)
	first := make(chan error, 1)
	go func() { _, err := v.Verify(context.Background(), k.String()); first <- err }()
	<-gs.entered // the first look-up has read the row (not revoked) and waits
	fs.revoke(k.ID)
	clockMu.Lock()
	clock = clock.Add(2 * time.Second)
	clockMu.Unlock()
	second := make(chan error, 1)
	go func() { _, err := v.Verify(context.Background(), k.String()); second <- err }()
	time.Sleep(50 * time.Millisecond) // let the second call join the in-flight look-up
	close(gs.gate)
	if err := <-first; err != nil {
		t.Fatalf("first call (began before the revocation): %v", err)
	}
	if err := <-second; !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("second call (began a TTL after): %v, want ErrUnauthenticated", err)
	}
}
