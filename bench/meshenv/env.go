package meshenv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/kube"
)

// Namespaces the benchmarks use: MeshNS is enrolled in ambient mode,
// PlainNS is not.
const (
	MeshNS  = "bench-mesh"
	PlainNS = "bench-plain"
)

// Pod names in each namespace: the client runs on node 0, the server on node 1.
const (
	Client = "client"
	Server = "server"
)

// Tunnel is ztunnel's --tunnel mode.
type Tunnel string

const (
	TunnelH2   Tunnel = "h2"
	TunnelQUIC Tunnel = "quic"
)

// Env is the sandbox with the benchmark pods and, once Mesh was called,
// the mesh.
type Env struct {
	SB   *sandbox.Sandbox
	Repo string
	// Tools is the directory hack/bench-tools.sh built fortio and
	// ghostunnel into.
	Tools string
	Log   *slog.Logger

	mesh     *meshinstall.Mesh
	use      *os.File
	created  bool // this Env brought the sandbox up (and takes it down)
	tunnel   Tunnel
	cleanups []func(context.Context) error
	// nsCleanups delete the benchmark namespaces; they run before the
	// mesh goes, so the pods are torn down with the CNI still in place.
	nsCleanups []func(context.Context) error
	// podIPs by "ns/name".
	podIPs map[string]string
	procs  []*Proc
}

// Open joins the running sandbox or brings one up, holding the sandbox's
// use lock (shared) so an e2e test binary finishing meanwhile does not
// tear it down, and creates the benchmark namespaces and pods.
func Open(ctx context.Context, log *slog.Logger) (*Env, error) {
	repo, err := sandbox.RepoRoot()
	if err != nil {
		return nil, err
	}
	e := &Env{Repo: repo, Log: log, Tools: filepath.Join(repo, ".cache", "tools", "bin"), podIPs: map[string]string{}}
	if err := meshharness.NeedBinaries("sandbox"); err != nil {
		return nil, err
	}
	// A descriptor inherited without close-on-exec (flock(1)'s lock fd,
	// when the bench runs under `flock lock cmd`) would pass to every
	// daemon a sandbox this process brings up, and hold that lock for the
	// sandbox's whole life.
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		log.Warn("mark inherited descriptors close-on-exec", "err", err)
	}
	if err := CheckTools(e.Tools); err != nil {
		return nil, err
	}
	dir := sandbox.StateDirFromEnv()
	op, err := sandbox.LockChanges(ctx, dir)
	if err != nil {
		return nil, err
	}
	sb, reused, err := sandbox.Up(ctx, sandbox.Options{StateDir: dir, Log: log})
	if err == nil {
		e.use, err = lockShared(sandbox.UseLockPath(dir))
	}
	op.Unlock()
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	e.SB, e.created = sb, !reused
	if sb.Plan.Nodes < 2 {
		e.Close()
		return nil, fmt.Errorf("the sandbox has %d nodes; the benchmarks need 2", sb.Plan.Nodes)
	}
	if err := e.pods(ctx); err != nil {
		e.Close()
		return nil, err
	}
	return e, nil
}

