package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/cluster/daemon"
	"github.com/meshlite/meshlite/e2e/netlab"
)

// Down removes the sandbox whose state is in stateDir and everything it
// made: kubelets and every process inside its namespaces (pods), the
// control plane, mounts under the state dir, its network namespaces (nodes,
// pods, underlay) with their links, iptables rules and routes, and the state
// dir itself. It works from names and pid files when the state is damaged,
// and does nothing when there is no sandbox. The caller holds the change
// lock.
func Down(ctx context.Context, stateDir string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	stateDir = absDir(stateDir)
	st, err := loadState(stateDir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("sandbox state unreadable; removing by names", "err", err)
		}
		st = &State{Prefix: netlab.PlanFor(InstanceFromEnv(), 1).Prefix, Instance: InstanceFromEnv()}
		if left, lerr := Leftovers(stateDir, st.Prefix); lerr == nil && len(left) == 0 {
			log.Debug("no sandbox to remove", "state", stateDir)
			return nil
		}
	}
	plan := planFor(st)
	l := cluster.LayoutOf(stateDir)
	var errs []error

	// Kubelets first, so nothing restarts pods while they are killed.
	kubelets, _ := filepath.Glob(filepath.Join(l.RunDir, "kubelet-*.pid"))
	for _, pf := range kubelets {
		if err := daemon.StopFromFile(pf, 10*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("stop kubelet: %w", err))
		}
	}
	// Then every process living in one of the sandbox's namespaces: pod
	// containers, host-network pods, strays.
	if err := killInNamespaces(plan.Prefix, log); err != nil {
		errs = append(errs, err)
	}
	if err := cluster.Stop(l); err != nil {
		errs = append(errs, err)
	}
	// Control-plane processes whose pid files are gone still name the
	// state dir on their command line.
	if err := killMentioning(stateDir, log); err != nil {
		errs = append(errs, err)
	}
	if err := unmountUnder(stateDir); err != nil {
		errs = append(errs, err)
	}
	if err := netlab.Destroy(plan, st.MadeNetnsMount); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(stateDir); err != nil {
		errs = append(errs, fmt.Errorf("remove state dir: %w", err))
	}
	if len(errs) == 0 {
		if left, err := Leftovers(stateDir, plan.Prefix); err != nil {
			errs = append(errs, err)
		} else if len(left) > 0 {
			errs = append(errs, fmt.Errorf("still present after down: %s", strings.Join(left, "; ")))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sandbox down: %w", err)
	}
	log.Info("sandbox down", "state", stateDir)
	return nil
}

// Leftovers lists anything of a sandbox (state dir stateDir, name prefix
// prefix) that exists: its state dir, namespaces, host links and routes,
// processes in its namespaces or naming its state dir, mounts.
func Leftovers(stateDir, prefix string) ([]string, error) {
	stateDir = absDir(stateDir)
	var out []string
	if _, err := os.Stat(stateDir); err == nil {
		out = append(out, "state dir "+stateDir)
	}
	plan := netlab.PlanFor(instanceOfPrefix(prefix), 1)
	plan.Prefix = prefix
	nl, err := netlab.Leftovers(plan)
	if err != nil {
		return nil, err
	}
	out = append(out, nl...)
	pids, err := processesIn(prefix)
	if err != nil {
		return nil, err
	}
	for _, p := range pids {
		out = append(out, fmt.Sprintf("process %d (%s) in a sandbox namespace", p, cmdline(p)))
	}
	mention, err := processesMentioning(stateDir)
	if err != nil {
		return nil, err
	}
	for _, p := range mention {
		out = append(out, fmt.Sprintf("process %d (%s)", p, cmdline(p)))
	}
	mounts, err := mountsMatching(func(mp string) bool {
		return under(mp, stateDir) || strings.HasPrefix(filepath.Base(mp), prefix+"-") && filepath.Dir(mp) == netlab.NetnsDir
	})
	if err != nil {
		return nil, err
	}
	for _, m := range mounts {
		out = append(out, "mount "+m)
	}
	return out, nil
}

