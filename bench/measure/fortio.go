package measure

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"
)

// Fortio is the part of a `fortio load -json` result the benchmarks use.
type Fortio struct {
	ActualQPS float64
	Count     int64
	// Errors counts calls that failed (fortio's ErrorsDurationHistogram).
	Errors int64
	// OK counts calls answered as success: "OK" for tcp://, "200" for HTTP.
	OK                 int64
	P50, P90, P99, Max time.Duration
	Avg                time.Duration
}

// ParseFortio reads the JSON fortio load writes with -json. Percentiles
// are the ones asked for with -p; 50, 90 and 99 must be among them.
func ParseFortio(raw []byte) (Fortio, error) {
	var doc struct {
		ActualQPS         float64
		DurationHistogram *struct {
			Count       int64
			Max, Avg    float64
			Percentiles []struct{ Percentile, Value float64 }
		}
		ErrorsDurationHistogram *struct{ Count int64 }
		RetCodes                map[string]int64
		Error                   string
		Message                 string
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return Fortio{}, fmt.Errorf("fortio result: %w", err)
	}
	if doc.Error != "" {
		return Fortio{}, fmt.Errorf("fortio: %s %s", doc.Error, doc.Message)
	}
	h := doc.DurationHistogram
	if h == nil || h.Count == 0 {
		return Fortio{}, errors.New("fortio result has no calls (DurationHistogram empty)")
	}
	r := Fortio{ActualQPS: doc.ActualQPS, Count: h.Count, Max: secs(h.Max), Avg: secs(h.Avg)}
	if doc.ErrorsDurationHistogram != nil {
		r.Errors = doc.ErrorsDurationHistogram.Count
	}
	r.OK = doc.RetCodes["OK"] + doc.RetCodes["200"]
	ps := map[float64]time.Duration{}
	for _, p := range h.Percentiles {
		ps[p.Percentile] = secs(p.Value)
	}
	var missing []float64
	for _, want := range []struct {
		p   float64
		out *time.Duration
	}{{50, &r.P50}, {90, &r.P90}, {99, &r.P99}} {
		v, ok := ps[want.p]
		if !ok {
			missing = append(missing, want.p)
		}
		*want.out = v
	}
	if len(missing) > 0 {
		sort.Float64s(missing)
		return Fortio{}, fmt.Errorf("fortio result lacks percentiles %v (run with -p \"50,90,99\")", missing)
	}
	return r, nil
}

func secs(s float64) time.Duration {
	if s != s || s < 0 || s > 1e6 {
		return 0
	}
	return time.Duration(s * float64(time.Second))
}

// FortioVersion is the fortio release hack/bench-tools.sh installs (the
// testdata is its output).
const FortioVersion = "v1.68.2"
