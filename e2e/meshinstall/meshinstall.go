// Package meshinstall installs meshlite into the sandbox from the Helm
// chart (deploy/helm/meshlite, rendered and applied by meshctl/install),
// the way a user installs it on a cluster, with the few values the sandbox
// needs: image names the kubelet-lite maps to bin/, each node's own root
// for the CNI agent, and istiod-lite's pod IP for ztunnel (the sandbox has
// no cluster DNS and no kube-proxy on the node network). It also removes
// the mesh again and checks that the nodes are left unchained. It does not
// test the mesh; e2e/deploytest and e2e/meshtest do.
package meshinstall

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshlite/meshlite/cni/install"
	"github.com/meshlite/meshlite/cni/plugin"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
	meshinstall "github.com/meshlite/meshlite/meshctl/install"
)

const (
	// Namespace is where the sandbox's mesh runs.
	Namespace = "istio-system"
	// XDSConfigMap holds the address ztunnel dials istiod-lite at.
	XDSConfigMap = "ztunnel-xds"
	// FieldManager owns what this package applies.
	FieldManager = "meshlite-sandbox"
)

// Options say how to install.
type Options struct {
	// CaptureNamespaces limits the CNI agent to these namespaces (empty:
	// every enrolled namespace), so that tests sharing the sandbox keep
	// their ambient-labelled namespaces to themselves.
	CaptureNamespaces []string
	// Set are extra `--set` overrides, applied after the sandbox's.
	Set []string
	// Components limits the install to some of "istiod", "cni" and
	// "ztunnel" (empty: all three). The CRDs and the namespace always go.
	Components []string
	// Reuse accepts a mesh already installed (make demo's, or another
	// test's): Install then returns it as it is, and Uninstall leaves it.
	Reuse bool
	// Chart replaces the embedded chart (an upgrade test renders the next
	// chart version).
	Chart fs.FS
	// Timeout bounds the wait for each component's pods (default 2m).
	Timeout time.Duration
	Log     *slog.Logger
}

// SandboxValues are the chart overrides that fit the chart to sb.
func SandboxValues(sb *sandbox.Sandbox) []string {
	return []string{
		// kubelet-lite runs bin/<last path element of the image>.
		"image.registry=meshlite",
		"image.tag=dev",
		// Every node has its own root; the CNI agent writes socket paths
		// as kubelet-lite (which runs the plugin) sees them.
		"cni.hostRoot=" + filepath.Join(sb.Dir, "nodes") + "/$(NODE_NAME)/root",
		// No DNS or kube-proxy on the node network: ztunnel dials
		// istiod-lite's pod IP, which Install writes here, and waypoints
		// the pod IP of the replica that deployed them.
		"ztunnel.xdsAddressConfigMap=" + XDSConfigMap,
		"istiod.proxyXDSAddress=$(POD_IP):15012",
		// One replica (ztunnel dials one pod IP;
		// and CPU is scarce). The chart's default is two.
		"istiod.replicas=1",
		// istiod-lite runs as the chart says, uid 1337: kubelet-lite gives
		// the service-account token to the pod's user as a kubelet does.
	}
}

// component is one part of the mesh: its workload and pods' app label.
type component struct{ name, kind, app string }

// components are the parts Options.Components names, in install order.
var components = []component{
	{"istiod", "Deployment", "istiod"},
	{"cni", "DaemonSet", "istio-cni-node"},
	{"ztunnel", "DaemonSet", "ztunnel"},
}

// installedParts returns the mesh parts whose workload exists in the
// sandbox (whoever installed them: this package or make demo).
func installedParts(ctx context.Context, sb *sandbox.Sandbox) (map[string]bool, error) {
	have := map[string]bool{}
	apps := sb.Client().AppsV1()
	for _, c := range components {
		var err error
		if c.kind == "Deployment" {
			_, err = apps.Deployments(Namespace).Get(ctx, c.app, metav1.GetOptions{})
		} else {
			_, err = apps.DaemonSets(Namespace).Get(ctx, c.app, metav1.GetOptions{})
		}
		switch {
		case err == nil:
			have[c.name] = true
		case !apierrors.IsNotFound(err):
			return nil, fmt.Errorf("look for %s %s/%s: %w", c.kind, Namespace, c.app, err)
		}
	}
	return have, nil
}

