package netlab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// Run runs a command to completion inside the namespace at nsPath and
// returns an error holding its output when it fails.
func Run(nsPath string, name string, args ...string) error {
	var out []byte
	err := nsenter.DoPath(nsPath, func() error {
		var err error
		out, err = exec.Command(name, args...).CombinedOutput()
		return err
	})
	if err != nil {
		return fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), nsPath, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ensureNetnsDir makes NetnsDir a shared bind mount, as `ip netns add`
// does, so that namespace mounts made later propagate into mount namespaces
// copied from this one (and unmounts reach them too, letting namespaces
// die). It reports whether it made the mount.
func ensureNetnsDir() (bool, error) {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", NetnsDir, err)
	}
	made := false
	err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		// Not a mount point yet: bind it onto itself, then share it.
		if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return false, fmt.Errorf("bind-mount %s: %w", NetnsDir, err)
		}
		made = true
		err = unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return made, fmt.Errorf("make %s shared: %w", NetnsDir, err)
	}
	return made, nil
}

// createNamed makes a new network namespace bind-mounted at
// NetnsPath(name) and returns a handle to it. It fails if the name exists.
func createNamed(name string) (netns.NsHandle, error) {
	type result struct {
		h   netns.NsHandle
		err error
	}
	rc := make(chan result, 1)
	go func() {
		// netns.NewNamed unshares the calling thread into the new
		// namespace; the locked thread is discarded when this goroutine
		// ends.
		runtime.LockOSThread()
		h, err := netns.NewNamed(name)
		rc <- result{h, err}
	}()
	r := <-rc
	if r.err != nil {
		return netns.None(), fmt.Errorf("create netns %s: %w", name, r.err)
	}
	return r.h, nil
}

// deleteNamed unmounts and removes a named namespace. A missing one is not
// an error.
func deleteNamed(name string) error {
	p := NetnsPath(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}

// ListNetns returns the names of the namespaces in NetnsDir that start
// with prefix+"-".
func ListNetns(prefix string) ([]string, error) {
	ents, err := os.ReadDir(NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", NetnsDir, err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// NetnsInode returns the inode that identifies the namespace bind-mounted
// at path (the number in a process's /proc/<pid>/ns/net link, "net:[N]").
func NetnsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat netns %s: %w", path, err)
	}
	return st.Ino, nil
}

// ProcessesIn returns the pids of processes whose network namespace has
// one of the given inodes.
func ProcessesIn(inodes map[uint64]bool) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list /proc: %w", err)
	}
	var pids []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid <= 0 || filepath.Base(e.Name()) != fmt.Sprint(pid) {
			continue
		}
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			continue // gone, or a kernel thread
		}
		var ino uint64
		if _, err := fmt.Sscanf(link, "net:[%d]", &ino); err != nil {
			continue
		}
		if inodes[ino] {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}
