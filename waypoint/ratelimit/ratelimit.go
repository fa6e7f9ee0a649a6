// Package ratelimit owns the waypoint's local rate limits: token buckets
// (golang.org/x/time/rate) keyed by route rule and, when asked, by source
// identity. It answers "allowed, or retry after d"; the caller writes the 429.
package ratelimit

import (
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/meshlite/meshlite/proto/l7"
)

// maxBuckets bounds memory under many source identities; past it, full
// (idle) buckets are dropped, which loses nothing: a full bucket is what a
// new one starts as.
const maxBuckets = 10000

// Limiter holds the buckets. Safe for concurrent use.
type Limiter struct {
	mu      sync.Mutex
	buckets map[key]*bucket
	now     func() time.Time
}

type key struct {
	scope  string
	source string
	rps    float64
	burst  int
}

type bucket struct {
	lim  *rate.Limiter
	used time.Time
}

// New returns an empty limiter.
func New() *Limiter {
	return &Limiter{buckets: map[key]*bucket{}, now: time.Now}
}

// Burst is the bucket size a policy gets.
func Burst(p *l7.RateLimit) int {
	if b := p.GetBurst(); b > 0 {
		return int(b)
	}
	return max(1, int(math.Ceil(p.GetRequestsPerSecond())))
}

// Allow takes a token for scope (a route rule id) and source (the source
// principal; used only when the policy is per source identity). With no
// policy or a non-positive rate it allows. Otherwise it reports how long to
// wait before a token is available when it refuses.
func (l *Limiter) Allow(p *l7.RateLimit, scope, source string) (bool, time.Duration) {
	rps := p.GetRequestsPerSecond()
	if p == nil || rps <= 0 || math.IsNaN(rps) || math.IsInf(rps, 0) {
		return true, 0
	}
	k := key{scope: scope, rps: rps, burst: Burst(p)}
	if p.GetPerSourceIdentity() {
		k.source = source
	}
	now := l.now()
	l.mu.Lock()
	b := l.buckets[k]
	if b == nil {
		if len(l.buckets) >= maxBuckets {
			l.sweepLocked(now)
		}
		b = &bucket{lim: rate.NewLimiter(rate.Limit(rps), k.burst)}
		l.buckets[k] = b
	}
	b.used = now
	l.mu.Unlock()
	r := b.lim.ReserveN(now, 1)
	if !r.OK() {
		return false, time.Second
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

func (l *Limiter) sweepLocked(now time.Time) {
	for k, b := range l.buckets {
		if b.lim.TokensAt(now) >= float64(k.burst) || now.Sub(b.used) > time.Minute {
			delete(l.buckets, k)
		}
	}
	// Still full: forget arbitrary buckets (each restarts full, a bounded
	// leniency) rather than grow without bound.
	for k := range l.buckets {
		if len(l.buckets) < maxBuckets*9/10 {
			break
		}
		delete(l.buckets, k)
	}
}

// RetryAfter formats d for the retry-after header: whole seconds, at least 1.
func RetryAfter(d time.Duration) string {
	s := int(math.Ceil(d.Seconds()))
	if s < 1 {
		s = 1
	}
	return itoa(s)
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for n > 0 {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
	}
	return string(b[i:])
}
