package circuit

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlite/meshlite/proto/l7"
)

func TestBreaker_OpensAtLimitAndQueuesPending(t *testing.T) {
	bs := NewBreakers()
	b := bs.For("svc", &l7.CircuitBreaker{MaxConnections: 2, MaxPendingRequests: 1})
	ctx := context.Background()
	r1, err1 := b.Acquire(ctx)
	r2, err2 := b.Acquire(ctx)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	got := make(chan error, 1)
	go func() {
		r, err := b.Acquire(ctx)
		if err == nil {
			r()
		}
		got <- err
	}()
	// Wait until the third request is pending, then a fourth is refused.
	deadline := time.Now().Add(2 * time.Second)
	for {
		b.mu.Lock()
		p := b.pending
		b.mu.Unlock()
		if p == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := b.Acquire(ctx); !errors.Is(err, ErrOpen) {
		t.Fatalf("fourth request: %v, want ErrOpen", err)
	}
	r1()
	if err := <-got; err != nil {
		t.Fatalf("pending request: %v", err)
	}
	r2()
	if b.InFlight() != 0 {
		t.Errorf("in flight %d after releases", b.InFlight())
	}
	if bs.For("svc", &l7.CircuitBreaker{}) != nil {
		t.Error("no limit must mean no breaker")
	}
	if bs.For("svc", &l7.CircuitBreaker{MaxConnections: 5}) == b {
		t.Error("changed limits must give a new breaker")
	}
	var nilB *Breaker
	if _, err := nilB.Acquire(ctx); err != nil {
		t.Error("nil breaker admits")
	}
}

func TestOutliers_EjectAfterConsecutiveFailuresForGrowingTime(t *testing.T) {
	o := NewOutliers()
	now := time.Unix(0, 0)
	o.now = func() time.Time { return now }
	p := &l7.OutlierDetection{Consecutive_5Xx: 3, BaseEjectionTime: durationpb.New(10 * time.Second), MaxEjectionPercent: 50}
	all := []string{"a", "b", "c", "d"}
	o.Report(p, "s", "a", all, true)
	o.Report(p, "s", "a", all, true)
	o.Report(p, "s", "a", all, false) // success resets
	o.Report(p, "s", "a", all, true)
	o.Report(p, "s", "a", all, true)
	if o.Ejected("s", "a") || o.AnyEjected() {
		t.Fatal("ejected before 3 in a row")
	}
	if !o.Report(p, "s", "a", all, true) || !o.Ejected("s", "a") || !o.AnyEjected() {
		t.Fatal("not ejected after 3 in a row")
	}
	now = now.Add(11 * time.Second)
	if o.Ejected("s", "a") || o.AnyEjected() {
		t.Fatal("still ejected after the base time")
	}
	for i := 0; i < 3; i++ {
		o.Report(p, "s", "a", all, true)
	}
	now = now.Add(11 * time.Second)
	if !o.Ejected("s", "a") {
		t.Error("second ejection must last twice the base time")
	}
	// 50% of 4: b may join a, c may not.
	for _, ep := range []string{"b", "c"} {
		for i := 0; i < 3; i++ {
			o.Report(p, "s", ep, all, true)
		}
	}
	if !o.Ejected("s", "b") || o.Ejected("s", "c") {
		t.Errorf("max ejection percent: b=%v c=%v, want b ejected, c not", o.Ejected("s", "b"), o.Ejected("s", "c"))
	}
	// A lone endpoint is never ejected.
	for i := 0; i < 5; i++ {
		o.Report(p, "solo", "x", []string{"x"}, true)
	}
	if o.Ejected("solo", "x") {
		t.Error("the only endpoint was ejected")
	}
}
