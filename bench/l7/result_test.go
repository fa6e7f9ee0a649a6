package l7

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/meshlite/meshlite/bench/measure"
)

func TestResult_WaypointNotAvailableSaysWhyAndIsNotJudged(t *testing.T) {
	proxy := func() ([]int, error) { return nil, nil }
	rows := []*Row{
		{Name: "no mesh (nginx backend direct)", Wrk: measure.Wrk{RequestsPerSec: 20000}, Fixed: measure.Fortio{P50: time.Millisecond, P99: 2 * time.Millisecond}},
		{Name: "nginx 1.22.1 reverse proxy", proxy: proxy, Wrk: measure.Wrk{RequestsPerSec: 10000}, CPU: 0.8, PeakRSS: 12e6, Fixed: measure.Fortio{P99: 3 * time.Millisecond}},
		{Name: "haproxy 2.6.12 HTTP proxy", proxy: proxy, Wrk: measure.Wrk{RequestsPerSec: 8000}, Fixed: measure.Fortio{P99: 4 * time.Millisecond}},
		{Name: "meshlite waypoint (HBONE in and out)", Err: errors.New("no Running waypoint pod for Gateway bench-mesh/waypoint")},
	}
	res := result(Options{WrkDuration: time.Second, LoadDuration: time.Second}, rows)
	if got := res.Rows[1][2] + " " + res.Rows[2][3]; got != "0.50 0.80" {
		t.Errorf("ratios %q, want nginx 0.50 x no mesh and haproxy 0.80 x nginx", got)
	}
	if got := res.Rows[3][1]; !strings.HasPrefix(got, "not available: no Running waypoint pod") {
		t.Errorf("waypoint row %q", got)
	}
	if n := strings.Join(res.Notes, "\n"); !strings.Contains(n, "waypoint / nginx max req/s at least 1x: not measured (no Running waypoint pod") {
		t.Errorf("goal note: %s", n)
	}
	if _, ok := res.Values["meshlite waypoint (HBONE in and out)"]; ok {
		t.Error("figures for the waypoint that did not run")
	}
	if res.Values["nginx 1.22.1 reverse proxy"]["proxy_peak_rss_mb"] != 12 {
		t.Errorf("values %v", res.Values)
	}
}

func TestResult_WaypointGoalAgainstNginx(t *testing.T) {
	rows := []*Row{
		{Name: "no mesh", Wrk: measure.Wrk{RequestsPerSec: 20000}},
		{Name: "nginx", Wrk: measure.Wrk{RequestsPerSec: 10000}},
		{Name: "haproxy", Wrk: measure.Wrk{RequestsPerSec: 9000}},
		{Name: "meshlite waypoint (HBONE in and out)", Wrk: measure.Wrk{RequestsPerSec: 6000}},
	}
	res := result(Options{}, rows)
	if n := strings.Join(res.Notes, "\n"); !strings.Contains(n, "waypoint / nginx max req/s at least 1x: 0.6x, missed") {
		t.Errorf("goal note: %s", n)
	}
}
