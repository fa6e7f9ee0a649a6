package telemetry

import (
	"crypto/rand"
	"time"

	"github.com/meshlite/meshlite/internal/hbone"
)

// TraceHeader is the W3C Trace Context request header.
const TraceHeader = "traceparent"

// Span is the waypoint's span of one request: it continues the caller's
// trace (same trace id, the caller's span as parent) or starts a new one.
type Span struct {
	// Context is this span; sent upstream as traceparent.
	Context hbone.TraceParent
	// Parent is the caller's span (zero for a new trace).
	Parent hbone.TraceParent
	Name   string
	Start  time.Time
	End    time.Time
	Attrs  map[string]string
	Status int
}

// StartSpan parses the incoming traceparent (invalid or absent: a new
// trace) and returns a span with a fresh span id. A new trace is sampled.
func StartSpan(name, incoming string, now time.Time) *Span {
	s := &Span{Name: name, Start: now}
	if p, err := hbone.ParseTraceParent(incoming); err == nil {
		s.Parent = p
		s.Context = hbone.TraceParent{TraceID: p.TraceID, Flags: p.Flags}
	} else {
		_, _ = rand.Read(s.Context.TraceID[:])
		s.Context.Flags = 1
	}
	for s.Context.ParentID == [8]byte{} {
		_, _ = rand.Read(s.Context.ParentID[:])
	}
	return s
}

// Sampled reports the W3C sampled flag.
func (s *Span) Sampled() bool { return s.Context.Flags&1 == 1 }

// Exporter receives finished sampled spans (e.g. an OTLP exporter).
type Exporter interface {
	Export(s *Span)
}
