package kubelet

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// InitVerb is the hidden CLI verb that must dispatch to InitMain:
// `sandbox kubelet-init` (the kubelet re-executes /proc/self/exe with it).
const InitVerb = "kubelet-init"

// initSpecEnv carries the JSON initSpec from the kubelet to its re-exec.
const initSpecEnv = "SBX_KUBELET_INIT"

// initErrFD is the child's end of a close-on-exec pipe: the child writes its
// setup error there; the kubelet reads EOF when the exec succeeded.
const initErrFD = 3

// initSpec tells InitMain how to become a container process.
type initSpec struct {
	// Mode "run" starts a container: new mount (and UTS) namespace, join
	// NetNS, bind Mounts, exec. Mode "exec" joins the namespaces of the
	// running TargetPID (kubectl exec, exec probes) and execs.
	Mode      string      `json:"mode"`
	NetNS     string      `json:"netns,omitempty"`
	TargetPID int         `json:"targetPID,omitempty"`
	Hostname  string      `json:"hostname,omitempty"`
	Mounts    []initMount `json:"mounts,omitempty"`
	Argv      []string    `json:"argv"`
	Env       []string    `json:"env"`
	Dir       string      `json:"dir,omitempty"`
	UID       *int64      `json:"uid,omitempty"`
	GID       *int64      `json:"gid,omitempty"`
	Groups    []int64     `json:"groups,omitempty"`
}

type initMount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	// Propagation is a v1.MountPropagationMode: "" or None (private),
	// HostToContainer (slave), Bidirectional (shared).
	Propagation string `json:"propagation,omitempty"`
}

// InitMain is the body of the hidden `kubelet-init` verb. It runs in a fresh
// child of the kubelet, sets up the namespaces and mounts named by the spec in
// its environment, and replaces itself with the container's binary. It returns
// only on failure, after reporting the error to the kubelet.
func InitMain(args []string) error {
	if len(args) != 0 {
		return fmt.Errorf("%s takes no arguments (spec comes from the kubelet)", InitVerb)
	}
	// Namespaces joined with setns are per thread; everything until execve
	// must happen on this one.
	runtime.LockOSThread()
	unix.CloseOnExec(initErrFD)
	errPipe := os.NewFile(initErrFD, "kubelet-init-errors")

	err := initRun()
	msg := err.Error()
	if errPipe != nil {
		_, _ = errPipe.WriteString(msg)
	}
	return err
}

func initRun() error {
	raw := os.Getenv(initSpecEnv)
	if raw == "" {
		return fmt.Errorf("%s: no spec in $%s; this verb is for the kubelet only", InitVerb, initSpecEnv)
	}
	var spec initSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		return fmt.Errorf("parse init spec: %w", err)
	}
	if len(spec.Argv) == 0 || !filepath.IsAbs(spec.Argv[0]) {
		return fmt.Errorf("init spec: argv[0] must be an absolute path, got %q", spec.Argv)
	}
	switch spec.Mode {
	case "run":
		if err := initContainerNamespaces(&spec); err != nil {
			return err
		}
	case "exec":
		if err := joinContainer(spec.TargetPID); err != nil {
			return err
		}
	default:
		return fmt.Errorf("init spec: unknown mode %q", spec.Mode)
	}
	dir := spec.Dir
	if dir == "" {
		dir = "/"
	}
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("chdir %s: %w", dir, err)
	}
	if err := setCredentials(&spec); err != nil {
		return err
	}
	if err := syscall.Exec(spec.Argv[0], spec.Argv, spec.Env); err != nil {
		return fmt.Errorf("exec %s: %w", spec.Argv[0], err)
	}
	return nil
}

// initContainerNamespaces gives this thread a private copy of the mount
// namespace (receiving, not sending, host mount events), a UTS namespace when
// a hostname is set, joins the pod netns and binds the volumes.
func initContainerNamespaces(spec *initSpec) error {
	flags := unix.CLONE_NEWNS
	if spec.Hostname != "" {
		flags |= unix.CLONE_NEWUTS
	}
	if err := unix.Unshare(flags); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	// Slave, not private: new netns mounts under /var/run/netns still reach
	// containers that bind it with HostToContainer.
	if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make / rslave: %w", err)
	}
	if spec.NetNS != "" {
		if err := setnsPath(spec.NetNS, unix.CLONE_NEWNET); err != nil {
			return err
		}
	}
	if spec.Hostname != "" {
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return fmt.Errorf("set hostname %q: %w", spec.Hostname, err)
		}
	}
	mounts := append([]initMount(nil), spec.Mounts...)
	// Parents before children: /etc/istio before /etc/istio/proxy.
	sort.SliceStable(mounts, func(i, j int) bool {
		return pathDepth(mounts[i].Target) < pathDepth(mounts[j].Target)
	})
	for _, m := range mounts {
		if err := bindMount(m); err != nil {
			return err
		}
	}
	return nil
}