// reusable checks that the installed mesh serves what opts ask for: every
// wanted part, and a CNI agent that captures opts.CaptureNamespaces (a
// mesh another test left behind captures that test's namespaces only).
func reusable(ctx context.Context, sb *sandbox.Sandbox, opts Options, have map[string]bool) error {
	want := opts.Components
	if len(want) == 0 {
		want = []string{"istiod", "cni", "ztunnel"}
	}
	var missing []string
	for _, w := range want {
		if !have[w] {
			missing = append(missing, w)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the mesh installed in the sandbox lacks %s (a partial install another test left?): remove it first", strings.Join(missing, ", "))
	}
	if !slices.Contains(want, "cni") || len(opts.CaptureNamespaces) == 0 {
		return nil
	}
	ds, err := sb.Client().AppsV1().DaemonSets(Namespace).Get(ctx, "istio-cni-node", metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("the installed CNI agent: %w", err)
	}
	var captured []string
	for _, c := range ds.Spec.Template.Spec.Containers {
		for _, a := range c.Args {
			if v, ok := strings.CutPrefix(a, "--capture-namespaces="); ok && v != "" {
				captured = append(captured, strings.Split(v, ",")...)
			}
		}
	}
	if len(captured) == 0 {
		return nil // every enrolled namespace
	}
	for _, ns := range opts.CaptureNamespaces {
		if !slices.Contains(captured, ns) {
			return fmt.Errorf("the CNI agent installed in the sandbox captures only %s, not %s (another test's mesh left behind?): remove it first",
				strings.Join(captured, ","), ns)
		}
	}
	return nil
}

// Mesh is a mesh Install put into the sandbox.
type Mesh struct {
	sb   *sandbox.Sandbox
	objs []*unstructured.Unstructured
	log  *slog.Logger
	// createdNamespace: Uninstall removes the namespace too.
	createdNamespace bool
	// reused: someone else's mesh, which Uninstall leaves alone.
	reused bool
	// IstiodIP is istiod-lite's pod IP.
	IstiodIP string
}

// Render renders the chart for sb with opts.
func Render(ctx context.Context, sb *sandbox.Sandbox, opts Options) ([]*unstructured.Unstructured, error) {
	set := SandboxValues(sb)
	if len(opts.CaptureNamespaces) > 0 {
		set = append(set, "cni.captureNamespaces={"+strings.Join(opts.CaptureNamespaces, ",")+"}")
	}
	set = append(set, opts.Set...)
	objs, err := meshinstall.Render(ctx, meshinstall.Options{Namespace: Namespace, Set: set, Chart: opts.Chart})
	if err != nil || len(opts.Components) == 0 {
		return objs, err
	}
	app := map[string]string{"istiod": "istiod", "cni": "istio-cni-node", "ztunnel": "ztunnel"}
	keep := map[string]bool{}
	for _, c := range opts.Components {
		a, ok := app[c]
		if !ok {
			return nil, fmt.Errorf("unknown component %q (istiod, cni or ztunnel)", c)
		}
		keep[a] = true
	}
	var out []*unstructured.Unstructured
	for _, o := range objs {
		a := o.GetLabels()["app"]
		if o.GetKind() == "CustomResourceDefinition" || o.GetKind() == "Namespace" || keep[a] {
			out = append(out, o)
		}
	}
	return out, nil
}

// Installed reports whether a mesh (any installer's, or any part of one:
// istiod-lite, the CNI agent or ztunnel) runs in the sandbox.
func Installed(ctx context.Context, sb *sandbox.Sandbox) (bool, error) {
	have, err := installedParts(ctx, sb)
	return len(have) > 0, err
}

// Install installs the chart and waits until istiod-lite, a CNI agent and
// a ztunnel on every node are ready. ztunnel goes last, once istiod-lite's
// address is in ConfigMap ztunnel-xds. It refuses to install over a mesh
// (or a part of one) already there, unless opts.Reuse accepts it; a reused
// mesh must have the parts opts ask for and capture its namespaces. On
// error, what was applied is removed again.
func Install(ctx context.Context, sb *sandbox.Sandbox, opts Options) (_ *Mesh, err error) {
	if opts.Timeout == 0 {
		opts.Timeout = 2 * time.Minute
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if have, err := installedParts(ctx, sb); err != nil {
		return nil, err
	} else if len(have) > 0 && opts.Reuse {
		if err := reusable(ctx, sb, opts, have); err != nil {
			return nil, err
		}
		m := &Mesh{sb: sb, log: opts.Log, reused: true}
		if have["istiod"] {
			istiod, err := sb.WaitPodsRunning(ctx, Namespace, "app=istiod", 1, opts.Timeout)
			if err != nil {
				return nil, fmt.Errorf("the installed mesh's istiod-lite is not ready: %w", err)
			}
			m.IstiodIP = istiod[0].Status.PodIP
		}
		for _, c := range components {
			if c.kind == "DaemonSet" && have[c.name] {
				if _, err := sb.WaitPodsRunning(ctx, Namespace, "app="+c.app, sb.Plan.Nodes, opts.Timeout); err != nil {
					return nil, fmt.Errorf("the installed mesh's %s is not ready: %w", c.app, err)
				}
			}
		}
		opts.Log.Info("using the mesh installed already", "istiod", m.IstiodIP)
		return m, nil
	} else if len(have) > 0 {
		var parts []string
		for _, c := range components {
			if have[c.name] {
				parts = append(parts, c.kind+" "+Namespace+"/"+c.app)
			}
		}
		return nil, fmt.Errorf("a mesh is installed in the sandbox already (%s); remove it first", strings.Join(parts, ", "))
	}
	for i := 0; i < sb.Plan.Nodes; i++ {
		if chained(sb, i) {
			return nil, fmt.Errorf("node %d chains %s but no mesh is installed (a leftover): recreate the sandbox", i, plugin.Type)
		}
	}
	objs, err := Render(ctx, sb, opts)
	if err != nil {
		return nil, err
	}
	m := &Mesh{sb: sb, objs: objs, log: opts.Log}
	_, nsErr := sb.Client().CoreV1().Namespaces().Get(ctx, Namespace, metav1.GetOptions{})
	m.createdNamespace = apierrors.IsNotFound(nsErr)
	defer func() {
		if err != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if uerr := m.Uninstall(ctx); uerr != nil {
				err = errors.Join(err, fmt.Errorf("clean up: %w", uerr))
			}
		}
	}()

	var first, ztunnel []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" && o.GetName() == "ztunnel" {
			ztunnel = append(ztunnel, o)
		} else {
			first = append(first, o)
		}
	}
	rc := sb.RESTConfig()
	start := time.Now()
	if err := meshinstall.Apply(ctx, rc, first, meshinstall.ApplyOptions{FieldManager: FieldManager}); err != nil {
		return m, err
	}
	if !renders(objs, "istiod") {
		// Without istiod-lite there is no address for ztunnel.
		return m, nil
	}
	istiod, err := sb.WaitPodsRunning(ctx, Namespace, "app=istiod", 1, opts.Timeout)
	if err != nil {
		return m, fmt.Errorf("istiod-lite not ready: %w\n%s", err, podLogs(sb, "app=istiod"))
	}
	m.IstiodIP = istiod[0].Status.PodIP
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: XDSConfigMap, Namespace: Namespace},
		Data: map[string]string{"address": m.IstiodIP + ":15012"}}
	cms := sb.Client().CoreV1().ConfigMaps(Namespace)
	if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		if err != nil {
			return m, fmt.Errorf("ConfigMap %s: %w", XDSConfigMap, err)
		}
	} else if err != nil {
		return m, fmt.Errorf("ConfigMap %s: %w", XDSConfigMap, err)
	}
	if err := meshinstall.Apply(ctx, rc, ztunnel, meshinstall.ApplyOptions{FieldManager: FieldManager}); err != nil {
		return m, err
	}
	for _, sel := range []string{"app=istio-cni-node", "app=ztunnel"} {
		if !renders(objs, strings.TrimPrefix(sel, "app=")) {
			continue
		}
		if _, err := sb.WaitPodsRunning(ctx, Namespace, sel, sb.Plan.Nodes, opts.Timeout); err != nil {
			return m, fmt.Errorf("%s not ready: %w\n%s", sel, err, podLogs(sb, sel))
		}
	}
	opts.Log.Info("mesh installed from the chart", "objects", len(objs), "took", time.Since(start).Round(time.Millisecond), "istiod", m.IstiodIP)
	return m, nil
}

