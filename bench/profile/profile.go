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
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshlite/meshlite/bench/meshenv"
)

// Summary is one profile: where it is and its top functions.
type Summary struct {
	Label string // "node-0 ztunnel, l4-throughput-h2"
	File  string
	Bin   string
	// Top are `go tool pprof -top` lines (flat, flat%, sum%, cum, cum%,
	// function); Err says why there are none.
	Top []string
	// Shares is the flat CPU time by kind of work (see Categorise).
	Shares []Share
	Err    error
}

// Capture is a profile being taken on every node.
type Capture struct {
	wg  sync.WaitGroup
	out []Summary
}

// Target is a Go process serving net/http/pprof on an admin address
// inside a network namespace.
type Target struct {
	Label string // "node-0 ztunnel"
	Netns string
	// Admin is the admin address there ("127.0.0.1:15000").
	Admin string
	// Bin is the binary, for pprof's symbols.
	Bin string
}

// Ztunnels are the ztunnel of every node (admin port 15000 in the node's
// namespace).
func Ztunnels(e *meshenv.Env) []Target {
	var ts []Target
	for i := range e.SB.Plan.Nodes {
		ts = append(ts, Target{Label: e.SB.NodeName(i) + " ztunnel", Netns: e.NodeNetns(i), Admin: "127.0.0.1:15000", Bin: filepath.Join(e.Repo, "bin", "ztunnel")})
	}
	return ts
}

// Start fetches a CPU profile of about d from the ztunnel of each node;
// see StartTargets.
func Start(ctx context.Context, e *meshenv.Env, dir, name string, d time.Duration) *Capture {
	return StartTargets(ctx, Ztunnels(e), dir, name, d)
}

// StartTargets fetches a CPU profile of about d (at least 1 s, a second
// less than d so it ends inside the run) from each target
// (/debug/pprof/profile on its admin address) into dir, named after name.
func StartTargets(ctx context.Context, targets []Target, dir, name string, d time.Duration) *Capture {
	c := &Capture{out: make([]Summary, len(targets))}
	secs := max(1, int(math.Floor(d.Seconds()))-1)
	for i, t := range targets {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			s := &c.out[i]
			s.Label = t.Label + ", " + name
			if err := os.MkdirAll(dir, 0o755); err != nil {
				s.Err = err
				return
			}
			s.File = filepath.Join(dir, name+"-"+strings.ReplaceAll(t.Label, " ", "-")+".pprof")
			s.Bin = t.Bin
			pctx, cancel := context.WithTimeout(ctx, time.Duration(secs+30)*time.Second)
			defer cancel()
			b, err := meshenv.GetIn(pctx, t.Netns, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", t.Admin, secs))
			if err == nil {
				err = os.WriteFile(s.File, b, 0o644)
			}
			if err != nil {
				s.Err = err
				return
			}
			var all []string
			all, s.Err = top(ctx, t.Bin, s.File, 500)
			s.Top, s.Shares = all[:min(12, len(all))], Categorise(all)
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
		fmt.Fprintf(&b, "\n%s: %s. Top functions (`go tool pprof -top %s %s`):\n\n```\nflat flat%% sum%% cum cum%% function\n", s.Label, SharesText(s.Shares), binName(s.Bin), s.File)
		for _, l := range s.Top {
			b.WriteString(l + "\n")
		}
		b.WriteString("```\n")
	}
	return b.String()
}

// Share is the part of the sampled CPU time spent on one kind of work.
type Share struct {
	Kind    string
	Percent float64
}

// kinds map function-name prefixes to the kind of work, first match wins.
var kinds = []struct{ kind, prefixes string }{
	{"syscalls (socket reads and writes)", "internal/runtime/syscall syscall. golang.org/x/sys/unix. runtime/internal/syscall"},
	{"TLS/QUIC crypto (AES-GCM, ChaCha)", "crypto/ vendor/golang.org/x/crypto golang.org/x/crypto"},
	{"memory copies", "runtime.memmove runtime.memclr"},
	{"HTTP/2 and QUIC framing", "golang.org/x/net/http2 github.com/quic-go net/http."},
	{"meshlite's own code", "github.com/meshlite/"},
	{"Go runtime (scheduler, GC, allocation)", "runtime. internal/runtime"},
}

// Categorise sums the flat% of `go tool pprof -top` lines by kind of work,
// largest first; what matches no kind is "other".
func Categorise(lines []string) []Share {
	sum := map[string]float64{}
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) < 6 {
			continue
		}
		pct, err := strconv.ParseFloat(strings.TrimSuffix(f[1], "%"), 64)
		if err != nil || pct <= 0 {
			continue
		}
		fn := strings.Join(f[5:], " ")
		kind := "other"
		for _, k := range kinds {
			for _, p := range strings.Fields(k.prefixes) {
				if strings.HasPrefix(fn, p) {
					kind = k.kind
					break
				}
			}
			if kind != "other" {
				break
			}
		}
		sum[kind] += pct
	}
	out := make([]Share, 0, len(sum))
	for k, v := range sum {
		out = append(out, Share{k, v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Percent > out[j].Percent })
	return out
}

// SharesText is the shares as one line: "syscalls 65%, crypto 18%, ...".
func SharesText(ss []Share) string {
	if len(ss) == 0 {
		return "no samples"
	}
	parts := make([]string, len(ss))
	for i, s := range ss {
		parts[i] = fmt.Sprintf("%s %.0f%%", s.Kind, s.Percent)
	}
	return strings.Join(parts, ", ")
}

// binName is the binary as RESULTS.md names it (bin/<name>).
func binName(path string) string {
	if path == "" {
		return "<binary>"
	}
	return "bin/" + filepath.Base(path)
}
