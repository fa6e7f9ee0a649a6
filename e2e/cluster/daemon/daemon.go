// Package daemon starts the sandbox's long-lived processes (etcd, the
// control plane, kubelets) so that they outlive the command that started
// them, each in its own session, optionally inside a network namespace, with
// a log file and a pid file; and it stops them again. It never signals a
// process it cannot prove it started: a pid file records the process start
// time, so a recycled pid is left alone.
package daemon

import (
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// Spec describes a process to start.
type Spec struct {
	Path string
	Args []string
	// Env is added to the starter's environment.
	Env []string
	Dir string
	// LogFile receives stdout and stderr (appended).
	LogFile string
	// PidFile records "<pid> <start time>".
	PidFile string
	// Netns, when set, is the path of a network namespace (for example
	// /run/netns/sbx-node-0) the process starts in.
	Netns string
}

// Start starts the process described by s and returns its pid. The process
// gets its own session, so it survives the starter and terminal hangups.
func Start(s Spec) (int, error) {
	logf, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, fmt.Errorf("open log file for %s: %w", s.Path, err)
	}
	defer logf.Close()
	closeInheritedOnExec()
	cmd := exec.Command(s.Path, s.Args...)
	cmd.Env = append(os.Environ(), s.Env...)
	cmd.Dir = s.Dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := StartIn(s.Netns, cmd); err != nil {
		return 0, fmt.Errorf("start %s: %w", s.Path, err)
	}
	pid := cmd.Process.Pid
	// Reap the child if it dies while the starter still runs (tests keep
	// running after `up`); otherwise it would linger as a zombie.
	go func() { _ = cmd.Wait() }()
	st, err := startTime(pid)
	if err != nil {
		_ = cmd.Process.Kill()
		return 0, fmt.Errorf("read start time of %s (pid %d): %w", s.Path, pid, err)
	}
	if err := os.WriteFile(s.PidFile, []byte(fmt.Sprintf("%d %d\n", pid, st)), 0o644); err != nil {
		_ = cmd.Process.Kill()
		return 0, fmt.Errorf("write pid file %s: %w", s.PidFile, err)
	}
	return pid, nil
}

// closeInheritedOnExec marks every descriptor above stderr close-on-exec.
// Go opens its own files that way, but descriptors inherited from whoever
// started us (a lock held by `flock cmd`, a CI pipe) are not, and a daemon
// that outlives us must not keep them: it would hold the lock until the
// sandbox goes down.
func closeInheritedOnExec() {
	_ = unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC)
}

// StartIn starts cmd inside the network namespace at nsPath (or in the
// current one when nsPath is empty). The child inherits the namespace of the
// thread that forks it, so the fork happens on a thread locked and moved into
// the namespace; that thread is never unlocked, so the Go runtime discards it
// instead of reusing it for other goroutines.
func StartIn(nsPath string, cmd *exec.Cmd) error {
	if nsPath == "" {
		return cmd.Start()
	}
	return nsenter.DoPath(nsPath, cmd.Start)
}

// Proc identifies a started process.
type Proc struct {
	Pid       int
	StartTime uint64
}

// ReadPidFile reads a pid file written by Start.
func ReadPidFile(path string) (Proc, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Proc{}, err
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return Proc{}, fmt.Errorf("pid file %s: want \"<pid> <start time>\", got %q", path, b)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return Proc{}, fmt.Errorf("pid file %s: bad pid %q", path, f[0])
	}
	st, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return Proc{}, fmt.Errorf("pid file %s: bad start time %q", path, f[1])
	}
	return Proc{Pid: pid, StartTime: st}, nil
}

// Alive reports whether p still runs (and is the same process, not a
// recycled pid, nor a zombie).
func (p Proc) Alive() bool {
	st, state, err := stat(p.Pid)
	return err == nil && st == p.StartTime && state != "Z" && state != "X"
}

// AliveFromFile reports whether the process recorded in pidFile runs.
func AliveFromFile(pidFile string) bool {
	p, err := ReadPidFile(pidFile)
	return err == nil && p.Alive()
}

// Stop sends SIGTERM to p, waits up to grace for it to exit and then sends
// SIGKILL. A process that is already gone is not an error.
func (p Proc) Stop(grace time.Duration) error {
	if !p.Alive() {
		return nil
	}
	if err := syscall.Kill(p.Pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal pid %d: %w", p.Pid, err)
	}
	if waitGone(p, grace) {
		return nil
	}
	if err := syscall.Kill(p.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill pid %d: %w", p.Pid, err)
	}
	if waitGone(p, 5*time.Second) {
		return nil
	}
	return fmt.Errorf("pid %d still runs after SIGKILL", p.Pid)
}

// StopFromFile stops the process recorded in pidFile and removes the file.
// A missing pid file means there is nothing to stop.
func StopFromFile(pidFile string, grace time.Duration) error {
	p, err := ReadPidFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := p.Stop(grace); err != nil {
		return err
	}
	if err := os.Remove(pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pid file: %w", err)
	}
	return nil
}

// Of returns the identity of the running process pid.
func Of(pid int) (Proc, error) {
	st, err := startTime(pid)
	if err != nil {
		return Proc{}, err
	}
	return Proc{Pid: pid, StartTime: st}, nil
}

func waitGone(p Proc, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if !p.Alive() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startTime(pid int) (uint64, error) {
	st, _, err := stat(pid)
	return st, err
}

// stat returns field 22 (start time in clock ticks since boot) and field 3
// (state) of /proc/<pid>/stat.
func stat(pid int) (uint64, string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, "", err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, "", fmt.Errorf("parse /proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); field 22 is f[19].
	if len(f) < 20 {
		return 0, "", fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f)+2)
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("parse /proc/%d/stat start time: %w", pid, err)
	}
	return st, f[0], nil
}
