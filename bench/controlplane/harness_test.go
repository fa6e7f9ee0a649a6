package controlplane

import (
	"testing"
	"time"
)

func TestMeasurement_PercentileIsNearestRank(t *testing.T) {
	var m Measurement
	for i := 1; i <= 100; i++ {
		m.Latencies = append(m.Latencies, time.Duration(i)*time.Millisecond)
	}
	for _, tc := range []struct {
		p    float64
		want time.Duration
	}{{50, 50 * time.Millisecond}, {99, 99 * time.Millisecond}, {100, 100 * time.Millisecond}, {0.1, time.Millisecond}} {
		if got := m.Percentile(tc.p); got != tc.want {
			t.Errorf("p%v of 1..100 ms = %v, want %v", tc.p, got, tc.want)
		}
	}
	// Few samples: p99 is the largest, never past the end.
	m.Latencies = []time.Duration{1, 2, 3}
	if got := m.Percentile(99); got != 3 {
		t.Errorf("p99 of 3 samples = %v, want the largest", got)
	}
	if got := (Measurement{}).Percentile(99); got != 0 {
		t.Errorf("p99 of nothing = %v, want 0", got)
	}
}