// Upgrade applies the chart rendered with opts over the installed mesh, as
// `helm upgrade` would, and waits for the rollouts: istiod-lite first (its
// new pod's address goes into ConfigMap ztunnel-xds), then the CNI agents
// and ztunnel, which roll node by node (ztunnel with a surge pod beside the
// old one).
func (m *Mesh) Upgrade(ctx context.Context, opts Options) error {
	if m.reused {
		return errors.New("upgrade: the mesh is not this installer's")
	}
	if opts.Timeout == 0 {
		opts.Timeout = 3 * time.Minute
	}
	objs, err := Render(ctx, m.sb, opts)
	if err != nil {
		return err
	}
	var first, ztunnel []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" && o.GetName() == "ztunnel" {
			ztunnel = append(ztunnel, o)
		} else {
			first = append(first, o)
		}
	}
	rc := m.sb.RESTConfig()
	if err := meshinstall.Apply(ctx, rc, first, meshinstall.ApplyOptions{FieldManager: FieldManager}); err != nil {
		return err
	}
	m.objs = objs
	apps := m.sb.Client().AppsV1()
	err = m.sb.WaitFor(ctx, opts.Timeout, "istiod-lite rolled out", func(ctx context.Context) (bool, error) {
		d, err := apps.Deployments(Namespace).Get(ctx, "istiod", metav1.GetOptions{})
		if err != nil || d.Spec.Replicas == nil {
			return false, nil
		}
		n := *d.Spec.Replicas
		return d.Status.ObservedGeneration >= d.Generation && d.Status.UpdatedReplicas == n &&
			d.Status.Replicas == n && d.Status.AvailableReplicas == n, nil
	})
	if err != nil {
		return fmt.Errorf("%w\n%s", err, podLogs(m.sb, "app=istiod"))
	}
	pods, err := m.sb.WaitPodsRunning(ctx, Namespace, "app=istiod", 1, opts.Timeout)
	if err != nil {
		return err
	}
	for _, p := range pods {
		if p.DeletionTimestamp == nil {
			m.IstiodIP = p.Status.PodIP
		}
	}
	cms := m.sb.Client().CoreV1().ConfigMaps(Namespace)
	cm, err := cms.Get(ctx, XDSConfigMap, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("ConfigMap %s: %w", XDSConfigMap, err)
	}
	cm.Data = map[string]string{"address": m.IstiodIP + ":15012"}
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("ConfigMap %s: %w", XDSConfigMap, err)
	}
	if err := meshinstall.Apply(ctx, rc, ztunnel, meshinstall.ApplyOptions{FieldManager: FieldManager}); err != nil {
		return err
	}
	for _, name := range []string{"istio-cni-node", "ztunnel"} {
		if renders(objs, name) {
			if err := m.waitDaemonSet(ctx, name, opts.Timeout); err != nil {
				return err
			}
		}
	}
	return nil
}

