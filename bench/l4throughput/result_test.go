package l4throughput

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestResult_RatiosToNoMeshAndBestPeerGoals(t *testing.T) {
	rows := []*row{
		{name: "no mesh (pod to pod)", samples: [2][]float64{{10, 9, 11}, {20, 20, 20}}},
		{name: "ztunnel HBONE/h2", mesh: true, samples: [2][]float64{{5, 5, 5}, {8, 8, 8}}, ztunnelCPU: [2]float64{1.5, 1.9}},
		{name: "ghostunnel v1.8.4 pair", samples: [2][]float64{{3, 3, 3}, {7, 7, 7}}},
		{name: "stunnel4 5.68 pair", samples: [2][]float64{{4, 4, 4}, {5, 5, 5}}},
		{name: "ztunnel HBONE/QUIC", mesh: true, samples: [2][]float64{{2, 2, 2}, {3, 3, 3}}},
	}
	res := result(Options{Duration: time.Second, Rounds: 3, Log: slog.Default()}, rows, nil)
	if got := res.Rows[1][2]; got != "0.50" {
		t.Errorf("h2 1-stream x no mesh = %s, want 0.50 (5 / median 10)", got)
	}
	if v := res.Values["ztunnel HBONE/h2"]["ratio_best_peer_1"]; v != 1.25 {
		t.Errorf("h2 / best peer (1 stream) = %v, want 5/4 = 1.25 (stunnel4 is best there)", v)
	}
	if v := res.Values["ztunnel HBONE/h2"]["ratio_best_peer_8"]; v != 8.0/7 {
		t.Errorf("h2 / best peer (8 streams) = %v, want 8/7 (ghostunnel is best there)", v)
	}
	notes := strings.Join(res.Notes, "\n")
	for _, want := range []string{
		"ztunnel h2 / best peer (stunnel4 5.68 pair) (1 stream) at least 1.25x: 1.25x, met",
		"ztunnel h2 / best peer (ghostunnel v1.8.4 pair) (8 streams) at least 1.25x: 1.14x, missed",
		"ztunnel h2 / no mesh (8 streams) at least 0.35x: 0.4x, met",
		"ztunnel QUIC / h2 (1 stream) at least 0.5x: 0.4x, missed",
	} {
		if !strings.Contains(notes, want) {
			t.Errorf("notes lack %q:\n%s", want, notes)
		}
	}
	if len(res.Charts) != 1 || len(res.Charts[0].Groups) != len(rows) {
		t.Fatalf("charts: %+v", res.Charts)
	}
}

func TestResult_FailedQUICRowIsNotAvailableNotZero(t *testing.T) {
	rows := []*row{
		{name: "no mesh (pod to pod)", samples: [2][]float64{{10}, {20}}},
		{name: "ztunnel HBONE/h2", mesh: true, samples: [2][]float64{{5}, {8}}},
		{name: "haproxy 2.6.12 TCP+mTLS pair", samples: [2][]float64{{3}, {7}}},
		{name: "ztunnel HBONE/QUIC", mesh: true, err: errors.New("wait for 2 running pods: not true after 2m0s")},
	}
	res := result(Options{Duration: time.Second, Rounds: 1}, rows, nil)
	last := res.Rows[3]
	if last[1] != "n/a" || !strings.HasPrefix(last[len(last)-1], "not available: wait for 2 running pods") {
		t.Errorf("QUIC row %q", last)
	}
	if _, ok := res.Values["ztunnel HBONE/QUIC"]; ok {
		t.Error("figures recorded for a row that did not run")
	}
	if notes := strings.Join(res.Notes, "\n"); !strings.Contains(notes, "ztunnel QUIC / h2 (1 stream) at least 0.5x: not measured") {
		t.Errorf("notes: %s", notes)
	}
}
