package ratelimit

import (
	"testing"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
)

func TestAllow_TokenBucketPerScopeAndSource(t *testing.T) {
	l := New()
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	p := &l7.RateLimit{RequestsPerSecond: 10, Burst: 10}
	ok := 0
	for i := 0; i < 25; i++ {
		if a, _ := l.Allow(p, "r1", "a"); a {
			ok++
		}
	}
	if ok != 10 {
		t.Fatalf("allowed %d of 25 at once, want the burst of 10", ok)
	}
	a, wait := l.Allow(p, "r1", "b")
	if a || wait <= 0 || wait > 100*time.Millisecond {
		t.Errorf("shared bucket: allowed=%v wait=%v, want refused with ~100ms", a, wait)
	}
	if a, _ := l.Allow(p, "r2", "a"); !a {
		t.Error("another route has its own bucket")
	}
	now = now.Add(time.Second)
	ok = 0
	for i := 0; i < 25; i++ {
		if a, _ := l.Allow(p, "r1", "a"); a {
			ok++
		}
	}
	if ok != 10 {
		t.Errorf("after 1s allowed %d, want 10", ok)
	}
	per := &l7.RateLimit{RequestsPerSecond: 1, PerSourceIdentity: true}
	if a, _ := l.Allow(per, "r3", "a"); !a {
		t.Error("first of a")
	}
	if a, _ := l.Allow(per, "r3", "a"); a {
		t.Error("second of a within the second must be refused (burst 1)")
	}
	if a, _ := l.Allow(per, "r3", "b"); !a {
		t.Error("b has its own bucket")
	}
	if a, _ := l.Allow(nil, "x", "y"); !a {
		t.Error("no policy allows")
	}
	if RetryAfter(50*time.Millisecond) != "1" || RetryAfter(2500*time.Millisecond) != "3" {
		t.Error("RetryAfter rounding")
	}
}

func TestAllow_BoundedMemory(t *testing.T) {
	l := New()
	p := &l7.RateLimit{RequestsPerSecond: 1000, PerSourceIdentity: true}
	for i := 0; i < 3*maxBuckets; i++ {
		l.Allow(p, "r", itoa(i))
	}
	if n := len(l.buckets); n > maxBuckets+1 {
		t.Errorf("%d buckets, want at most %d", n, maxBuckets+1)
	}
}

func TestAllow_BoundedMemorySlowBuckets(t *testing.T) {
	l := New()
	p := &l7.RateLimit{RequestsPerSecond: 0.001, PerSourceIdentity: true}
	for i := 0; i < 3*maxBuckets; i++ {
		l.Allow(p, "r", itoa(i))
	}
	if n := len(l.buckets); n > maxBuckets {
		t.Errorf("%d buckets, want at most %d", n, maxBuckets)
	}
}
