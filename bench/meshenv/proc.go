package meshenv

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshlite/meshlite/bench/measure"
	"github.com/meshlite/meshlite/internal/nsenter"
)

// Proc is a long-lived tool (a server, a proxy) started in a pod's network
// namespace; Env.Close stops it if the benchmark did not.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	out  *tailBuffer
	done chan struct{}
	err  error
	once sync.Once
}

// Start runs argv in the network namespace at netns (the host's files and
// user) until Stop or Close.
func (e *Env) Start(netns, name string, argv ...string) (*Proc, error) {
	p := &Proc{Name: name, out: &tailBuffer{max: 16 << 10}, done: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	// Its own process group, so Stop reaches what it forks (nginx workers).
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := nsenter.DoPath(netns, p.cmd.Start); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", name, argv[0], err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	e.procs = append(e.procs, p)
	return p, nil
}

// Pid is the process's id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited says whether the process has ended, with its output when it has.
func (p *Proc) Exited() (bool, string) {
	select {
	case <-p.done:
		return true, fmt.Sprintf("%v: %s", p.err, p.out.String())
	default:
		return false, ""
	}
}

// Output is the tail of what the process printed.
func (p *Proc) Output() string { return p.out.String() }

// Stop ends the process group (TERM, then KILL after 3 s) and waits.
func (p *Proc) Stop() {
	p.once.Do(func() {
		pg := -p.cmd.Process.Pid
		syscall.Kill(pg, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(3 * time.Second):
			syscall.Kill(pg, syscall.SIGKILL)
			<-p.done
		}
	})
}

// Run runs argv in the network namespace at netns and returns its
// standard output; a failure carries its standard error.
func (e *Env) Run(ctx context.Context, netns string, argv ...string) ([]byte, error) {
	var stdout bytes.Buffer
	stderr := &tailBuffer{max: 4 << 10}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &stdout, stderr
	if err := nsenter.DoPath(netns, cmd.Start); err != nil {
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	if err := cmd.Wait(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// WaitListening polls until a TCP connect to addr from netns succeeds.
func (e *Env) WaitListening(ctx context.Context, netns, addr string, p *Proc) error {
	return e.SB.WaitFor(ctx, 15*time.Second, "listener "+addr, func(ctx context.Context) (bool, error) {
		if p != nil {
			if done, out := p.Exited(); done {
				return false, fmt.Errorf("%s exited: %s", p.Name, out)
			}
		}
		var ok bool
		nsenter.DoPath(netns, func() error {
			c, err := (&netDialer).DialContext(ctx, "tcp", addr)
			if err == nil {
				ok = true
				c.Close()
			}
			return nil
		})
		return ok, nil
	})
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = t.b[len(t.b)-t.max:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// Usage is a process tree's CPU time and memory at one moment.
type Usage struct {
	CPUTicks uint64 // utime+stime of every process, in clock ticks
	RSS      uint64 // VmRSS summed over the processes
	PeakRSS  uint64 // VmHWM summed over the processes
	Procs    int
}

// ClockTicks is the kernel's USER_HZ (100 on Linux for /proc/<pid>/stat).
const ClockTicks = 100

// ReadUsage sums CPU time and memory over pids and all their descendants.
func ReadUsage(pids ...int) (Usage, error) {
	all, err := withDescendants(pids)
	if err != nil {
		return Usage{}, err
	}
	var u Usage
	for _, pid := range all {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue // exited meanwhile
		}
		ticks, err := measure.ProcCPUTicks(stat)
		if err != nil {
			return Usage{}, fmt.Errorf("pid %d: %w", pid, err)
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		m, err := measure.ParseProcStatus(status)
		if err != nil {
			return Usage{}, fmt.Errorf("pid %d: %w", pid, err)
		}
		u.CPUTicks += ticks
		u.RSS += m.RSSBytes
		u.PeakRSS += m.PeakRSSBytes
		u.Procs++
	}
	if u.Procs == 0 {
		return Usage{}, fmt.Errorf("none of processes %v is running", pids)
	}
	return u, nil
}

func withDescendants(roots []int) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	parent := map[int]int{}
	for _, d := range ents {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		if i := bytes.LastIndexByte(stat, ')'); i >= 0 {
			if f := strings.Fields(string(stat[i+1:])); len(f) > 1 {
				parent[pid], _ = strconv.Atoi(f[1])
			}
		}
	}
	in := map[int]bool{}
	for _, r := range roots {
		in[r] = true
	}
	for changed := true; changed; {
		changed = false
		for pid, pp := range parent {
			if in[pp] && !in[pid] {
				in[pid], changed = true, true
			}
		}
	}
	out := make([]int, 0, len(in))
	for pid := range in {
		out = append(out, pid)
	}
	return out, nil
}

// FindProcess returns the pids of processes whose executable is named exe
// and that live in the network namespace at netns (ztunnel of a node, the
// waypoint of a pod).
func FindProcess(exe, netns string) ([]int, error) {
	var want syscall.Stat_t
	if err := syscall.Stat(netns, &want); err != nil {
		return nil, fmt.Errorf("stat %s: %w", netns, err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, d := range ents {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		path, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || filepath.Base(strings.TrimSuffix(path, " (deleted)")) != exe {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && st.Ino == want.Ino && st.Dev == want.Dev {
			pids = append(pids, pid)
		}
	}
	if len(pids) == 0 {
		return nil, fmt.Errorf("no %s process in %s", exe, netns)
	}
	return pids, nil
}

// ZtunnelPids returns node i's ztunnel process(es).
func (e *Env) ZtunnelPids(i int) ([]int, error) { return FindProcess("ztunnel", e.NodeNetns(i)) }

// AdminGet fetches path from the ztunnel admin port of node i
// (127.0.0.1:15000 in the node's namespace), e.g. a CPU profile.
func (e *Env) AdminGet(ctx context.Context, i int, path string) ([]byte, error) {
	b, err := GetIn(ctx, e.NodeNetns(i), "http://127.0.0.1:15000"+path)
	if err != nil {
		return nil, fmt.Errorf("ztunnel admin on node %d: %w", i, err)
	}
	return b, nil
}

// GetIn fetches url from inside the network namespace at netns; anything
// but 200 is an error.
func GetIn(ctx context.Context, netns, url string) ([]byte, error) {
	tr := &http.Transport{DisableKeepAlives: true, DialContext: nsDialer(netns)}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d (%s)", url, resp.StatusCode, strings.TrimSpace(string(b[:min(len(b), 200)])))
	}
	return b, nil
}
