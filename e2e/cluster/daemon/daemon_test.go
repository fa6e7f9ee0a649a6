package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func spec(t *testing.T, script string) Spec {
	dir := t.TempDir()
	return Spec{
		Path:    "/bin/sh",
		Args:    []string{"-c", script},
		LogFile: filepath.Join(dir, "log"),
		PidFile: filepath.Join(dir, "pid"),
	}
}

func TestStart_DetachedWithLogAndPidFile(t *testing.T) {
	s := spec(t, "echo started; echo oops >&2; exec sleep 60")
	pid, err := Start(s)
	if err != nil {
		t.Fatal(err)
	}
	p, err := ReadPidFile(s.PidFile)
	if err != nil || p.Pid != pid {
		t.Fatalf("pid file: %+v, %v; want pid %d", p, err, pid)
	}
	t.Cleanup(func() { _ = p.Stop(time.Second) })
	if !p.Alive() {
		t.Fatal("process not alive after Start")
	}
	// Own session: the daemon is not in our process group.
	if sid, _ := sessionOf(pid); sid != pid {
		t.Errorf("session of daemon = %d, want its own (%d)", sid, pid)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(s.LogFile)
		if strings.Contains(string(b), "started") && strings.Contains(string(b), "oops") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("log file lacks stdout and stderr: %q", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := StopFromFile(s.PidFile, time.Second); err != nil {
		t.Fatal(err)
	}
	if p.Alive() {
		t.Error("still alive after StopFromFile")
	}
	if _, err := os.Stat(s.PidFile); !os.IsNotExist(err) {
		t.Error("pid file left behind")
	}
	if err := StopFromFile(s.PidFile, time.Second); err != nil {
		t.Errorf("second stop: %v", err)
	}
}

func TestStop_KillsProcessIgnoringSIGTERM(t *testing.T) {
	s := spec(t, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
	if _, err := Start(s); err != nil {
		t.Fatal(err)
	}
	p, err := ReadPidFile(s.PidFile)
	if err != nil {
		t.Fatal(err)
	}
	for b, _ := os.ReadFile(s.LogFile); !strings.Contains(string(b), "ready"); b, _ = os.ReadFile(s.LogFile) {
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	if err := p.Stop(300 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if p.Alive() {
		t.Fatal("alive after Stop")
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("stopped in %v: SIGTERM should have been ignored for the grace period", d)
	}
}

func TestStop_LeavesRecycledPidAlone(t *testing.T) {
	// Our own pid with a wrong start time stands for a pid reused by
	// another process: it must count as dead and not be signalled.
	pf := filepath.Join(t.TempDir(), "pid")
	self, err := Of(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pf, []byte(fmt.Sprintf("%d %d\n", self.Pid, self.StartTime+1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if AliveFromFile(pf) {
		t.Fatal("a pid with another start time counts as alive")
	}
	if err := StopFromFile(pf, time.Second); err != nil {
		t.Fatal(err)
	}
	// Still here, so nothing was sent.
}

func TestReadPidFile_RejectsGarbage(t *testing.T) {
	for _, content := range []string{"", "12", "x 1", "-3 5", "12 y", "1 2 3"} {
		pf := filepath.Join(t.TempDir(), "pid")
		if err := os.WriteFile(pf, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadPidFile(pf); err == nil {
			t.Errorf("ReadPidFile accepted %q", content)
		}
	}
}

func sessionOf(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	var sid int
	_, err = fmt.Sscan(f[3], &sid) // field 6
	return sid, err
}

// A descriptor inherited without close-on-exec (as `flock lockfile cmd`
// hands its lock to cmd) must not reach a daemon, which would hold it for
// its whole life.
func TestStart_DoesNotLeakInheritedDescriptors(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "inherited.lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := unix.FcntlInt(f.Fd(), unix.F_SETFD, 0); err != nil {
		t.Fatal(err)
	}
	s := spec(t, "exec sleep 60")
	pid, err := Start(s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = StopFromFile(s.PidFile, time.Second) })
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if target == f.Name() {
			t.Fatalf("daemon inherited fd %s -> %s", e.Name(), target)
		}
	}
}
