// Package profile fetches CPU profiles from the running ztunnels (their
// admin port's /debug/pprof/profile) while a benchmark row runs, keeps
// them as files, and summarises where the time goes with `go tool pprof
// -top` for RESULTS.md.
package profile

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/meshlite/meshlite/bench/meshenv"
)

// Summary is one profile: where it is and its top functions.
type Summary struct {
	Label string // "node-0 ztunnel, l4-throughput-h2"
	File  string
	// Top are `go tool pprof -top` lines (flat, flat%, sum%, cum, cum%,
	// function); Err says why there are none.
	Top []string
	Err error
}

// Capture is a profile being taken on every node.
type Capture struct {
	wg  sync.WaitGroup
	out []Summary
}

// Start fetches a CPU profile of about d (at least 1 s, a second less than
// d so it ends inside the run) from the ztunnel of each node into dir,
// named after name.
func Start(ctx context.Context, e *meshenv.Env, dir, name string, d time.Duration) *Capture {
	c := &Capture{out: make([]Summary, e.SB.Plan.Nodes)}
	secs := max(1, int(math.Floor(d.Seconds()))-1)
	for i := range e.SB.Plan.Nodes {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			s := &c.out[i]
			s.Label = fmt.Sprintf("%s ztunnel, %s", e.SB.NodeName(i), name)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				s.Err = err
				return
			}
			s.File = filepath.Join(dir, fmt.Sprintf("%s-%s-ztunnel.pprof", name, e.SB.NodeName(i)))
			pctx, cancel := context.WithTimeout(ctx, time.Duration(secs+30)*time.Second)
			defer cancel()
			b, err := e.AdminGet(pctx, i, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs))
			if err == nil {
				err = os.WriteFile(s.File, b, 0o644)
			}
			if err != nil {
				s.Err = err
				return
			}
			s.Top, s.Err = top(ctx, filepath.Join(e.Repo, "bin", "ztunnel"), s.File, 12)
		}()
	}
	return c
}

// Wait returns the summaries once every fetch ended.
func (c *Capture) Wait() []Summary {
	c.wg.Wait()
	return c.out
}

func top(ctx context.Context, bin, file string, n int) ([]string, error) {
	out, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", fmt.Sprintf("-nodecount=%d", n), bin, file).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("go tool pprof: %w: %s", err, firstLine(string(out)))
	}
	lines := TopLines(string(out))
	if len(lines) == 0 {
		return nil, fmt.Errorf("go tool pprof -top printed no functions: %s", firstLine(string(out)))
	}
	return lines, nil
}

// TopLines picks the table rows out of `go tool pprof -top` output: the
// lines after the "flat  flat%" header.
func TopLines(out string) []string {
	var lines []string
	in := false
	s := bufio.NewScanner(strings.NewReader(out))
	for s.Scan() {
		l := strings.TrimSpace(s.Text())
		if strings.HasPrefix(l, "flat") && strings.Contains(l, "flat%") {
			in = true
			continue
		}
		if in && l != "" && strings.Contains(l, "%") {
			lines = append(lines, strings.Join(strings.Fields(l), " "))
		}
	}
	return lines
}

// firstLine is the first line of a tool's output, for error messages.
func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

// Markdown is a RESULTS.md note with each profile's top functions.
func Markdown(title string, ss []Summary) string {
	var b strings.Builder
	b.WriteString(title + ":\n")
	for _, s := range ss {
		if s.Err != nil {
			fmt.Fprintf(&b, "\n%s: no profile (%v)\n", s.Label, s.Err)
			continue
		}
		fmt.Fprintf(&b, "\n%s (`go tool pprof -top bin/ztunnel %s`):\n\n```\nflat flat%% sum%% cum cum%% function\n", s.Label, s.File)
		for _, l := range s.Top {
			b.WriteString(l + "\n")
		}
		b.WriteString("```\n")
	}
	return b.String()
}
