package kubelet

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// spawner starts child processes from one OS thread that lives as long as
// the kubelet. Children get SIGKILL as parent-death signal, which Linux sends
// when the *thread* that forked them ends; a thread of its own keeps that from
// firing when some other locked goroutine's thread is discarded.
type spawner struct {
	reqs chan spawnReq
	done chan struct{}
}

type spawnReq struct {
	cmd  *exec.Cmd
	errc chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq), done: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		// Never unlocked: when this goroutine ends, the thread ends, and any
		// child still running gets its parent-death signal.
		defer close(s.done)
		for r := range s.reqs {
			r.errc <- r.cmd.Start()
		}
	}()
	return s
}

func (s *spawner) start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	select {
	case s.reqs <- spawnReq{cmd: cmd, errc: errc}:
	case <-s.done:
		return errors.New("kubelet is stopping")
	}
	return <-errc
}

func (s *spawner) close() {
	close(s.reqs)
	<-s.done
}

// initCommand builds the re-exec of our own binary that becomes a container
// process (see InitMain).
func initCommand(argv []string, spec *initSpec) (*exec.Cmd, error) {
	raw, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("encode init spec: %w", err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = []string{initSpecEnv + "=" + string(raw)}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd, nil
}

// startInit starts cmd (from initCommand) through the spawner and waits until
// the child has exec'd the container binary or failed to. On failure the
// child is reaped and its setup error returned.
func startInit(sp *spawner, cmd *exec.Cmd) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("create init error pipe: %w", err)
	}
	defer r.Close()
	cmd.ExtraFiles = []*os.File{w}
	err = sp.start(cmd)
	w.Close()
	if err != nil {
		return fmt.Errorf("start %s: %w", InitVerb, err)
	}
	msg, _ := io.ReadAll(io.LimitReader(r, 64<<10))
	if len(msg) > 0 {
		_ = cmd.Wait()
		return &startError{msg: string(msg)}
	}
	return nil
}

// startError is a failure of the container's setup before its binary ran.
type startError struct{ msg string }

func (e *startError) Error() string { return e.msg }

// exitCode is the Kubernetes-style exit code of a finished process: the
// status, or 128+signal when it was killed.
func exitCode(ps *os.ProcessState) int32 {
	if ps == nil {
		return -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return int32(128 + int(ws.Signal()))
	}
	return int32(ps.ExitCode())
}

// procStartTime is field 22 of /proc/<pid>/stat (clock ticks since boot): with
// the pid it names one process, so a recorded pid is not confused with a later
// process that reused it.
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatStartTime(b)
}

func parseStatStartTime(b []byte) (uint64, error) {
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return 0, errors.New("short stat")
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// killNetnsProcesses sends SIGKILL to every process whose network namespace
// is the one at netnsPath: whatever a pod left behind (daemons that left the
// container's process group, too).
func killNetnsProcesses(netnsPath string) (int, error) {
	ino, err := netnsInode(netnsPath)
	if err != nil {
		return 0, err
	}
	return killProcessesWhere(func(pid int) bool {
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
			return false
		}
		return st.Ino == ino
	})
}

func killProcessesWhere(match func(pid int) bool) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("list /proc: %w", err)
	}
	self := os.Getpid()
	n := 0
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid <= 1 {
			continue
		}
		if match(pid) {
			if unix.Kill(pid, unix.SIGKILL) == nil {
				n++
			}
		}
	}
	return n, nil
}

// pidRecord is a started container process, kept in the pod dir so a
// restarted kubelet can kill what a crashed one left.
type pidRecord struct {
	pid       int
	startTime uint64
}

func appendPidRecord(path string, pid int) error {
	st, err := procStartTime(pid)
	if err != nil {
		return fmt.Errorf("read start time of pid %d: %w", pid, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("record pid %d: %w", pid, err)
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%d %d\n", pid, st)
	return err
}

func readPidRecords(path string) ([]pidRecord, error) {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, err
	}
	defer f.Close()
	var out []pidRecord
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r pidRecord
		if _, err := fmt.Sscanf(sc.Text(), "%d %d", &r.pid, &r.startTime); err == nil && r.pid > 1 {
			out = append(out, r)
		}
	}
	return out, sc.Err()
}

// killRecorded kills the process groups of recorded pids that still are the
// processes recorded.
func killRecorded(recs []pidRecord) {
	for _, r := range recs {
		st, err := procStartTime(r.pid)
		if err != nil || st != r.startTime {
			continue
		}
		_ = unix.Kill(-r.pid, unix.SIGKILL)
		_ = unix.Kill(r.pid, unix.SIGKILL)
	}
}