// waitDaemonSet waits until DaemonSet name runs its current template on
// every node and the old pods are gone (a surge pod's predecessor drains).
func (m *Mesh) waitDaemonSet(ctx context.Context, name string, timeout time.Duration) error {
	apps := m.sb.Client().AppsV1()
	err := m.sb.WaitFor(ctx, timeout, name+" rolled out", func(ctx context.Context) (bool, error) {
		ds, err := apps.DaemonSets(Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		n := ds.Status.DesiredNumberScheduled
		if ds.Status.ObservedGeneration < ds.Generation || n == 0 || ds.Status.UpdatedNumberScheduled != n ||
			ds.Status.NumberAvailable != n || ds.Status.CurrentNumberScheduled != n {
			return false, nil
		}
		l, err := m.sb.Client().CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		return err == nil && len(l.Items) == int(n), nil
	})
	if err != nil {
		return fmt.Errorf("%w\n%s", err, podLogs(m.sb, "app="+name))
	}
	return nil
}

// Restart rolls the pods of a DaemonSet part ("ztunnel" or "cni") as
// `kubectl rollout restart` does, so that fresh processes run the same
// configuration, and waits until the old pods are gone.
func (m *Mesh) Restart(ctx context.Context, part string) error {
	if m.reused {
		return errors.New("restart: the mesh is not this installer's")
	}
	var name string
	for _, c := range components {
		if c.name == part && c.kind == "DaemonSet" {
			name = c.app
		}
	}
	if name == "" || !renders(m.objs, name) {
		return fmt.Errorf("restart: %q is not a DaemonSet this mesh installed (ztunnel or cni)", part)
	}
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`,
		time.Now().Format(time.RFC3339Nano))
	_, err := m.sb.Client().AppsV1().DaemonSets(Namespace).Patch(ctx, name, types.StrategicMergePatchType, []byte(patch),
		metav1.PatchOptions{FieldManager: FieldManager + "-restart"})
	if err != nil {
		return fmt.Errorf("restart %s: %w", name, err)
	}
	return m.waitDaemonSet(ctx, name, 3*time.Minute)
}

// Reused reports whether Install found the mesh installed already (and
// Uninstall leaves it).
func (m *Mesh) Reused() bool { return m.reused }

// Objects are the objects the chart rendered.
func (m *Mesh) Objects() []*unstructured.Unstructured { return m.objs }

// Uninstall deletes the chart's objects (CRDs stay, as with Helm; the
// namespace goes if Install created it), waits for the mesh's pods to go
// and fails if a node still chains mesh-cni afterwards (then it unchains it,
// as a pod could not start there otherwise).
func (m *Mesh) Uninstall(ctx context.Context) error {
	if m.reused {
		return nil
	}
	err := meshinstall.Uninstall(ctx, m.sb.RESTConfig(), m.objs, meshinstall.UninstallOptions{Wait: 90 * time.Second, Log: m.log})
	if derr := m.sb.Client().CoreV1().ConfigMaps(Namespace).Delete(ctx, XDSConfigMap, metav1.DeleteOptions{}); derr != nil && !apierrors.IsNotFound(derr) {
		err = errors.Join(err, fmt.Errorf("delete ConfigMap %s: %w", XDSConfigMap, derr))
	}
	for i := 0; i < m.sb.Plan.Nodes; i++ {
		if !chained(m.sb, i) {
			continue
		}
		err = errors.Join(err, fmt.Errorf("node %d still chains %s after the CNI agent was deleted", i, plugin.Type))
		conf := filepath.Join(m.sb.NodeRoot(i).CNIConfDir, netlab.ConflistName)
		if b, rerr := os.ReadFile(conf); rerr == nil {
			if out, changed, uerr := install.Unchain(b, plugin.Type); uerr == nil && changed {
				os.WriteFile(conf, out, 0o644)
			}
		}
	}
	if m.createdNamespace {
		if derr := m.sb.Client().CoreV1().Namespaces().Delete(ctx, Namespace, metav1.DeleteOptions{}); derr != nil && !apierrors.IsNotFound(derr) {
			err = errors.Join(err, fmt.Errorf("delete namespace %s: %w", Namespace, derr))
		} else {
			werr := m.sb.WaitFor(ctx, 60*time.Second, "namespace "+Namespace+" gone", func(ctx context.Context) (bool, error) {
				_, gerr := m.sb.Client().CoreV1().Namespaces().Get(ctx, Namespace, metav1.GetOptions{})
				return apierrors.IsNotFound(gerr), nil
			})
			err = errors.Join(err, werr)
		}
	}
	return err
}

// renders reports whether objs hold the workload labelled app=app.
func renders(objs []*unstructured.Unstructured, app string) bool {
	for _, o := range objs {
		if (o.GetKind() == "Deployment" || o.GetKind() == "DaemonSet") && o.GetLabels()["app"] == app {
			return true
		}
	}
	return false
}

// podLogs is the log (its last 60 lines) of every mesh pod matching
// selector, for errors.
func podLogs(sb *sandbox.Sandbox, selector string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := sb.Client().CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range l.Items {
		fmt.Fprintf(&b, "--- log of %s/%s (%s, %s):\n", Namespace, p.Name, p.Spec.NodeName, p.Status.Phase)
		var logb strings.Builder
		if len(p.Spec.Containers) > 0 {
			if err := sb.Logs(ctx, Namespace, p.Name, p.Spec.Containers[0].Name, false, &logb); err != nil {
				fmt.Fprintf(&b, "(%v)\n", err)
			}
		}
		lines := strings.Split(strings.TrimRight(logb.String(), "\n"), "\n")
		if len(lines) > 60 {
			lines = lines[len(lines)-60:]
		}
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	return b.String()
}

// chained reports whether node i's CNI config chains mesh-cni.
func chained(sb *sandbox.Sandbox, i int) bool {
	b, err := os.ReadFile(filepath.Join(sb.NodeRoot(i).CNIConfDir, netlab.ConflistName))
	if err != nil {
		return false
	}
	_, changed, err := install.Unchain(b, plugin.Type)
	return err == nil && changed
}

// Remove uninstalls a mesh this package installed in an earlier process
// (`make demo`'s): the chart rendered with opts names the objects to
// delete. The namespace stays. It checks the nodes as Uninstall does.
func Remove(ctx context.Context, sb *sandbox.Sandbox, opts Options) error {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	objs, err := Render(ctx, sb, opts)
	if err != nil {
		return err
	}
	m := &Mesh{sb: sb, objs: objs, log: opts.Log}
	return m.Uninstall(ctx)
}