func lockShared(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// Close stops the processes it started, deletes what it created (the
// mesh, then the namespaces) and, when it brought the sandbox up, takes it
// down again.
func (e *Env) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var errs []error
	for _, p := range slices.Backward(e.procs) {
		p.Stop()
	}
	for _, c := range slices.Backward(append(e.cleanups, e.nsCleanups...)) {
		if err := c(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	e.cleanups, e.nsCleanups = nil, nil
	if e.use != nil {
		e.use.Close()
		e.use = nil
	}
	if e.created && e.SB != nil {
		op, err := sandbox.LockChanges(ctx, e.SB.Dir)
		if err == nil {
			err = sandbox.Down(ctx, e.SB.Dir, e.Log)
			op.Unlock()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("sandbox down: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (e *Env) onClose(f func(context.Context) error) { e.cleanups = append(e.cleanups, f) }

// pods creates both namespaces with a client pod on node 0 and a server
// pod on node 1 in each. The pods run bin/echo (any long-lived process
// would do: the benchmarks run their tools in the pods' namespaces).
func (e *Env) pods(ctx context.Context) error {
	cs := e.SB.Client()
	for _, ns := range []string{MeshNS, PlainNS} {
		if _, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err == nil {
			return fmt.Errorf("namespace %s exists (a previous bench run that did not clean up?): delete it first", ns)
		}
		labels := map[string]string{}
		if ns == MeshNS {
			labels[kube.LabelDataplaneMode] = "ambient"
		}
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: labels}}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create namespace %s: %w", ns, err)
		}
		e.nsCleanups = append(e.nsCleanups, func(ctx context.Context) error { return e.deleteNamespace(ctx, ns) })
	}
	return nil
}

// StartPods runs the client and server pods of both namespaces. The mesh
// must be installed first so the CNI captures the enrolled ones at start.
func (e *Env) StartPods(ctx context.Context) error {
	if len(e.podIPs) > 0 {
		return nil
	}
	for _, ns := range []string{MeshNS, PlainNS} {
		for i, name := range []string{Client, Server} {
			if _, err := e.SB.Apply(ctx, podYAML(ns, name, e.SB.NodeName(i))); err != nil {
				return fmt.Errorf("create pod %s/%s: %w", ns, name, err)
			}
		}
	}
	for _, ns := range []string{MeshNS, PlainNS} {
		pods, err := e.SB.WaitPodsRunning(ctx, ns, "app=bench", 2, 2*time.Minute)
		if err != nil {
			return err
		}
		for _, p := range pods {
			e.podIPs[ns+"/"+p.Name] = p.Status.PodIP
		}
	}
	// An enrolled pod is in the mesh once the CNI says its traffic is
	// redirected; before that ztunnel would not see it.
	for _, name := range []string{Client, Server} {
		err := e.SB.WaitFor(ctx, time.Minute, "redirection of "+MeshNS+"/"+name, func(ctx context.Context) (bool, error) {
			p, err := e.SB.Client().CoreV1().Pods(MeshNS).Get(ctx, name, metav1.GetOptions{})
			return err == nil && p.Annotations[kube.AnnotationRedirection] == kube.RedirectionEnabled, nil
		})
		if err != nil {
			return err
		}
	}
	return e.waitTraffic(ctx)
}

// podYAML is pod ns/name on node: the harness's echo pod, labelled so
// that StartPods' selector (app=bench) finds it.
func podYAML(ns, name, node string) string {
	return meshharness.EchoPodWithLabels(ns, name, node, "default", map[string]string{"app": "bench", "role": name})
}

// PodIP is the IP of pod ns/name (after StartPods).
func (e *Env) PodIP(ns, name string) string { return e.podIPs[ns+"/"+name] }

// Netns is the path of pod ns/name's network namespace.
func (e *Env) Netns(ctx context.Context, ns, name string) (string, error) {
	return e.SB.PodNetns(ctx, ns, name)
}

// NodeNetns is the path of node i's network namespace (where ztunnel runs).
func (e *Env) NodeNetns(i int) string { return netlab.NetnsPath(e.SB.Plan.NodeNetns(i)) }

func (e *Env) deleteNamespace(ctx context.Context, ns string) error {
	cs := e.SB.Client().CoreV1().Namespaces()
	if err := cs.Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete namespace %s: %w", ns, err)
	}
	return e.SB.WaitFor(ctx, 2*time.Minute, "namespace "+ns+" gone", func(ctx context.Context) (bool, error) {
		_, err := cs.Get(ctx, ns, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

// TempDir makes a directory for a tool's files that Close removes.
func (e *Env) TempDir(name string) (string, error) {
	d, err := os.MkdirTemp("", "meshlite-bench-"+name+"-")
	if err != nil {
		return "", err
	}
	e.onClose(func(context.Context) error { return os.RemoveAll(d) })
	return d, nil
}

// Label sets (or, with an empty value, removes) a label on namespace ns.
func (e *Env) Label(ctx context.Context, ns, key, value string) error {
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, key, value)
	if value == "" {
		patch = fmt.Sprintf(`{"metadata":{"labels":{%q:null}}}`, key)
	}
	if _, err := e.SB.Client().CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("label namespace %s %s=%q: %w", ns, key, value, err)
	}
	return nil
}

// CheckTools fails, naming what is missing, unless every tool the
// data-plane scenarios run is installed (hack/bench-tools.sh installs them).
func CheckTools(toolsDir string) error {
	var missing []string
	for _, t := range []string{"iperf3", "wrk", "nginx", "haproxy", "stunnel4"} {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	for _, t := range []string{"fortio", "ghostunnel"} {
		if st, err := os.Stat(filepath.Join(toolsDir, t)); err != nil || st.Mode()&0o111 == 0 {
			missing = append(missing, filepath.Join(toolsDir, t))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("benchmark tools missing (%s): run hack/bench-tools.sh", strings.Join(missing, ", "))
	}
	return nil
}
