package meshctltest

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

	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

const systemNS = "istio-system"

// installMesh installs istiod-lite, the CNI agent (capturing only
// captureNS, so other packages' ambient namespaces stay theirs) and ztunnel
// from e2e/manifests, unless they run already (a mesh someone else put in
// the shared sandbox is used as it is and left alone). What it creates goes
// when the test ends, dependents first.
func installMesh(t *testing.T, ctx context.Context, sb *sandbox.Sandbox, repo string, captureNS []string) {
	t.Helper()
	applier, err := manifest.NewApplier(sb.RESTConfig(), "meshctltest")
	if err != nil {
		t.Fatal(err)
	}
	cs := sb.Client()
	installed := func(kind, name string) bool {
		var err error
		if kind == "Deployment" {
			_, err = cs.AppsV1().Deployments(systemNS).Get(ctx, name, metav1.GetOptions{})
		} else {
			_, err = cs.AppsV1().DaemonSets(systemNS).Get(ctx, name, metav1.GetOptions{})
		}
		if err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
		return err == nil
	}
	apply := func(file, kind, name, selector string, n int, edit func([]*unstructured.Unstructured)) {
		t.Helper()
		if installed(kind, name) {
			t.Logf("%s %s/%s is installed already: using it as it is", kind, systemNS, name)
		} else {
			raw, err := os.ReadFile(filepath.Join(repo, "e2e", "manifests", file))
			if err != nil {
				t.Fatal(err)
			}
			objs, err := manifest.Decode(raw)
			if err != nil {
				t.Fatalf("e2e/manifests/%s: %v", file, err)
			}
			if edit != nil {
				edit(objs)
			}
			var created []*unstructured.Unstructured
			for _, o := range objs {
				// The namespace is shared with other components; the rest is ours.
				if o.GetKind() != "Namespace" {
					created = append(created, o)
				}
			}
			t.Cleanup(func() { uninstall(t, applier, sb, created, selector) })
			if _, err := applier.Apply(ctx, objs...); err != nil {
				t.Fatalf("apply %s: %v", file, err)
			}
		}
		if _, err := sb.WaitPodsRunning(ctx, systemNS, selector, n, 2*time.Minute); err != nil {
			t.Fatalf("%s not ready: %v", name, err)
		}
	}
	apply("istiod-lite.yaml", "Deployment", "istiod", "app=istiod", 1, nil)
	istiod, err := sb.WaitPodsRunning(ctx, systemNS, "app=istiod", 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	apply("cni-agent.yaml", "DaemonSet", "istio-cni-node", "app=istio-cni-node", sb.Plan.Nodes, func(objs []*unstructured.Unstructured) {
		editArgs(t, objs, "istio-cni-node", func(args []string) []string {
			for i, a := range args {
				args[i] = strings.Replace(a, "--host-root="+sandbox.DefaultStateDir+"/", "--host-root="+sb.Dir+"/", 1)
			}
			return append(args, "--capture-namespaces="+strings.Join(captureNS, ","))
		})
	})
	if !installed("DaemonSet", "ztunnel") {
		// Where ztunnel finds istiod-lite (no cluster DNS in the sandbox).
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-xds", Namespace: systemNS},
			Data: map[string]string{"address": istiod[0].Status.PodIP + ":15012"}}
		cms := cs.CoreV1().ConfigMaps(systemNS)
		_, err := cms.Create(ctx, cm, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		} else if err == nil {
			t.Cleanup(func() { _ = cms.Delete(context.Background(), "ztunnel-xds", metav1.DeleteOptions{}) })
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	apply("ztunnel.yaml", "DaemonSet", "ztunnel", "app=ztunnel", sb.Plan.Nodes, nil)
}

func uninstall(t *testing.T, applier *manifest.Applier, sb *sandbox.Sandbox, created []*unstructured.Unstructured, selector string) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// Dependents first, as kubectl delete -f does in reverse.
	if err := applier.Delete(ctx, slices.Collect(func(yield func(*unstructured.Unstructured) bool) {
		for _, o := range slices.Backward(created) {
			if !yield(o) {
				return
			}
		}
	})...); err != nil {
		t.Errorf("uninstall: %v", err)
	}
	err := sandbox.WaitFor(ctx, 80*time.Second, selector+" pods gone", func(ctx context.Context) (bool, error) {
		l, err := sb.Client().CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: selector})
		return err == nil && len(l.Items) == 0, nil
	})
	if err != nil {
		t.Errorf("uninstall: %v", err)
	}
}

// editArgs rewrites the first container's args of workload name.
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

// echoPod is a bin/echo server pinned to a node.
func echoPod(ns, name, node, sa string, labels string) string {
	return fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata:
  name: %[2]s
  namespace: %[1]s
  labels: {app: echo%[5]s}
spec:
  nodeName: %[3]s
  serviceAccountName: %[4]s
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "9090", --grpc-ports, ""]
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
      periodSeconds: 1
`, ns, name, node, sa, labels)
}