func pathDepth(p string) int { return strings.Count(filepath.Clean(p), "/") }

func bindMount(m initMount) error {
	if !filepath.IsAbs(m.Target) {
		return fmt.Errorf("mount target %q is not absolute", m.Target)
	}
	st, err := os.Stat(m.Source)
	if err != nil {
		return fmt.Errorf("mount source for %s: %w", m.Target, err)
	}
	if err := ensureMountTarget(m.Target, st.IsDir()); err != nil {
		return err
	}
	if err := unix.Mount(m.Source, m.Target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", m.Source, m.Target, err)
	}
	if m.ReadOnly {
		if err := unix.Mount("", m.Target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("remount %s read-only: %w", m.Target, err)
		}
	}
	prop := unix.MS_PRIVATE
	switch m.Propagation {
	case "HostToContainer":
		prop = unix.MS_SLAVE
	case "Bidirectional":
		prop = unix.MS_SHARED
	}
	if err := unix.Mount("", m.Target, "", uintptr(prop|unix.MS_REC), ""); err != nil {
		return fmt.Errorf("set propagation of %s: %w", m.Target, err)
	}
	return nil
}

// ensureMountTarget creates a missing mount point. The file system is the
// host's (only the mount table is private), so the empty directory or file
// stays behind after the pod.
func ensureMountTarget(target string, dir bool) error {
	st, err := os.Stat(target)
	if err == nil {
		if st.IsDir() != dir {
			return fmt.Errorf("mount target %s: is dir=%v, source is dir=%v", target, st.IsDir(), dir)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stat mount target %s: %w", target, err)
	}
	if dir {
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("create mount point %s: %w", target, err)
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return fmt.Errorf("create mount point %s: %w", target, err)
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o644)
	if err != nil {
		return fmt.Errorf("create mount point %s: %w", target, err)
	}
	return f.Close()
}

// joinContainer moves this thread into the net, UTS and mount namespaces of
// a running container process.
func joinContainer(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("init spec: exec needs a target pid")
	}
	// setns into a mount namespace needs a private fs_struct; Go's threads
	// share one until this thread unshares it.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unshare fs: %w", err)
	}
	type nsf struct {
		name string
		flag int
		f    *os.File
	}
	nss := []nsf{{"net", unix.CLONE_NEWNET, nil}, {"uts", unix.CLONE_NEWUTS, nil}, {"mnt", unix.CLONE_NEWNS, nil}}
	for i := range nss {
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", pid, nss[i].name))
		if err != nil {
			return fmt.Errorf("open %s namespace of pid %d (container not running?): %w", nss[i].name, pid, err)
		}
		defer f.Close()
		nss[i].f = f
	}
	for _, n := range nss {
		if err := unix.Setns(int(n.f.Fd()), n.flag); err != nil {
			return fmt.Errorf("join %s namespace of pid %d: %w", n.name, pid, err)
		}
	}
	return nil
}

func setnsPath(path string, flag int) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", path, err)
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), flag); err != nil {
		return fmt.Errorf("join namespace %s: %w", path, err)
	}
	return nil
}

func setCredentials(spec *initSpec) error {
	if spec.UID == nil && spec.GID == nil {
		return nil
	}
	gid := 0
	if spec.GID != nil {
		gid = int(*spec.GID)
	}
	groups := make([]int, 0, len(spec.Groups))
	for _, g := range spec.Groups {
		groups = append(groups, int(g))
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("setgid %d: %w", gid, err)
	}
	if spec.UID != nil {
		uid := int(*spec.UID)
		if err := syscall.Setresuid(uid, uid, uid); err != nil {
			return fmt.Errorf("setuid %d: %w", uid, err)
		}
	}
	// A credential change clears the parent-death signal; the container must
	// still die with the kubelet.
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("set parent-death signal: %w", err)
	}
	return nil
}
