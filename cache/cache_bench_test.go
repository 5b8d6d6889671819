package cache

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"
)

// Micro-benchmarks of the balance read path: the value codec and a cached
// Get (hit) against the shared Redis. They measure; they assert nothing
// about speed. Run them short, the machine is shared:
//
//	go test -run '^$' -bench 'Get|Codec' -benchmem -count 5 ./cache

func benchBalance() Balance {
	return Balance{
		AccountID: uuid.Must(uuid.NewV7()), Currency: "USD", Balance: 123_456_789, CreditLimit: 50_000,
		Available: 123_506_789, Version: 98_765, AsOf: time.Now(), Held: 1_000,
		ServeUntil: time.Now().Add(time.Minute),
	}
}

func BenchmarkCodecEncode(b *testing.B) {
	v := benchBalance()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := encode(v); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkCodecDecode(b *testing.B) {
	s, err := encode(benchBalance())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := decode(s); err != nil {
			b.Fatal(err)
		}
	}
}

// benchCache is a cache on the shared Redis holding one fresh entry, with
// the probe off so that only the benchmarked calls reach Redis.
func benchCache(b *testing.B) (*Cache, uuid.UUID) {
	b.Helper()
	requireSharedRedis(b)
	c, _ := newCache(b, sharedRedisURL(), Config{
		ProbeInterval: -1, TTL: time.Hour,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	v := benchBalance()
	c.Put(context.Background(), v)
	if _, ok := c.Get(context.Background(), v.AccountID); !ok {
		b.Fatalf("no hit after Put; status %+v", c.Status())
	}
	return c, v.AccountID
}

// BenchmarkGetHit is one cached read at a time: mostly a Redis round trip.
func BenchmarkGetHit(b *testing.B) {
	c, id := benchCache(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := c.Get(ctx, id); !ok {
			b.Fatal("miss")
		}
	}
}

// BenchmarkGetHitParallel is many concurrent cached reads, as a busy tallyd
// does them: it shows contention (the breaker's mutex) on top of the round
// trip.
func BenchmarkGetHitParallel(b *testing.B) {
	c, id := benchCache(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			if _, ok := c.Get(ctx, id); !ok {
				b.Errorf("miss: stats %+v status %+v", c.Stats(), c.Status())
				return
			}
		}
	})
}
