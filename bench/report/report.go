// Package report holds the shape every benchmark scenario reports in and
// writes bench/RESULTS.md and bench/results.json. A run of one scenario
// replaces that scenario's section and keeps the others.
package report

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/meshlite/meshlite/bench/plot"
)

// Scenario is one named benchmark; Run measures all its rows in one go.
type Scenario struct {
	Name string
	Run  func(ctx context.Context) (Result, error)
}

// Result is one scenario's table, with how and where it was measured.
type Result struct {
	Scenario    string     `json:"scenario"`
	Description string     `json:"description"`
	Date        time.Time  `json:"date"`
	Command     string     `json:"command"`
	Argv        string     `json:"argv"`
	Machine     Machine    `json:"machine"`
	Columns     []string   `json:"columns"`
	Rows        [][]string `json:"rows"`
	// Values are the raw figures by row name and metric, for machines to read.
	Values map[string]map[string]float64 `json:"values"`
	Notes  []string                      `json:"notes,omitempty"`
	// Charts are drawn by Write as <dir>/<scenario>[-<n>].png and linked
	// from the scenario's section.
	Charts []plot.Bars `json:"charts,omitempty"`
}

// Set records a raw figure; NaN and Inf (a row that did not run) are left
// out, as JSON cannot carry them.
func (r *Result) Set(row, metric string, v float64) {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return
	}
	if r.Values == nil {
		r.Values = map[string]map[string]float64{}
	}
	if r.Values[row] == nil {
		r.Values[row] = map[string]float64{}
	}
	r.Values[row][metric] = v
}

// ChartFile is the file name of the scenario's i-th chart.
func (r Result) ChartFile(i int) string {
	if i == 0 {
		return r.Scenario + ".png"
	}
	return fmt.Sprintf("%s-%d.png", r.Scenario, i+1)
}

// Machine describes where a result was measured.
type Machine struct {
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Memory string `json:"memory"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
	// LoadAvg is /proc/loadavg's 1-minute figure when the scenario started:
	// other work on the machine's cores moves absolute numbers.
	LoadAvg string `json:"load_avg,omitempty"`
}

// Markdown renders the result as a section of RESULTS.md.
func (r Result) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## %s\n\n%s\n\n", r.Scenario, r.Description)
	how := "`" + r.Command + "`"
	if r.Argv != "" && r.Argv != r.Command {
		how += " (`" + r.Argv + "`)"
	}
	fmt.Fprintf(&b, "Measured %s with %s on %s (%d cores, %s), Linux %s, %s.\n\n",
		r.Date.UTC().Format("2006-01-02 15:04 MST"), how, r.Machine.CPU, r.Machine.Cores,
		r.Machine.Memory, r.Machine.Kernel, r.Machine.Go)
	if r.Machine.LoadAvg != "" {
		fmt.Fprintf(&b, "1-minute load average when it started: %s. Every row shares the machine's %d cores with the rest of the machine's work, so absolute figures move with other load; the ratios between rows of one run are what to compare.\n\n", r.Machine.LoadAvg, r.Machine.Cores)
	}
	b.WriteString("| " + strings.Join(r.Columns, " | ") + " |\n")
	b.WriteString("|" + strings.Repeat("---|", len(r.Columns)) + "\n")
	for _, row := range r.Rows {
		b.WriteString("| " + strings.Join(row, " | ") + " |\n")
	}
	for _, n := range r.Notes {
		b.WriteString("\n" + n + "\n")
	}
	for i, c := range r.Charts {
		fmt.Fprintf(&b, "\n![%s](%s)\n", c.Title, r.ChartFile(i))
	}
	return b.String()
}

// Describe fills the fields every scenario shares.
func Describe(r *Result) {
	r.Date = time.Now()
	r.Machine = machine()
}

// Write merges results into dir/results.json (replacing scenarios of the same
// name) and regenerates dir/RESULTS.md from all of them.
func Write(dir, command, argv string, results []Result) error {
	all := map[string]Result{}
	path := filepath.Join(dir, "results.json")
	if raw, err := os.ReadFile(path); err == nil {
		var old []Result
		if err := json.Unmarshal(raw, &old); err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
		for _, r := range old {
			all[r.Scenario] = r
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s: %w", path, err)
	}
	for _, r := range results {
		r.Command, r.Argv = command, argv
		all[r.Scenario] = r
	}
	names := make([]string, 0, len(all))
	for n := range all {
		names = append(names, n)
	}
	sort.Strings(names)
	list := make([]Result, 0, len(names))
	var md strings.Builder
	md.WriteString("# Benchmark results\n\nWritten by `make bench` (bench/cmd/bench); each section is one scenario, its rows measured back to back in one run. Ratios compare rows of the same run.\n\n")
	for _, n := range names {
		list = append(list, all[n])
		md.WriteString(all[n].Markdown() + "\n")
		for i, c := range all[n].Charts {
			png, err := c.PNG()
			if err != nil {
				return fmt.Errorf("chart of %s: %w", n, err)
			}
			if err := os.WriteFile(filepath.Join(dir, all[n].ChartFile(i)), png, 0o644); err != nil {
				return fmt.Errorf("chart of %s: %w", n, err)
			}
		}
	}
	raw, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(raw, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	mdPath := filepath.Join(dir, "RESULTS.md")
	if err := os.WriteFile(mdPath, []byte(md.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", mdPath, err)
	}
	return nil
}

func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), CPU: "unknown CPU", Memory: "unknown memory"}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			var kb int
			if _, err := fmt.Sscanf(s.Text(), "MemTotal: %d kB", &kb); err == nil {
				m.Memory = fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
				break
			}
		}
		f.Close()
	}
	if raw, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(raw))
	}
	if raw, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(raw)); len(f) > 0 {
			m.LoadAvg = f[0]
		}
	}
	return m
}
