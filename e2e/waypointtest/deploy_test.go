package waypointtest

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

// WPCaptureNamespaces are the namespaces the CNI agent installed by
// wpStart captures: tests of this package enroll only these (the shared
// sandbox's other tests keep theirs to themselves).
var WPCaptureNamespaces = []string{"waypointtest-deploy", "waypointtest-traffic", "waypointtest-a", "waypointtest-b"}

// wpEnv is the sandbox with the mesh installed.
type wpEnv struct {
	*meshharness.Env
	gc gatewayclient.Interface
}

// wpStart opens the sandbox and installs the mesh from the Helm chart
// (istiod-lite with its waypoint controller, the CNI agent capturing
// WPCaptureNamespaces, ztunnel), after this tree's CRDs, or uses the one
// running; what it installs is removed when the test ends.
func wpStart(t *testing.T) *wpEnv {
	t.Helper()
	h := meshharness.StartWith(t, meshharness.Options{
		Timeout:           8 * time.Minute,
		CaptureNamespaces: WPCaptureNamespaces,
		Binaries:          []string{"waypoint"},
		CRDs:              true,
	})
	gc, err := gatewayclient.NewForConfig(h.Sandbox.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	return &wpEnv{Env: h, gc: gc}
}

// wpDump is the part of ztunnel's /config_dump the tests read.
type wpDump struct {
	Workloads []struct {
		UID            string   `json:"uid"`
		Name           string   `json:"name"`
		Namespace      string   `json:"namespace"`
		Addresses      []string `json:"addresses"`
		Protocol       string   `json:"protocol"`
		ServiceAccount string   `json:"service_account"`
		Waypoint       string   `json:"waypoint"`
		Services       []string `json:"services"`
		Status         string   `json:"status"`
	} `json:"workloads"`
	Services []struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
		Hostname  string `json:"hostname"`
		Waypoint  string `json:"waypoint"`
	} `json:"services"`
}

// ztunnelDump reads node i's ztunnel /config_dump.
func (e *wpEnv) ztunnelDump(t *testing.T, node int) wpDump {
	t.Helper()
	var d wpDump
	if err := json.Unmarshal(e.Admin(t, node, "/config_dump"), &d); err != nil {
		t.Fatalf("decode config_dump of node %d: %v", node, err)
	}
	return d
}

func wpOwnedBy(m metav1.Object, gw *gatewayv1.Gateway) error {
	for _, r := range m.GetOwnerReferences() {
		if r.Kind == "Gateway" && r.APIVersion == "gateway.networking.k8s.io/v1" && r.Name == gw.Name && r.UID == gw.UID {
			return nil
		}
	}
	return fmt.Errorf("%s/%s is not owned by Gateway %s: %v", m.GetNamespace(), m.GetName(), gw.Name, m.GetOwnerReferences())
}

// TestWaypointDeploy applies a waypoint Gateway to an enrolled namespace
// whose Service uses it, and checks what istiod-lite makes of it, that the
// waypoint runs, that ztunnel binds the Service to it, and that deleting
// the Gateway removes it all.
func TestWaypointDeploy(t *testing.T) {
	e := wpStart(t)
	ns := "waypointtest-deploy"
	cs := e.Sandbox.Client()
	e.DeleteNamespacesAtEnd(t, ns)
	node0 := e.Sandbox.NodeName(0)
	if _, err := e.Sandbox.Apply(e.Ctx, fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: %[1]s}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: %[1]s}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo
  namespace: %[1]s
  labels: {app: echo}
spec:
  nodeName: %[2]s
  serviceAccountName: echo
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "", --grpc-ports, ""]
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
      periodSeconds: 1
