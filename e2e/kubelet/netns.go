package kubelet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// NetnsDir is where named network namespaces live (as `ip netns` keeps them).
const NetnsDir = "/var/run/netns"

// PodNetnsPrefix starts the name of every pod network namespace.
const PodNetnsPrefix = "sbx-pod-"

// PodNetnsName is the name of the network namespace of the pod with this UID,
// under NetnsDir.
func PodNetnsName(uid string) string { return PodNetnsPrefix + uid }

// PodNetnsPath is the full path of the pod's network namespace.
func PodNetnsPath(uid string) string { return filepath.Join(NetnsDir, PodNetnsName(uid)) }

// netnsPath is where the runner pins a pod's netns. Tests use a prefix of
// their own, so a sandbox's `down` (which removes every sbx-* namespace)
// running at the same time does not take their pods.
func (r *runner) netnsPath(uid string) string {
	return filepath.Join(NetnsDir, r.netnsPrefix+uid)
}

// ensureNetnsDir makes NetnsDir a shared mount point, as `ip netns add` does,
// so namespaces created later are visible to mount namespaces that were
// copied from this one (containers that mount /var/run/netns from the host).
func ensureNetnsDir() error {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", NetnsDir, err)
	}
	err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("make %s shared: %w", NetnsDir, err)
	}
	// Not a mount point yet: bind it onto itself first.
	if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s onto itself: %w", NetnsDir, err)
	}
	if err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", NetnsDir, err)
	}
	return nil
}

// createNetns creates a new, empty network namespace pinned at path by a bind
// mount. It is idempotent: an existing namespace at path is kept.
func createNetns(path string) error {
	if isNetns(path) {
		return nil
	}
	if err := ensureNetnsDir(); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil && !os.IsExist(err) {
		return fmt.Errorf("create netns file %s: %w", path, err)
	}
	if f != nil {
		f.Close()
	}

	errc := make(chan error, 1)
	go func() {
		// Unshare moves this thread into the new namespace; it goes back
		// before it is unlocked. (Left locked, the thread would end, but
		// the main thread would be kept, in the pod's netns, and
		// /proc/<kubelet>/ns/net would name a pod.)
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		err = unix.Mount(self, path, "none", unix.MS_BIND, "")
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr == nil {
			runtime.UnlockOSThread()
		}
		if err != nil {
			errc <- fmt.Errorf("bind netns to %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// deleteNetns unmounts and removes a named network namespace; a missing one
// is not an error.
func deleteNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove netns file %s: %w", path, err)
	}
	return nil
}

// isNetns reports whether path is a bind-mounted network namespace.
func isNetns(path string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false
	}
	return st.Type == unix.NSFS_MAGIC
}

// netnsInode is the inode number that identifies a network namespace.
func netnsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Ino, nil
}

// dialInNetns opens a TCP connection from inside the network namespace at
// path ("" = the current one). addr must hold an IP literal: a name could make
// the dialer race addresses on goroutines of other threads (other netns).
func dialInNetns(ctx context.Context, path, addr string) (net.Conn, error) {
	var conn net.Conn
	err := nsenter.DoPath(path, func() error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		conn = c
		return err
	})
	return conn, err
}

// listNetns lists the names of network namespaces under NetnsDir that
// start with prefix.
func listNetns(prefix string) ([]string, error) {
	entries, err := os.ReadDir(NetnsDir)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("list %s: %w", NetnsDir, err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
