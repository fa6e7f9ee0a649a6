package circuit

import (
	"context"
	"errors"
	"sync"

	"github.com/meshlite/meshlite/proto/l7"
)

// ErrOpen is returned when a limit is hit.
var ErrOpen = errors.New("circuit open: upstream limits reached")

// OverloadHeader is set on the 503 a waypoint answers when a breaker is open.
const (
	OverloadHeader = "x-meshlite-overload"
	OverloadValue  = "circuit-open"
)

// Breaker limits in-flight requests to one destination.
type Breaker struct {
	slots      chan struct{}
	maxPending int

	mu      sync.Mutex
	pending int
}

// Breakers holds one Breaker per destination and limits; safe for
// concurrent use. A changed policy gets a fresh breaker (requests in flight
// on the old one finish there).
type Breakers struct {
	mu sync.Mutex
	m  map[breakerKey]*Breaker
}

type breakerKey struct {
	dest                 string
	maxConns, maxPending uint32
}

// NewBreakers returns an empty set.
func NewBreakers() *Breakers { return &Breakers{m: map[breakerKey]*Breaker{}} }

// For returns the breaker of dest under p, or nil when p sets no limit.
func (bs *Breakers) For(dest string, p *l7.CircuitBreaker) *Breaker {
	if p.GetMaxConnections() == 0 {
		return nil
	}
	k := breakerKey{dest, p.GetMaxConnections(), p.GetMaxPendingRequests()}
	bs.mu.Lock()
	defer bs.mu.Unlock()
	b := bs.m[k]
	if b == nil {
		for old := range bs.m {
			if old.dest == dest {
				delete(bs.m, old)
			}
		}
		b = &Breaker{slots: make(chan struct{}, k.maxConns), maxPending: int(k.maxPending)}
		bs.m[k] = b
	}
	return b
}

// Acquire takes a slot, waiting in the pending queue if there is room
// there; it returns ErrOpen when both are full, or ctx's error. A nil
// Breaker always admits. Call release exactly once.
func (b *Breaker) Acquire(ctx context.Context) (release func(), err error) {
	if b == nil {
		return func() {}, nil
	}
	rel := func() { <-b.slots }
	select {
	case b.slots <- struct{}{}:
		return rel, nil
	default:
	}
	b.mu.Lock()
	if b.pending >= b.maxPending {
		b.mu.Unlock()
		return nil, ErrOpen
	}
	b.pending++
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.pending--
		b.mu.Unlock()
	}()
	select {
	case b.slots <- struct{}{}:
		return rel, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// InFlight reports the slots in use.
func (b *Breaker) InFlight() int {
	if b == nil {
		return 0
	}
	return len(b.slots)
}
