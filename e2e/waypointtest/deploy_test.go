package waypointtest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/nsenter"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

const wpSystemNS = meshinstall.Namespace

// WPCaptureNamespaces are the namespaces the CNI agent installed by
// wpStart captures: tests of this package enroll only these (the shared
// sandbox's other tests keep theirs to themselves).
var WPCaptureNamespaces = []string{"waypointtest-deploy", "waypointtest-traffic", "waypointtest-a", "waypointtest-b"}

// wpEnv is the sandbox with the mesh installed.
type wpEnv struct {
	sb       *sandbox.Sandbox
	ctx      context.Context
	repo     string
	gc       gatewayclient.Interface
	istiodIP string
	// ztunnel is the ztunnel pod of each node, by node name.
	ztunnel map[string]string
}

// wpStart opens the sandbox and installs the mesh from the Helm chart
// (istiod-lite with its waypoint controller, the CNI agent capturing
// WPCaptureNamespaces, ztunnel), or uses the one running; what it installs
// is removed when the test ends.
func wpStart(t *testing.T) *wpEnv {
	t.Helper()
	sb := sandbox.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	t.Cleanup(cancel)
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"istiod-lite", "cni-agent", "mesh-cni", "ztunnel", "waypoint", "echo"} {
		if _, err := os.Stat(filepath.Join(repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing: run make build", b)
		}
	}
	rc := sb.RESTConfig()
	e := &wpEnv{sb: sb, ctx: ctx, repo: repo}
	if e.gc, err = gatewayclient.NewForConfig(rc); err != nil {
		t.Fatal(err)
	}
	// The CRDs of this tree (Gateway API experimental channel, TrafficPolicy):
	// a sandbox brought up by an older tree lacks them; applying is
	// idempotent and what a fresh `sandbox up` does.
	if err := cluster.InstallCRDs(ctx, rc, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.installMesh(t)
	t.Logf("mesh ready in %v (istiod-lite at %s)", time.Since(start).Round(time.Millisecond), e.istiodIP)
	return e
}

// installMesh installs the mesh from the Helm chart (deploy/helm/meshlite
// through e2e/meshinstall, as `meshctl install` applies it: istiod-lite
// with its waypoint controller, the CNI agent capturing
// WPCaptureNamespaces, ztunnel), or uses the one running (make demo's) as
// it is. What it installs is uninstalled when the test ends, and the nodes
// are checked unchained.
func (e *wpEnv) installMesh(t *testing.T) {
	t.Helper()
	mesh, err := meshinstall.Install(e.ctx, e.sb, meshinstall.Options{CaptureNamespaces: WPCaptureNamespaces, Reuse: true})
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
	l, err := e.sb.Client().CoreV1().Pods(wpSystemNS).List(e.ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
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

// podLogs is the log of every pod matching selector in ns, for failures.
func (e *wpEnv) podLogs(ns, selector string) string {
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

// ztunnelDump reads node i's ztunnel /config_dump (127.0.0.1:15000 inside
// the node's network namespace).
func (e *wpEnv) ztunnelDump(t *testing.T, node int) wpDump {
	t.Helper()
	nsPath := netlab.NetnsPath(e.sb.Plan.NodeNetns(node))
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := nsenter.DoPath(nsPath, func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:15000/config_dump", nil)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("ztunnel config_dump on node %d: %v", node, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("ztunnel config_dump on node %d: %d %v", node, resp.StatusCode, err)
	}
	var d wpDump
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("decode config_dump of node %d: %v", node, err)
	}
	return d
}

func wpCondition(conds []metav1.Condition, typ string) *metav1.Condition {
	for i := range conds {
		if conds[i].Type == typ {
			return &conds[i]
		}
	}
	return nil
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
	cs := e.sb.Client()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete namespace %s: %v", ns, err)
		}
		// Pods go while the CNI agent and ztunnel still run.
		if err := sandbox.WaitFor(ctx, 80*time.Second, "namespace "+ns+" gone", func(ctx context.Context) (bool, error) {
			_, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		}); err != nil {
			t.Error(err)
		}
	})
	node0 := e.sb.NodeName(0)
	if _, err := e.sb.Apply(e.ctx, fmt.Sprintf(`
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
	if _, err := e.sb.Apply(e.ctx, fmt.Sprintf(`
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
	gw, err := e.gc.GatewayV1().Gateways(ns).Get(e.ctx, "waypoint", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("ControllerMakesOwnedChildrenAndStatus", func(t *testing.T) {
		gc, err := e.gc.GatewayV1().GatewayClasses().Get(e.ctx, "istio-waypoint", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("GatewayClass istio-waypoint: %v", err)
		}
		if gc.Spec.ControllerName != "istio.io/mesh-controller" || wpCondition(gc.Status.Conditions, "Accepted") == nil ||
			wpCondition(gc.Status.Conditions, "Accepted").Status != metav1.ConditionTrue {
			t.Errorf("GatewayClass %s: controller %q, conditions %v", gc.Name, gc.Spec.ControllerName, gc.Status.Conditions)
		}
		var last error
		err = e.sb.WaitFor(e.ctx, 30*time.Second, "ServiceAccount, Deployment and Service owned by the Gateway, status Programmed",
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
				p := wpCondition(g.Status.Conditions, "Programmed")
				a := wpCondition(g.Status.Conditions, "Accepted")
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
		pods, err := e.sb.WaitPodsRunning(e.ctx, ns, "gateway.networking.k8s.io/gateway-name=waypoint", 1, 2*time.Minute)
		if err != nil {
			t.Fatalf("waypoint pod not ready: %v\n%s", err, e.podLogs(ns, "gateway.networking.k8s.io/gateway-name=waypoint"))
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
		err := e.sb.WaitFor(e.ctx, 60*time.Second, "ztunnel to show echo bound to the waypoint and the waypoint's pod",
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
		if err := e.gc.GatewayV1().Gateways(ns).Delete(e.ctx, "waypoint", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		del := time.Now()
		var last string
		err := e.sb.WaitFor(e.ctx, 90*time.Second, "the waypoint's objects and pods gone", func(ctx context.Context) (bool, error) {
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
		err = e.sb.WaitFor(e.ctx, 30*time.Second, "ztunnel to unbind echo", func(context.Context) (bool, error) {
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
