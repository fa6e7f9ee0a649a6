// Package retry owns the waypoint's retry policy (Gateway API HTTPRoute
// retry: attempts, codes, backoff, plus retry on connect failure): whether
// an outcome is retried and how long to wait first. It does no I/O.
package retry

import (
	"math/rand/v2"
	"net/http"
	"slices"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
)

// DefaultBackoff is used when the policy sets none.
const DefaultBackoff = 25 * time.Millisecond

// Policy is a compiled retry policy; the zero value never retries.
type Policy struct {
	Attempts       int
	codes          []uint32
	backoff        time.Duration
	ConnectFailure bool
}

// New compiles p (nil: no retries).
func New(p *l7.Retry) Policy {
	if p == nil || p.GetAttempts() == 0 {
		return Policy{}
	}
	b := DefaultBackoff
	if d := p.GetBackoff(); d != nil && d.AsDuration() > 0 {
		b = d.AsDuration()
	}
	return Policy{Attempts: int(min(p.GetAttempts(), 10)), codes: p.GetCodes(), backoff: b, ConnectFailure: p.GetRetryOnConnectFailure()}
}

// RetryStatus reports whether a response with status is retried after try
// number try (0 is the first try).
func (p Policy) RetryStatus(try, status int) bool {
	return try < p.Attempts && slices.Contains(p.codes, uint32(status))
}

// RetryConnect reports whether a connect failure on try is retried: when
// asked, or when 503 is a retried code (the waypoint would answer a connect
// failure with 503, so a client asking to retry 503s means this too).
func (p Policy) RetryConnect(try int) bool {
	return try < p.Attempts && (p.ConnectFailure || slices.Contains(p.codes, http.StatusServiceUnavailable))
}

// Backoff is the wait before retry number n (1 is the first retry):
// exponential from the base, full jitter over its upper half, capped at ten
// times the base.
func (p Policy) Backoff(n int) time.Duration {
	d := p.backoff
	for i := 1; i < n && d < 10*p.backoff; i++ {
		d *= 2
	}
	d = min(d, 10*p.backoff)
	return d/2 + rand.N(d/2+1)
}
