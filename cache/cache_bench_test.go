package cache

import (
	"testing"
	"time"

	"github.com/google/uuid"
)

// Micro-benchmarks of the cache value encoding on the balance read path.
// They measure; they assert nothing about speed.

func benchBalance() Balance {
	return Balance{
		AccountID: uuid.Must(uuid.NewV7()), Currency: "USD", Balance: 123_456_789, CreditLimit: 50_000,
		Available: 123_506_789, Version: 98_765, AsOf: time.Now(),
	}
}

func BenchmarkEncode(b *testing.B) {
	v := benchBalance()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := encode(v); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecode(b *testing.B) {
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