// processesIn returns processes (other than this one) inside a namespace
// whose name starts with prefix+"-".
func processesIn(prefix string) ([]int, error) {
	names, err := netlab.ListNetns(prefix)
	if err != nil {
		return nil, err
	}
	inodes := map[uint64]bool{}
	for _, n := range names {
		if ino, err := netlab.NetnsInode(netlab.NetnsPath(n)); err == nil {
			inodes[ino] = true
		}
	}
	if len(inodes) == 0 {
		return nil, nil
	}
	pids, err := netlab.ProcessesIn(inodes)
	if err != nil {
		return nil, err
	}
	return withoutSelf(pids), nil
}

func killInNamespaces(prefix string, log *slog.Logger) error {
	pids, err := processesIn(prefix)
	if err != nil {
		return err
	}
	return killAll(pids, "in a sandbox namespace", log)
}

func killMentioning(stateDir string, log *slog.Logger) error {
	pids, err := processesMentioning(stateDir)
	if err != nil {
		return err
	}
	return killAll(pids, "naming the state dir", log)
}

// killAll sends SIGTERM to each pid, waits a little, then SIGKILLs the
// survivors; each pid is pinned by its start time so a recycled pid is not
// hit.
func killAll(pids []int, why string, log *slog.Logger) error {
	var procs []daemon.Proc
	for _, pid := range pids {
		if p, err := daemon.Of(pid); err == nil {
			log.Debug("stopping process", "pid", pid, "cmd", cmdline(pid), "why", why)
			procs = append(procs, p)
		}
	}
	for _, p := range procs {
		_ = syscall.Kill(p.Pid, syscall.SIGTERM)
	}
	var errs []error
	for _, p := range procs {
		if err := p.Stop(3 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ownBinaries are the programs a sandbox runs as daemons.
var ownBinaries = map[string]bool{
	cluster.Etcd: true, cluster.APIServer: true, cluster.ControllerManager: true, cluster.Scheduler: true,
	"sandbox": true,
}

// processesMentioning returns processes (other than this one) running one
// of the sandbox's own programs with an argument that is, or lies under,
// dir. (A shell tailing a log there is left alone.)
func processesMentioning(dir string) ([]int, error) {
	dir = filepath.Clean(dir)
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list /proc: %w", err)
	}
	var out []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || fmt.Sprint(pid) != e.Name() {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || !ownBinaries[filepath.Base(strings.TrimSuffix(exe, " (deleted)"))] {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, arg := range strings.Split(string(b), "\x00") {
			if i := strings.IndexByte(arg, '='); i >= 0 && strings.HasPrefix(arg, "--") {
				arg = arg[i+1:]
			}
			if under(arg, dir) {
				out = append(out, pid)
				break
			}
		}
	}
	return withoutSelf(out), nil
}

func withoutSelf(pids []int) []int {
	self := os.Getpid()
	out := pids[:0]
	for _, p := range pids {
		if p != self {
			out = append(out, p)
		}
	}
	return out
}

func cmdline(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return "?"
	}
	s := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	if len(s) > 120 {
		s = s[:120] + "..."
	}
	return s
}

func under(path, dir string) bool {
	if path == "" || !filepath.IsAbs(path) {
		return false
	}
	path = filepath.Clean(path)
	return path == dir || strings.HasPrefix(path, dir+"/")
}

// unmountUnder detaches every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	dir = filepath.Clean(dir)
	mps, err := mountsMatching(func(mp string) bool { return under(mp, dir) })
	if err != nil {
		return err
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	var errs []error
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// mountsMatching returns the mount points in this mount namespace that
// match.
func mountsMatching(match func(string) bool) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if match(mp) {
			out = append(out, mp)
		}
	}
	return out, s.Err()
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
