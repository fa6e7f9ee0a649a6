package meshharness

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

// Deploy puts a suite's sample app into the sandbox: it applies objects
// (YAML documents: namespaces, service accounts, services), waits for the
// "default" ServiceAccount of every namespace a pod goes to (pods are
// admitted only once their ServiceAccount exists, and the controller
// manager makes "default" a moment after the namespace), applies pods
// (EchoPod documents), and waits until each of those namespaces runs
// exactly its pods, ready. The namespaces among objects are deleted when
// the test ends, and waited for, so that their pods go while the CNI agent
// and ztunnel still run: call Deploy after Start.
func (e *Env) Deploy(t testing.TB, objects, pods []string) {
	t.Helper()
	objectsYAML, podsYAML := strings.Join(objects, "\n---\n"), strings.Join(pods, "\n---\n")
	objs, err := manifest.Decode([]byte(objectsYAML))
	if err != nil {
		t.Fatalf("decode the sample app: %v", err)
	}
	for _, o := range objs {
		if o.GetKind() == "Namespace" && o.GetAPIVersion() == "v1" {
			e.DeleteNamespacesAtEnd(t, o.GetName())
		}
	}
	podObjs, err := manifest.Decode([]byte(podsYAML))
	if err != nil {
		t.Fatalf("decode the sample app's pods: %v", err)
	}
	var namespaces []string // in order of first use
	count := map[string]int{}
	for _, p := range podObjs {
		ns := p.GetNamespace()
		if count[ns] == 0 {
			namespaces = append(namespaces, ns)
		}
		count[ns]++
	}

	if _, err := e.Sandbox.Apply(e.Ctx, objectsYAML); err != nil {
		t.Fatalf("deploy the sample app: %v", err)
	}
	cs := e.Sandbox.Client()
	e.Eventually(t, 30*time.Second, "default ServiceAccounts", func() bool {
		for _, ns := range namespaces {
			if _, err := cs.CoreV1().ServiceAccounts(ns).Get(e.Ctx, "default", metav1.GetOptions{}); err != nil {
				return false
			}
		}
		return true
	})
	if _, err := e.Sandbox.Apply(e.Ctx, podsYAML); err != nil {
		t.Fatalf("deploy the sample app's pods: %v", err)
	}
	for _, ns := range namespaces {
		if _, err := e.Sandbox.WaitPodsRunning(e.Ctx, ns, "", count[ns], 90*time.Second); err != nil {
			t.Fatalf("pods in %s: %v\n%s\n%s", ns, err,
				e.PodLogs(meshinstall.Namespace, "app=istio-cni-node"), e.PodLogs(meshinstall.Namespace, "app=ztunnel"))
		}
	}
}

// DeleteNamespacesAtEnd deletes the namespaces names when the test ends,
// all at once, and waits until they are gone (90 s for them all), so that
// their pods go while the CNI agent and ztunnel still run: call it after
// Start, or after the mesh was installed.
func (e *Env) DeleteNamespacesAtEnd(t testing.TB, names ...string) {
	cs := e.Sandbox.Client()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		for _, ns := range names {
			if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				t.Errorf("delete namespace %s: %v", ns, err)
			}
		}
		for _, ns := range names {
			err := sandbox.WaitFor(ctx, 80*time.Second, "namespace "+ns+" gone", func(ctx context.Context) (bool, error) {
				_, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
				return apierrors.IsNotFound(err), nil
			})
			if err != nil {
				t.Error(err)
			}
		}
	})
}

// Namespace is a namespace, enrolled in the mesh (labelled
// istio.io/dataplane-mode=ambient) if enrolled says so.
func Namespace(name string, enrolled bool) string {
	if enrolled {
		return fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n  labels: {istio.io/dataplane-mode: ambient}\n", name)
	}
	return fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", name)
}

// ServiceAccount is service account name in namespace ns.
func ServiceAccount(ns, name string) string {
	return fmt.Sprintf("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: %s, namespace: %s}\n", name, ns)
}

// EchoService is Service name in namespace ns in front of the EchoPods
// labelled app=name: HTTP on port 80 (to 8080) and line echo on 9090.
func EchoService(ns, name string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %[2]s, namespace: %[1]s}
spec:
  selector: {app: %[2]s}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp, port: 9090, targetPort: 9090}
`, ns, name)
}

// EchoPod is a bin/echo server pinned to a node, labelled app=app, with
// the downward-API env it reports itself with and a readiness probe on its
// HTTP port (which reaches an enrolled pod through the CNI's probe SNAT
// exemption). It serves HTTP on 8080 and echoes lines on TCP 9090.
func EchoPod(ns, name, node, sa, app string) string {
	return EchoPodWithLabels(ns, name, node, sa, map[string]string{"app": app})
}

// EchoPodWithLabels is EchoPod with labels in place of app=<app>: for a
// pod that opts out of the mesh (istio.io/dataplane-mode: none), or one a
// selector other than app picks.
func EchoPodWithLabels(ns, name, node, sa string, labels map[string]string) string {
	l := make([]string, 0, len(labels))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		// Quoted: a bare yes, n or 1 is no string in YAML.
		l = append(l, strconv.Quote(k)+": "+strconv.Quote(labels[k]))
	}
	return fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata:
  name: %[2]s
  namespace: %[1]s
  labels: {%[5]s}
spec:
  nodeName: %[3]s
  serviceAccountName: %[4]s
  terminationGracePeriodSeconds: 1
  containers:
%[6]s    readinessProbe:
      httpGet: {path: /ready, port: 8080}
      periodSeconds: 1
`, ns, name, node, sa, strings.Join(l, ", "), EchoContainer("  "))
}

// EchoContainer is the container of an echo server (bin/echo, image
// meshlite/echo:dev) as an item of a YAML list of containers, each line
// indented by indent: HTTP on 8080, lines echoed on TCP 9090, and the
// downward-API env it reports itself with (pod, namespace, IP, node). The
// caller adds the container's other fields (a readiness probe, ports)
// after it, indented by indent and two spaces: EchoPod's spec, or a
// Deployment's pod template.
func EchoContainer(indent string) string {
	var b strings.Builder
	for _, l := range []string{
		`- name: echo`,
		`  image: meshlite/echo:dev`,
		`  args: [server, --http-ports, "8080", --tcp-ports, "9090", --grpc-ports, ""]`,
		`  env:`,
		`  - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}`,
		`  - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}`,
		`  - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}`,
		`  - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}`,
	} {
		b.WriteString(indent + l + "\n")
	}
	return b.String()
}