`, ns, node0)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := e.Sandbox.Apply(e.Ctx, fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: %s
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
`, ns)); err != nil {
		t.Fatal(err)
	}
	gw, err := e.gc.GatewayV1().Gateways(ns).Get(e.Ctx, "waypoint", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("ControllerMakesOwnedChildrenAndStatus", func(t *testing.T) {
		gc, err := e.gc.GatewayV1().GatewayClasses().Get(e.Ctx, "istio-waypoint", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("GatewayClass istio-waypoint: %v", err)
		}
		if gc.Spec.ControllerName != "istio.io/mesh-controller" || meta.FindStatusCondition(gc.Status.Conditions, "Accepted") == nil ||
			meta.FindStatusCondition(gc.Status.Conditions, "Accepted").Status != metav1.ConditionTrue {
			t.Errorf("GatewayClass %s: controller %q, conditions %v", gc.Name, gc.Spec.ControllerName, gc.Status.Conditions)
		}
		var last error
		err = e.Sandbox.WaitFor(e.Ctx, 30*time.Second, "ServiceAccount, Deployment and Service owned by the Gateway, status Programmed",
			func(ctx context.Context) (bool, error) {
				sa, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "waypoint", metav1.GetOptions{})
				if last = err; err != nil {
					return false, nil
				}
				dep, err := cs.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{})
				if last = err; err != nil {
					return false, nil
				}
				svc, err := cs.CoreV1().Services(ns).Get(ctx, "waypoint", metav1.GetOptions{})
				if last = err; err != nil {
					return false, nil
				}
				for _, o := range []metav1.Object{sa, dep, svc} {
					if last = wpOwnedBy(o, gw); last != nil {
						return false, nil
					}
				}
				g, err := e.gc.GatewayV1().Gateways(ns).Get(ctx, "waypoint", metav1.GetOptions{})
				if last = err; err != nil {
					return false, nil
				}
				p := meta.FindStatusCondition(g.Status.Conditions, "Programmed")
				a := meta.FindStatusCondition(g.Status.Conditions, "Accepted")
				if p == nil || p.Status != metav1.ConditionTrue || a == nil || a.Status != metav1.ConditionTrue {
					last = fmt.Errorf("conditions %v", g.Status.Conditions)
					return false, nil
				}
				host := "waypoint." + ns + ".svc.cluster.local"
				if len(g.Status.Addresses) == 0 || g.Status.Addresses[0].Value != host ||
					*g.Status.Addresses[0].Type != gatewayv1.HostnameAddressType {
					last = fmt.Errorf("addresses %v, want hostname %s first", g.Status.Addresses, host)
					return false, nil
				}
				return true, nil
			})
		if err != nil {
			t.Fatalf("%v: %v", err, last)
		}
		t.Logf("children and status Programmed %v after the Gateway", time.Since(start).Round(time.Millisecond))
	})

	t.Run("WaypointPodRunsReady", func(t *testing.T) {
		pods, err := e.Sandbox.WaitPodsRunning(e.Ctx, ns, "gateway.networking.k8s.io/gateway-name=waypoint", 1, 2*time.Minute)
		if err != nil {
			t.Fatalf("waypoint pod not ready: %v\n%s", err, e.PodLogs(ns, "gateway.networking.k8s.io/gateway-name=waypoint"))
		}
		p := pods[0]
		if p.Spec.ServiceAccountName != "waypoint" || p.Labels["istio.io/dataplane-mode"] != "none" {
			t.Errorf("waypoint pod: service account %q, labels %v", p.Spec.ServiceAccountName, p.Labels)
		}
		t.Logf("waypoint pod %s ready %v after the Gateway", p.Name, time.Since(start).Round(time.Millisecond))
	})

	t.Run("ZtunnelBindsTheServiceToTheWaypoint", func(t *testing.T) {
		wantWP := ns + "/waypoint." + ns + ".svc.cluster.local:15008"
		svcKey := ns + "/waypoint." + ns + ".svc.cluster.local"
		var d wpDump
		err := e.Sandbox.WaitFor(e.Ctx, 60*time.Second, "ztunnel to show echo bound to the waypoint and the waypoint's pod",
			func(context.Context) (bool, error) {
				d = e.ztunnelDump(t, 0)
				bound, wpPod := false, false
				for _, s := range d.Services {
					if s.Namespace == ns && s.Name == "echo" && s.Waypoint == wantWP {
						bound = true
					}
				}
				for _, w := range d.Workloads {
					// The waypoint's pod: its own identity, behind its
					// Service, healthy, and itself sent to no waypoint.
					if w.Namespace == ns && strings.HasPrefix(w.Name, "waypoint-") && w.ServiceAccount == "waypoint" &&
						slices.Contains(w.Services, svcKey) && w.Status == "HEALTHY" && w.Waypoint == "" {
						wpPod = true
					}
				}
				return bound && wpPod, nil
			})
		if err != nil {
			b, _ := json.MarshalIndent(d, "", " ")
			t.Fatalf("%v; node 0's ztunnel holds:\n%s", err, b)
		}
		for _, w := range d.Workloads {
			if w.Namespace == ns && w.Name == "echo" && w.Waypoint != "" {
				t.Errorf("echo's workload got waypoint %q from a service-only waypoint", w.Waypoint)
			}
		}
	})

	t.Run("DeletingTheGatewayRemovesItsChildren", func(t *testing.T) {
		if err := e.gc.GatewayV1().Gateways(ns).Delete(e.Ctx, "waypoint", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		del := time.Now()
		var last string
		err := e.Sandbox.WaitFor(e.Ctx, 90*time.Second, "the waypoint's objects and pods gone", func(ctx context.Context) (bool, error) {
			var left []string
			if _, err := cs.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				left = append(left, "deployment")
			}
			if _, err := cs.CoreV1().Services(ns).Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				left = append(left, "service")
			}
			if _, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				left = append(left, "serviceaccount")
			}
			if l, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"}); err != nil || len(l.Items) > 0 {
				left = append(left, "pods")
			}
			last = strings.Join(left, ", ")
			return len(left) == 0, nil
		})
		if err != nil {
			t.Fatalf("%v: left %s", err, last)
		}
		t.Logf("children gone %v after the Gateway was deleted", time.Since(del).Round(time.Millisecond))
		// And ztunnel unbinds the Service.
		err = e.Sandbox.WaitFor(e.Ctx, 30*time.Second, "ztunnel to unbind echo", func(context.Context) (bool, error) {
			for _, s := range e.ztunnelDump(t, 0).Services {
				if s.Namespace == ns && s.Name == "echo" {
					return s.Waypoint == "", nil
				}
			}
			return false, nil
		})
		if err != nil {
			t.Error(err)
		}
	})
}
