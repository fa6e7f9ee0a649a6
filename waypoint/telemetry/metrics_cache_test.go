package telemetry

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The series cache must keep label sets apart and count every request,
// also past its size bound.
func TestMetrics_CachedSeriesCountEachLabelSetApart(t *testing.T) {
	m, err := NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ok := Labels{DestServiceName: "echo", ResponseCode: 200, Protocol: "http"}
	fail := ok
	fail.ResponseCode, fail.ResponseFlags = 503, "UF"
	for range 3 {
		m.Request(&ok, time.Millisecond, 1, 1)
	}
	m.Request(&fail, time.Millisecond, 1, 1)
	if v := testutil.ToFloat64(m.requests.WithLabelValues(ok.values()...)); v != 3 {
		t.Errorf("200s counted %v, want 3", v)
	}
	if v := testutil.ToFloat64(m.requests.WithLabelValues(fail.values()...)); v != 1 {
		t.Errorf("503s counted %v, want 1", v)
	}
	m.cached.Store(maxCachedSeries) // full: new label sets go uncached
	other := ok
	other.DestWorkload = "late"
	m.Request(&other, time.Millisecond, 1, 1)
	m.Request(&other, time.Millisecond, 1, 1)
	if v := testutil.ToFloat64(m.requests.WithLabelValues(other.values()...)); v != 2 {
		t.Errorf("uncached label set counted %v, want 2", v)
	}
	if _, cached := m.series.Load(other); cached {
		t.Error("a full cache grew")
	}
}

// values lists l's label values in requestLabelNames order.
func (l *Labels) values() []string {
	pl := l.request()
	out := make([]string, len(requestLabelNames))
	for i, n := range requestLabelNames {
		out[i] = pl[n]
	}
	return out
}
