package netnsfind

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/cni/netnstest"
)

func sameNs(t *testing.T, a, b *os.File) bool {
	t.Helper()
	var sa, sb unix.Stat_t
	if unix.Fstat(int(a.Fd()), &sa) != nil || unix.Fstat(int(b.Fd()), &sb) != nil {
		t.Fatal("fstat")
	}
	return sa.Ino == sb.Ino && sa.Dev == sb.Dev
}

// pin bind-mounts ns at dir/name, as `ip netns add` and the sandbox do.
func pin(t *testing.T, ns *os.File, dir, name string) {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(filepath.Join("/proc/self/fd", strconv.Itoa(int(ns.Fd()))), p, "none", unix.MS_BIND, ""); err != nil {
		t.Fatalf("pin netns: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(p, unix.MNT_DETACH) })
}

// runIn starts a long sleep inside ns, as a pod's process.
func runIn(t *testing.T, ns *os.File) {
	t.Helper()
	var cmd *exec.Cmd
	netnstest.Do(t, ns, func() error {
		cmd = exec.Command("sleep", "300")
		return cmd.Start()
	})
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
}

func TestFind_ByPodIPPinnedOrViaProcess(t *testing.T) {
	netnstest.RequireRoot(t)
	host := netnstest.New(t)
	pinned := netnstest.New(t)
	proc := netnstest.New(t)
	netnstest.Link(t, host, "v-pinned", "10.98.0.1/24", pinned, "eth0", "10.98.0.7/24")
	netnstest.Link(t, host, "v-proc", "10.98.1.1/24", proc, "eth0", "10.98.1.9/24")
	dir := t.TempDir()
	pin(t, pinned, dir, "some-runtime-name")
	runIn(t, proc)

	f := &Finder{ProcDir: "/proc", NetnsDirs: []string{dir}}
	got, err := f.Find([]netip.Addr{netip.MustParseAddr("10.98.0.7")}, "")
	if err != nil {
		t.Fatal(err)
	}
	if !sameNs(t, got, pinned) {
		t.Error("found the wrong namespace for the pinned pod")
	}
	got.Close()
	got, err = f.Find([]netip.Addr{netip.MustParseAddr("10.98.1.9")}, "")
	if err != nil {
		t.Fatalf("namespace of a process not found: %v", err)
	}
	if !sameNs(t, got, proc) {
		t.Error("found the wrong namespace for the process's pod")
	}
	got.Close()
	if _, err := f.Find([]netip.Addr{netip.MustParseAddr("10.98.2.2")}, ""); err == nil {
		t.Error("found a namespace for an address nobody has")
	}
	// The node side of the veth (10.98.0.1) lives in "host", which has no
	// process and is not pinned: not found, and never the caller's own.
	if _, err := f.Find([]netip.Addr{netip.MustParseAddr("10.98.0.1")}, ""); err == nil {
		t.Error("found an unpinned, process-less namespace")
	}
}

func TestFind_AmbiguousNeedsUIDHint(t *testing.T) {
	netnstest.RequireRoot(t)
	a, b, peer := netnstest.New(t), netnstest.New(t), netnstest.New(t)
	netnstest.Link(t, peer, "v-a", "10.97.0.1/24", a, "eth0", "10.97.0.5/24")
	netnstest.Link(t, peer, "v-b", "10.97.1.1/24", b, "eth0", "10.97.0.5/24") // same IP: a stale pod
	dir := t.TempDir()
	pin(t, a, dir, "sbx-pod-uid-aaa")
	pin(t, b, dir, "sbx-pod-uid-bbb")
	f := &Finder{ProcDir: t.TempDir(), NetnsDirs: []string{dir}}
	ip := []netip.Addr{netip.MustParseAddr("10.97.0.5")}
	if _, err := f.Find(ip, ""); err == nil || !strings.Contains(err.Error(), "not guessing") {
		t.Errorf("ambiguous find: %v", err)
	}
	got, err := f.Find(ip, "uid-bbb")
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if !sameNs(t, got, b) {
		t.Error("hint picked the wrong namespace")
	}
}
