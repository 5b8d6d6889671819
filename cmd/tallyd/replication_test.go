package main

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallyledger/tally/store"
)

func TestReplicationVerdict(t *testing.T) {
	for _, c := range []struct {
		commit, names string
		safe          bool
	}{
		{"on", "*", true},
		{"remote_apply", "FIRST 1 (s1, s2)", true},
		{"on", "", false},
		{"remote_write", "s1", false},
		{"local", "s1", false},
		{"off", "s1", false},
	} {
		safe, why := replicationVerdict(c.commit, c.names)
		if safe != c.safe || (safe != (why == "")) {
			t.Errorf("synchronous_commit=%s names=%q: safe=%v why=%q, want safe=%v", c.commit, c.names, safe, why, c.safe)
		}
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// The shared test server has no standby: tallyd warns, and with
// --require-synchronous-commit refuses to start.
func TestServeRequireSynchronousCommit(t *testing.T) {
	url := newDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := store.Open(ctx, store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var logs syncBuf
	if err := checkReplication(ctx, st, false, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
		t.Fatalf("without the flag: %v", err)
	}
	if !strings.Contains(logs.String(), "synchronous_standby_names is empty") || !strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("no warning logged: %s", logs.String())
	}

	c := baseConfig(url)
	c.requireSyncCommit = true
	c.insecureNoAuth = true
	err = serve(ctx, c, quietLog(), func(string, string) { t.Error("served despite --require-synchronous-commit") })
	if err == nil || !strings.Contains(err.Error(), "--require-synchronous-commit") || !strings.Contains(err.Error(), "synchronous_standby_names") {
		t.Fatalf("serve with --require-synchronous-commit: %v", err)
	}
}
