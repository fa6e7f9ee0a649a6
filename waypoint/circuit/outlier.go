package circuit

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
)

// Defaults of OutlierDetection fields left unset.
const (
	DefaultBaseEjection = 30 * time.Second
	DefaultMaxEjectPct  = 10
	maxEjectionFactor   = 10
)

// Outliers tracks endpoint health per destination. Safe for concurrent use.
type Outliers struct {
	mu  sync.Mutex
	m   map[string]*endpointState // key: dest + "|" + endpoint
	now func() time.Time
	// until is the latest ejectedUntil of any endpoint (unix ns): after
	// it nothing is ejected, and the per-request checks skip the lock.
	until atomic.Int64
}

type endpointState struct {
	consecutive  uint32
	ejections    int
	ejectedUntil time.Time
}

// NewOutliers returns an empty tracker.
func NewOutliers() *Outliers {
	return &Outliers{m: map[string]*endpointState{}, now: time.Now}
}

func skey(dest, ep string) string { return dest + "|" + ep }

// Report records one outcome of a request to endpoint ep of dest (all of
// whose endpoints are listed in all) and reports whether it ejected ep.
// failed is a 5xx answer or a connect failure.
func (o *Outliers) Report(p *l7.OutlierDetection, dest, ep string, all []string, failed bool) bool {
	if p.GetConsecutive_5Xx() == 0 {
		return false
	}
	now := o.now()
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.m[skey(dest, ep)]
	if s == nil {
		s = &endpointState{}
		o.m[skey(dest, ep)] = s
	}
	if !failed {
		s.consecutive = 0
		return false
	}
	s.consecutive++
	if s.consecutive < p.GetConsecutive_5Xx() || now.Before(s.ejectedUntil) {
		return false
	}
	maxPct := p.GetMaxEjectionPercent()
	if maxPct == 0 {
		maxPct = DefaultMaxEjectPct
	}
	ejected := 0
	for _, e := range all {
		if st := o.m[skey(dest, e)]; st != nil && now.Before(st.ejectedUntil) {
			ejected++
		}
	}
	// At least one endpoint may always be ejected when there are several
	// (10% of 2 would otherwise forbid any ejection).
	allowed := max(int(uint32(len(all))*maxPct/100), 1)
	if len(all) <= 1 || ejected >= allowed || ejected+1 >= len(all) && maxPct < 100 {
		return false
	}
	base := DefaultBaseEjection
	if d := p.GetBaseEjectionTime(); d != nil && d.AsDuration() > 0 {
		base = d.AsDuration()
	}
	s.ejections = min(s.ejections+1, maxEjectionFactor)
	s.ejectedUntil = now.Add(base * time.Duration(s.ejections))
	s.consecutive = 0
	if u := s.ejectedUntil.UnixNano(); u > o.until.Load() {
		o.until.Store(u) // under mu: no lost update
	}
	return true
}

// AnyEjected reports whether some endpoint may be ejected now; when false,
// Ejected is false for every endpoint.
func (o *Outliers) AnyEjected() bool {
	return o.now().UnixNano() < o.until.Load()
}

// Ejected reports whether ep of dest is ejected now.
func (o *Outliers) Ejected(dest, ep string) bool {
	now := o.now()
	if now.UnixNano() >= o.until.Load() {
		return false
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.m[skey(dest, ep)]
	return s != nil && now.Before(s.ejectedUntil)
}
