package ztunneltest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"github.com/meshlite/meshlite/cni/install"
	"github.com/meshlite/meshlite/cni/plugin"
	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

const (
	systemNS = "istio-system"
	// xdsConfigMap holds the address ztunnel dials istiod-lite at (the
	// sandbox has no cluster DNS; see e2e/manifests/ztunnel.yaml).
	xdsConfigMap = "ztunnel-xds"
)

// objects gets and deletes manifest objects of any kind.
type objects struct {
	applier *manifest.Applier
	mapper  *restmapper.DeferredDiscoveryRESTMapper
	dyn     dynamic.Interface
}

func newObjects(sb *sandbox.Sandbox) (*objects, error) {
	rc := sb.RESTConfig()
	a, err := manifest.NewApplier(rc, "ztunneltest")
	if err != nil {
		return nil, err
	}
	dc, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &objects{applier: a, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)), dyn: dyn}, nil
}

// absent returns the objects of objs the cluster does not have yet.
func (o *objects) absent(ctx context.Context, objs []*unstructured.Unstructured) ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	for _, u := range objs {
		gvk := u.GroupVersionKind()
		m, err := o.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return nil, fmt.Errorf("map %s: %w", gvk, err)
		}
		var ri dynamic.ResourceInterface = o.dyn.Resource(m.Resource)
		if u.GetNamespace() != "" {
			ri = o.dyn.Resource(m.Resource).Namespace(u.GetNamespace())
		}
		_, err = ri.Get(ctx, u.GetName(), metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			out = append(out, u)
		case err != nil:
			return nil, fmt.Errorf("get %s %s: %w", u.GetKind(), u.GetName(), err)
		}
	}
	return out, nil
}

// readManifest decodes e2e/manifests/<file>.
func readManifest(t *testing.T, repo, file string) []*unstructured.Unstructured {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repo, "e2e", "manifests", file))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := manifest.Decode(raw)
	if err != nil {
		t.Fatalf("e2e/manifests/%s: %v", file, err)
	}
	return objs
}

// component is one mesh part installed from its manifest.
type component struct {
	file string
	// kind and name are the workload in istio-system that says the part
	// is installed; selector finds its pods; perNode says one per node.
	kind, name, selector string
	perNode              bool
	// edit adapts the manifest's objects to this sandbox (nil: as is).
	edit func(t *testing.T, objs []*unstructured.Unstructured)
}

// installed reports whether c's workload exists.
func (e *env) installed(c component) (bool, error) {
	var err error
	switch c.kind {
	case "Deployment":
		_, err = e.sb.Client().AppsV1().Deployments(systemNS).Get(e.ctx, c.name, metav1.GetOptions{})
	case "DaemonSet":
		_, err = e.sb.Client().AppsV1().DaemonSets(systemNS).Get(e.ctx, c.name, metav1.GetOptions{})
	default:
		return false, fmt.Errorf("unknown workload kind %s", c.kind)
	}
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	return err == nil, err
}

// install applies c's manifest unless c is installed already (a mesh
// someone else put in the shared sandbox, `make demo`'s for instance, is
// used as it is and left alone), then waits for its pods to be ready. The
// objects it creates are deleted when the test ends, dependents first
// (Cleanups run last-in first-out); the istio-system namespace stays, as
// other components share it. It returns whether it installed c.
func (e *env) install(t *testing.T, c component) bool {
	t.Helper()
	have, err := e.installed(c)
	if err != nil {
		t.Fatal(err)
	}
	if have {
		t.Logf("%s %s/%s is installed already: using it as it is", c.kind, systemNS, c.name)
	} else {
		objs := readManifest(t, e.repo, c.file)
		if c.edit != nil {
			c.edit(t, objs)
		}
		created, err := e.objs.absent(e.ctx, objs)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.uninstall(t, c, created) })
		if _, err := e.objs.applier.Apply(e.ctx, objs...); err != nil {
			t.Fatalf("apply %s: %v", c.file, err)
		}
	}
	n := 1
	if c.perNode {
		n = e.sb.Plan.Nodes
	}
	start := time.Now()
	if _, err := e.sb.WaitPodsRunning(e.ctx, systemNS, c.selector, n, 2*time.Minute); err != nil {
		t.Fatalf("%s not ready: %v\n%s", c.name, err, e.podLogs(systemNS, c.selector))
	}
	t.Logf("%s ready in %v", c.name, time.Since(start).Round(time.Millisecond))
	return !have
}

// uninstall deletes what install created, all at once as `kubectl delete
// -f` does (the cni-agent watches its DaemonSet, so it uninstalls itself
// from its node even though its ServiceAccount and RBAC go with it), and
// waits for the pods to go. Should a node still chain mesh-cni after that,
// the shared sandbox would start no pod there, so the test fails and
// unchains it.
func (e *env) uninstall(t *testing.T, c component, created []*unstructured.Unstructured) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var objs []*unstructured.Unstructured
	for _, o := range slices.Backward(created) {
		if o.GetKind() != "Namespace" {
			objs = append(objs, o)
		}
	}
	if err := e.objs.applier.Delete(ctx, objs...); err != nil {
		t.Errorf("delete %s: %v", c.file, err)
	}
	err := sandbox.WaitFor(ctx, 80*time.Second, c.name+" pods gone", func(ctx context.Context) (bool, error) {
		l, err := e.sb.Client().CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: c.selector})
		return err == nil && len(l.Items) == 0, nil
	})
	if err != nil {
		t.Errorf("uninstall %s: %v", c.name, err)
	}
	if c.name != "istio-cni-node" {
		return
	}
	for i := 0; i < e.sb.Plan.Nodes; i++ {
		conf := filepath.Join(e.sb.NodeRoot(i).CNIConfDir, netlab.ConflistName)
		b, err := os.ReadFile(conf)
		if err != nil {
			t.Errorf("node %d: %v", i, err)
			continue
		}
		if out, changed, err := install.Unchain(b, plugin.Type); err == nil && changed {
			t.Errorf("node %d still chains %s after the CNI agent was deleted; unchaining it", i, plugin.Type)
			if err := os.WriteFile(conf, out, 0o644); err != nil {
				t.Errorf("node %d: %v", i, err)
			}
		}
	}
}

