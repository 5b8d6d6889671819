package bench

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestSummarize(t *testing.T) {
	ns := make([]int64, 0, 100)
	for i := 100; i >= 1; i-- { // unsorted on purpose
		ns = append(ns, int64(i)*int64(time.Millisecond))
	}
	l := summarize(ns)
	if l.P50 != 50 || l.P95 != 95 || l.P99 != 99 || l.Max != 100 || l.Avg != 50.5 {
		t.Fatalf("summarize = %+v", l)
	}
	if (summarize(nil) != Latency{}) {
		t.Fatal("empty input must give zeros")
	}
}

func TestErrKey(t *testing.T) {
	if got := errKey(status.Error(codes.Unavailable, "x")); got != "Unavailable" {
		t.Fatalf("errKey = %q", got)
	}
	if got := errKey(errors.New("boom")); got != "client:boom" {
		t.Fatalf("errKey = %q", got)
	}
}

func TestConfigFill(t *testing.T) {
	c := Config{Scenario: "charge-hot"}
	if err := c.fill(); err != nil {
		t.Fatal(err)
	}
	if c.Clients != ClientsDefault || c.Accounts != AccountsDefault || c.Seed == "" {
		t.Fatalf("defaults not filled: %+v", c)
	}
	if err := (&Config{Scenario: "nope"}).fill(); err == nil {
		t.Fatal("unknown scenario accepted")
	}
	if err := (&Config{Scenario: "noop", Consistency: "weird"}).fill(); err == nil {
		t.Fatal("bad consistency accepted")
	}
}
