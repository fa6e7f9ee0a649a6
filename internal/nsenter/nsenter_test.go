package nsenter

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// inode of the network namespace the calling thread is in.
func threadNetns(t *testing.T) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestDoPath_RunsInTheNamespaceAndComesBack(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces): run the tests as root, as make test and CI do")
	}
	name := fmt.Sprintf("nsenter-test-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	path := "/var/run/netns/" + name
	var want unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		t.Fatal(err)
	}
	host := threadNetns(t)
	var inside uint64
	if err := DoPath(path, func() error { inside = threadNetns(t); return nil }); err != nil {
		t.Fatal(err)
	}
	if inside != want.Ino || inside == host {
		t.Fatalf("fn ran in netns inode %d, want %d (host %d)", inside, want.Ino, host)
	}
	// The thread went back: running in "" (current) sees the host namespace.
	if err := DoPath("", func() error {
		if got := threadNetns(t); got != host {
			return fmt.Errorf("current netns %d, want host %d", got, host)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// fn's error comes back as is.
	if err := DoPath(path, func() error { return fmt.Errorf("boom") }); err == nil || err.Error() != "boom" {
		t.Fatalf("err = %v, want boom", err)
	}
	// Not a namespace: a clear error, fn never runs.
	ran := false
	err := DoPath("/proc/self/status", func() error { ran = true; return nil })
	if err == nil || ran || !strings.Contains(err.Error(), "enter netns") {
		t.Fatalf("err = %v ran = %v, want an enter error without running fn", err, ran)
	}
}
