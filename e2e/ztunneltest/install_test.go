package ztunneltest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

const systemNS = meshinstall.Namespace

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

// installMesh installs the mesh from the Helm chart (deploy/helm/meshlite,
// through e2e/meshinstall, as `meshctl install` applies it), or uses the
// one running (make demo's, say) as it is. The CNI agent it installs
// captures only captureNS, so the other tests sharing the sandbox keep
// their ambient-labelled namespaces to themselves. What it installs is
// uninstalled when the test ends, and the nodes are checked unchained.
func (e *env) installMesh(t *testing.T, captureNS []string) {
	t.Helper()
	for _, b := range []string{"istiod-lite", "cni-agent", "mesh-cni", "ztunnel", "echo"} {
		if _, err := os.Stat(filepath.Join(e.repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing: run make build", b)
		}
	}
	mesh, err := meshinstall.Install(e.ctx, e.sb, meshinstall.Options{CaptureNamespaces: captureNS, Reuse: true})
	if err != nil {
		t.Fatalf("install the mesh from the chart: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := mesh.Uninstall(ctx); err != nil {
			t.Errorf("uninstall the mesh: %v", err)
		}
	})
	e.istiodIP = mesh.IstiodIP

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
