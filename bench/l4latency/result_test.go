package l4latency

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/meshlite/meshlite/bench/measure"
)

func TestResult_AddedLatencyOverNoMesh(t *testing.T) {
	us := time.Microsecond
	rows := []*row{
		{name: "no mesh (pod to pod)", f: measure.Fortio{P50: 100 * us, P90: 150 * us, P99: 300 * us, ActualQPS: 1000}, connsPerS: 4000},
		{name: "ztunnel HBONE/h2", f: measure.Fortio{P50: 180 * us, P90: 260 * us, P99: 450 * us, ActualQPS: 1000}, connsPerS: 1000},
		{name: "ztunnel HBONE/QUIC", err: errors.New("ztunnel not ready")},
	}
	res := result(Options{Duration: time.Second, ConnDuration: time.Second}, rows, nil)
	h2 := res.Rows[1]
	if h2[4] != "+0.080" || h2[5] != "+0.150" || h2[8] != "0.25" {
		t.Errorf("h2 row %q: want added p50 +0.080, added p99 +0.150, 0.25 x the connection rate", h2)
	}
	n := strings.Join(res.Notes, "\n")
	for _, want := range []string{"added p99 at 1000 qps, ztunnel HBONE/h2 under 0.2 ms: 0.15 ms, met", "ztunnel HBONE/QUIC under 0.2 ms: not measured (ztunnel not ready)"} {
		if !strings.Contains(n, want) {
			t.Errorf("notes lack %q:\n%s", want, n)
		}
	}
}
