package auth

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Defaults of the per-key rate limit. Each has a tallyd flag.
const (
	// RateLimitPerKeyDefault is requests per second per key (0 = no limit):
	// generous, so it only stops a runaway client.
	RateLimitPerKeyDefault = 5000
	// RateBurstPerKeyDefault is the token bucket's size.
	RateBurstPerKeyDefault = 10000
	// limiterEntriesMax bounds the limiter map; idle buckets are evicted.
	limiterEntriesMax = 100_000
)

// Limiter is a token bucket per key id (golang.org/x/time/rate). Buckets
// that have been idle long enough to refill completely are dropped, since a
// fresh bucket behaves the same, so the map stays bounded by the keys active
// within the refill time.
type Limiter struct {
	limit rate.Limit
	burst int
	idle  time.Duration

	mu        sync.Mutex
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

// NewLimiter returns a limiter of perSecond requests with burst; nil when
// perSecond <= 0 (no limit).
func NewLimiter(perSecond float64, burst int) *Limiter {
	if perSecond <= 0 {
		return nil
	}
	if burst <= 0 {
		burst = max(1, int(perSecond))
	}
	refill := time.Duration(float64(burst) / perSecond * float64(time.Second))
	return &Limiter{limit: rate.Limit(perSecond), burst: burst, idle: max(refill, time.Second),
		buckets: map[string]*bucket{}, lastSweep: time.Now()}
}

// Allow takes one token from id's bucket. A nil limiter allows everything.
func (l *Limiter) Allow(id string) bool {
	if l == nil {
		return true
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.buckets) >= limiterEntriesMax || now.Sub(l.lastSweep) > time.Minute {
		l.sweep(now)
	}
	b, ok := l.buckets[id]
	if !ok {
		b = &bucket{lim: rate.NewLimiter(l.limit, l.burst)}
		l.buckets[id] = b
	}
	b.last = now
	return b.lim.AllowN(now, 1)
}

func (l *Limiter) sweep(now time.Time) {
	l.lastSweep = now
	for id, b := range l.buckets {
		if now.Sub(b.last) >= l.idle {
			delete(l.buckets, id)
		}
	}
}

// Len is the number of buckets held (for tests).
func (l *Limiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}