// podLogs is the log of every pod matching selector in ns, for failures.
func (e *env) podLogs(ns, selector string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := e.sb.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range l.Items {
		fmt.Fprintf(&b, "--- log of %s/%s (%s, %s):\n", ns, p.Name, p.Spec.NodeName, p.Status.Phase)
		if len(p.Spec.Containers) > 0 {
			if err := e.sb.Logs(ctx, ns, p.Name, p.Spec.Containers[0].Name, false, &b); err != nil {
				fmt.Fprintf(&b, "(%v)\n", err)
			}
		}
	}
	return b.String()
}

// installMesh installs istiod-lite, the CNI agent and ztunnel from
// e2e/manifests (or uses the ones running). The agent it installs captures
// only captureNS, so the other tests sharing the sandbox keep their
// ambient-labelled namespaces to themselves.
func (e *env) installMesh(t *testing.T, captureNS []string) {
	t.Helper()
	for _, b := range []string{"istiod-lite", "cni-agent", "mesh-cni", "ztunnel", "echo"} {
		if _, err := os.Stat(filepath.Join(e.repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing: run make build", b)
		}
	}
	e.install(t, component{file: "istiod-lite.yaml", kind: "Deployment", name: "istiod", selector: "app=istiod"})
	istiod, err := e.sb.WaitPodsRunning(e.ctx, systemNS, "app=istiod", 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	e.istiodIP = istiod[0].Status.PodIP

	cni := component{file: "cni-agent.yaml", kind: "DaemonSet", name: "istio-cni-node"}
	if have, err := e.installed(cni); err != nil {
		t.Fatal(err)
	} else if !have {
		for i := 0; i < e.sb.Plan.Nodes; i++ {
			b, _ := os.ReadFile(filepath.Join(e.sb.NodeRoot(i).CNIConfDir, netlab.ConflistName))
			if _, chained, _ := install.Unchain(b, plugin.Type); chained {
				t.Fatalf("node %d chains %s but no CNI agent is installed (a leftover): no pod can start there; "+
					"run `bin/cni-agent uninstall` in the node or recreate the sandbox", i, plugin.Type)
			}
		}
	}
	e.install(t, component{file: "cni-agent.yaml", kind: "DaemonSet", name: "istio-cni-node", selector: "app=istio-cni-node", perNode: true,
		edit: func(t *testing.T, objs []*unstructured.Unstructured) {
			editArgs(t, objs, "istio-cni-node", func(args []string) []string {
				for i, a := range args {
					// The manifest's node roots are the default state dir's.
					args[i] = strings.Replace(a, "--host-root="+sandbox.DefaultStateDir+"/", "--host-root="+e.sb.Dir+"/", 1)
				}
				return append(args, "--capture-namespaces="+strings.Join(captureNS, ","))
			})
		}})

	ztunnel := component{file: "ztunnel.yaml", kind: "DaemonSet", name: "ztunnel", selector: "app=ztunnel", perNode: true}
	if have, err := e.installed(ztunnel); err != nil {
		t.Fatal(err)
	} else if !have {
		// Where ztunnel finds istiod-lite; created before ztunnel, deleted
		// after it.
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: xdsConfigMap, Namespace: systemNS},
			Data: map[string]string{"address": e.istiodIP + ":15012"}}
		cms := e.sb.Client().CoreV1().ConfigMaps(systemNS)
		_, err := cms.Create(e.ctx, cm, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			_, err = cms.Update(e.ctx, cm, metav1.UpdateOptions{})
		} else if err == nil {
			t.Cleanup(func() {
				if err := cms.Delete(context.Background(), xdsConfigMap, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
					t.Errorf("delete ConfigMap %s: %v", xdsConfigMap, err)
				}
			})
		}
		if err != nil {
			t.Fatalf("ConfigMap %s: %v", xdsConfigMap, err)
		}
	}
	e.install(t, ztunnel)

	l, err := e.sb.Client().CoreV1().Pods(systemNS).List(e.ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
	if err != nil {
		t.Fatal(err)
	}
	e.ztunnel = map[string]string{}
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			e.ztunnel[p.Spec.NodeName] = p.Name
		}
	}
}

// editArgs rewrites the first container's args of the workload named name.
func editArgs(t *testing.T, objs []*unstructured.Unstructured, name string, f func([]string) []string) {
	t.Helper()
	for _, o := range objs {
		if o.GetName() != name || (o.GetKind() != "DaemonSet" && o.GetKind() != "Deployment") {
			continue
		}
		cs, _, err := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		if err != nil || len(cs) == 0 {
			t.Fatalf("%s %s: no containers (%v)", o.GetKind(), name, err)
		}
		c := cs[0].(map[string]any)
		args, _, _ := unstructured.NestedStringSlice(c, "args")
		args = f(args)
		anyArgs := make([]any, len(args))
		for i, a := range args {
			anyArgs[i] = a
		}
		c["args"] = anyArgs
		if err := unstructured.SetNestedSlice(o.Object, cs, "spec", "template", "spec", "containers"); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("no workload %s in the manifest", name)
}
