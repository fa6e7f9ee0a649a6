package report

import (
	"encoding/json"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshlite/meshlite/bench/plot"
)

func TestGoal_Verdicts(t *testing.T) {
	for _, tc := range []struct {
		g    Goal
		want string
	}{
		{Goal{What: "h2 / no mesh", Value: 0.36, Bound: 0.35, Unit: "x"}, "met"},
		{Goal{What: "h2 / no mesh", Value: 0.35, Bound: 0.35, Unit: "x"}, "met"},
		{Goal{What: "h2 / no mesh", Value: 0.34, Bound: 0.35, Unit: "x"}, "missed"},
		{Goal{What: "added p99", Value: 0.19, Bound: 0.2, AtMost: true, Unit: " ms"}, "met"},
		{Goal{What: "added p99", Value: 0.2, Bound: 0.2, AtMost: true, Unit: " ms"}, "missed"},
		{Goal{What: "waypoint / nginx", Value: math.NaN(), Bound: 1}, "not measured"},
		{Goal{What: "waypoint / nginx", Bound: 1, Missing: "no waypoint"}, "not measured"},
	} {
		if got := tc.g.Verdict(); got != tc.want {
			t.Errorf("%s: verdict %q, want %q", tc.g, got, tc.want)
		}
		if !strings.Contains(tc.g.String(), tc.want) {
			t.Errorf("line %q does not say %q", tc.g.String(), tc.want)
		}
	}
	if s := (Goal{What: "w", Bound: 1, Missing: "bin/waypoint missing"}).String(); !strings.Contains(s, "bin/waypoint missing") {
		t.Errorf("%q does not say why it was not measured", s)
	}
}

func TestRatio_MissingSideIsNaN(t *testing.T) {
	if r := Ratio(3, 4); r != 0.75 {
		t.Errorf("3/4 = %v", r)
	}
	for _, p := range [][2]float64{{0, 1}, {1, 0}, {math.NaN(), 1}, {1, -2}, {math.Inf(1), 1}} {
		if r := Ratio(p[0], p[1]); !math.IsNaN(r) {
			t.Errorf("Ratio(%v, %v) = %v, want NaN", p[0], p[1], r)
		}
	}
	if Fmt(math.NaN(), 2) != "n/a" || Fmt(1.234, 2) != "1.23" {
		t.Error("Fmt")
	}
}

func TestWrite_MergesScenariosAndDrawsLinkedCharts(t *testing.T) {
	dir := t.TempDir()
	old := Result{Scenario: "a-old", Columns: []string{"x"}, Rows: [][]string{{"1"}}}
	if err := Write(dir, "make bench", "bench", []Result{old}); err != nil {
		t.Fatal(err)
	}
	r := Result{Scenario: "l4-throughput", Columns: []string{"row", "Gbit/s"}, Rows: [][]string{{"no mesh", "9"}},
		Charts: []plot.Bars{{Title: "throughput", YLabel: "Gbit/s", Groups: []string{"no mesh", "h2"},
			Series: []plot.Series{{Name: "1 stream", Values: []float64{9, math.NaN()}}}}}}
	r.Set("no mesh", "gbps", 9)
	r.Set("h2", "gbps", math.NaN()) // must not break JSON
	if err := Write(dir, "make bench SCENARIO=l4-throughput", "bench -scenario l4-throughput", []Result{r}); err != nil {
		t.Fatal(err)
	}
	md, _ := os.ReadFile(filepath.Join(dir, "RESULTS.md"))
	for _, want := range []string{"## a-old", "## l4-throughput", "![throughput](l4-throughput.png)"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("RESULTS.md lacks %q", want)
		}
	}
	f, err := os.Open(filepath.Join(dir, "l4-throughput.png"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := png.Decode(f); err != nil {
		t.Fatalf("chart is not a PNG: %v", err)
	}
	var list []Result
	raw, _ := os.ReadFile(filepath.Join(dir, "results.json"))
	if err := json.Unmarshal(raw, &list); err != nil || len(list) != 2 {
		t.Fatalf("results.json: %d results, %v", len(list), err)
	}
	if _, ok := list[1].Values["h2"]; ok {
		t.Error("a NaN figure was stored")
	}
}
