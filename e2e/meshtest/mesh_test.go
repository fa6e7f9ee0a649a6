package meshtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/echo"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/kube"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

const (
	// appNS is enrolled (istio.io/dataplane-mode=ambient); plainNS is not.
	appNS   = "meshtest-app"
	plainNS = "meshtest-plain"
)

func spiffe(ns, sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }

func runOutput(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}

func randomMarker() string {
	b := make([]byte, 8)
	rand.Read(b)
	return "meshtest-" + hex.EncodeToString(b)
}

// TestMesh installs the mesh and the sample app once and checks, in order:
// HBONE/mTLS between pods on different nodes, Service VIPs, an L4 DENY
// policy, and plaintext from outside the mesh under PERMISSIVE and STRICT.
func TestMesh(t *testing.T) {
	sb := sandbox.Start(t)
	if sb.Plan.Nodes < 2 {
		t.Fatalf("the sandbox has %d nodes; the mesh tests need 2", sb.Plan.Nodes)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := newObjects(sb)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{sb: sb, ctx: ctx, repo: repo, objs: objs}
	start := time.Now()
	e.installMesh(t, []string{appNS, plainNS})
	t.Logf("mesh installed in %v (istiod-lite at %s)", time.Since(start).Round(time.Millisecond), e.istiodIP)

	t.Run("AnotherInstallerReusesTheMeshOnlyIfItCapturesItsNamespaces", func(t *testing.T) {
		if e.mesh.Reused() {
			t.Skip("the mesh was installed before this test, with its own capture list")
		}
		// A package that runs after this one while the mesh is still
		// there (a failed uninstall) must not take a mesh blind to its
		// namespaces, nor install a second one over it.
		if _, err := meshinstall.Install(ctx, sb, meshinstall.Options{CaptureNamespaces: []string{"another-package"}, Reuse: true}); err == nil ||
			!strings.Contains(err.Error(), "captures only") {
			t.Errorf("reuse for namespace another-package: %v, want a refusal naming what the mesh captures", err)
		}
		if _, err := meshinstall.Install(ctx, sb, meshinstall.Options{CaptureNamespaces: []string{appNS}}); err == nil ||
			!strings.Contains(err.Error(), "installed in the sandbox already") {
			t.Errorf("a second install: %v, want a refusal", err)
		}
		m, err := meshinstall.Install(ctx, sb, meshinstall.Options{CaptureNamespaces: []string{plainNS}, Reuse: true})
		if err != nil || !m.Reused() || m.IstiodIP != e.istiodIP {
			t.Fatalf("reuse for namespace %s: %v", plainNS, err)
		}
		// Reused: its Uninstall leaves the mesh to its installer.
		if err := m.Uninstall(ctx); err != nil {
			t.Fatal(err)
		}
		if have, err := meshinstall.Installed(ctx, sb); err != nil || !have {
			t.Fatalf("the mesh is gone after a reuser's Uninstall (%v)", err)
		}
	})

	node0, node1 := sb.NodeName(0), sb.NodeName(1)
	start = time.Now()
	e.deployApp(t, node0, node1)
	t.Logf("sample app running in %v", time.Since(start).Round(time.Millisecond))

	client := e.pod(t, appNS, "client")
	echo0, echo1 := e.pod(t, appNS, "echo-0"), e.pod(t, appNS, "echo-1")
	outsider, plain1 := e.pod(t, plainNS, "outsider"), e.pod(t, plainNS, "plain-1")
	for _, p := range []*corev1.Pod{client, echo0, echo1} {
		if p.Annotations[kube.AnnotationRedirection] != kube.RedirectionEnabled {
			t.Fatalf("enrolled pod %s is not marked redirected: %v", p.Name, p.Annotations)
		}
	}
	echo1Addr := func(port int) string { return net.JoinHostPort(echo1.Status.PodIP, fmt.Sprint(port)) }

	t.Run("CrossNodePodIPTravelsAsHBONEWithMTLS", func(t *testing.T) {
		marker := randomMarker()
		probe := e.newWireProbe(t, marker, echo1.Status.PodIP, map[string]int{"app-http": 8080, "app-tcp": 9090, "hbone": 15008})

		// Control: two pods outside the mesh, node-0 to node-1; the
		// marker crosses the nodes in clear and the probe sees it.
		ctl := e.dialEcho(t, plainNS, "outsider", net.JoinHostPort(plain1.Status.PodIP, "9090"))
		if err := ctl.roundTrip("control " + marker); err != nil {
			t.Fatalf("plain pod to plain pod: %v", err)
		}
		ctl.Close()
		before := probe.counts(t)
		if before["marker"] == 0 {
			t.Fatalf("the wire probe did not see plaintext between plain pods (counters %v): it proves nothing", before)
		}

		// The mesh: the client (node-0) to echo-1 (node-1) by pod IP,
		// raw TCP held open and HTTP.
		conn := e.dialEcho(t, appNS, "client", echo1Addr(9090))
		if err := conn.roundTrip("mesh " + marker); err != nil {
			t.Fatalf("client to echo-1 through the mesh: %v", err)
		}
		f := e.mustGet(t, appNS, "client", "http://"+echo1Addr(8080)+"/"+marker)
		if f.Get(echo.FieldPod) != "echo-1" {
			t.Errorf("answered by %q, want echo-1", f.Get(echo.FieldPod))
		}
		// ztunnel connects to the app with the client's own address
		// (IP_TRANSPARENT): the app sees the source pod, not a proxy.
		if host, _, _ := net.SplitHostPort(f.Get(echo.FieldPeer)); host != client.Status.PodIP {
			t.Errorf("echo-1 saw the request from %q, want the client pod's IP %s", f.Get(echo.FieldPeer), client.Status.PodIP)
		}
		after := probe.counts(t)
		t.Logf("forwarding-path counters, control then mesh: %v -> %v", before, after)
		if after["marker"] != before["marker"] {
			t.Errorf("the marker crossed the nodes in clear %d time(s) between enrolled pods", after["marker"]-before["marker"])
		}
		if after["app-http"] != before["app-http"] || after["app-tcp"] != before["app-tcp"] {
			t.Errorf("packets to echo-1's app ports crossed the nodes (8080: %d, 9090: %d): traffic went around ztunnel",
				after["app-http"]-before["app-http"], after["app-tcp"]-before["app-tcp"])
		}
		if after["hbone"] == before["hbone"] {
			t.Error("no packets to echo-1's HBONE port 15008 crossed the nodes")
		}

		// Both ztunnels show the live connection as mTLS with both SPIFFE
		// identities.
		out := e.findConn(t, 0, "node-0's ztunnel to show the outbound connection", func(c connInfo) bool {
			return c.Direction == "outbound" && c.Dst == echo1Addr(9090) && strings.HasPrefix(c.Src, client.Status.PodIP+":")
		})
		in := e.findConn(t, 1, "node-1's ztunnel to show the inbound connection", func(c connInfo) bool {
			return c.Direction == "inbound" && c.Dst == echo1Addr(9090) && strings.HasPrefix(c.Src, client.Status.PodIP+":")
		})
		for _, c := range []connInfo{out, in} {
			t.Logf("ztunnel: %s", c)
			if c.Security != "mtls" || c.Transport != "h2" || c.SrcIdentity != spiffe(appNS, "client") || c.DstIdentity != spiffe(appNS, "echo") {
				t.Errorf("connection %s: want security=mtls transport=h2 from %s to %s", c, spiffe(appNS, "client"), spiffe(appNS, "echo"))
			}
		}
		if out.Route != "direct" || out.DstWorkload != appNS+"/echo-1" {
			t.Errorf("outbound route %q to %q, want direct to %s/echo-1", out.Route, out.DstWorkload, appNS)
		}
		// Still alive after the checks.
		if err := conn.roundTrip("still " + marker); err != nil {
			t.Errorf("held connection: %v", err)
		}
	})

	t.Run("ServiceVIPReachesEndpointsThroughTheMesh", func(t *testing.T) {
		svc, err := sb.Client().CoreV1().Services(appNS).Get(ctx, "echo", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vip := svc.Spec.ClusterIP
		seen := map[string]int{}
		for i := 0; i < 8; i++ {
			f := e.mustGet(t, appNS, "client", "http://"+net.JoinHostPort(vip, "80")+"/vip")
			seen[f.Get(echo.FieldPod)]++
			if host, _, _ := net.SplitHostPort(f.Get(echo.FieldPeer)); host != client.Status.PodIP {
				t.Errorf("the endpoint saw %q, want the client's IP %s", f.Get(echo.FieldPeer), client.Status.PodIP)
			}
		}
		t.Logf("8 requests to %s:80 answered by %v", vip, seen)
		if len(seen) != 2 || seen["echo-0"] == 0 || seen["echo-1"] == 0 {
			t.Errorf("Service answered by %v, want both endpoints (echo-0 on %s, echo-1 on %s)", seen, node0, node1)
		}
		conn := e.dialEcho(t, appNS, "client", net.JoinHostPort(vip, "9090"))
		if err := conn.roundTrip("vip"); err != nil {
			t.Fatalf("raw TCP to the Service: %v", err)
		}
		c := e.findConn(t, 0, "node-0's ztunnel to show the connection to the VIP", func(c connInfo) bool {
			return c.Direction == "outbound" && c.Dst == net.JoinHostPort(vip, "9090")
		})
		t.Logf("ztunnel: %s to %s", c, c.DstWorkload)
		if c.Security != "mtls" || c.SrcIdentity != spiffe(appNS, "client") || c.DstIdentity != spiffe(appNS, "echo") ||
			(c.DstWorkload != appNS+"/echo-0" && c.DstWorkload != appNS+"/echo-1") {
			t.Errorf("VIP connection %s to %q: want mTLS from the client to an echo endpoint", c, c.DstWorkload)
		}
	})

	t.Run("AuthorizationPolicyDenyForClientPrincipal", func(t *testing.T) {
		const policy = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: meshtest-app}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/meshtest-app/sa/client"]}
    to:
    - operation: {ports: ["8080"]}
`
		if _, err := sb.Apply(ctx, policy); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := sb.Delete(context.Background(), policy); err != nil {
				t.Errorf("delete policy: %v", err)
			}
			e.eventually(t, 15*time.Second, "the client allowed again", func() bool {
				code, _, err := e.httpGet(appNS, "client", "http://"+echo1Addr(8080)+"/")
				return err == nil && code == http.StatusOK
			})
		})
		url := "http://" + echo1Addr(8080) + "/denied"
		t0 := time.Now()
		e.eventually(t, 15*time.Second, "the client's connections to echo-1 denied", func() bool {
			_, _, err := e.httpGet(appNS, "client", url)
			return err != nil
		})
		t.Logf("policy enforced %v after it was applied", time.Since(t0).Round(time.Millisecond))
		// Only that principal, only that port.
		if code, f, err := e.httpGet(appNS, "echo-0", url); err != nil || code != http.StatusOK || f.Get(echo.FieldPod) != "echo-1" {
			t.Errorf("echo-0 (another principal) to echo-1: %d %v", code, err)
		}
		conn := e.dialEcho(t, appNS, "client", echo1Addr(9090))
		if err := conn.roundTrip("other port"); err != nil {
			t.Errorf("the client to echo-1's port 9090, which the rule does not name: %v", err)
		}
		// The same node's ztunnel denies too (echo-0 is on the client's node).
		e.eventually(t, 10*time.Second, "the client's connections to echo-0, on its own node, denied", func() bool {
			_, _, err := e.httpGet(appNS, "client", "http://"+net.JoinHostPort(echo0.Status.PodIP, "8080")+"/")
			return err != nil
		})
		l := e.findLog(t, node1, "node-1's ztunnel to log the denial", func(m map[string]any) bool {
			return str(m, "msg") == "connection denied by policy" && str(m, "policy") == appNS+"/deny-client" &&
				str(m, "src.ip") == client.Status.PodIP
		})
		t.Logf("deny log: %v", l)
		if !strings.HasSuffix(str(l, "src.identity"), "/ns/"+appNS+"/sa/client") || str(l, "rule") == "" ||
			str(l, "dst") != echo1Addr(8080) || str(l, "dst.workload") != appNS+"/echo-1" {
			t.Errorf("deny log line lacks who, what or which rule: %v", l)
		}
	})

	t.Run("PlaintextFromOutsideOnlyUnderPermissive", func(t *testing.T) {
		// PERMISSIVE (no PeerAuthentication): a pod outside the mesh
		// reaches an enrolled pod in plaintext, through ztunnel's 15006.
		f := e.mustGet(t, plainNS, "outsider", "http://"+echo1Addr(8080)+"/permissive")
		if host, _, _ := net.SplitHostPort(f.Get(echo.FieldPeer)); f.Get(echo.FieldPod) != "echo-1" || host != outsider.Status.PodIP {
			t.Errorf("answered by %q for %q, want echo-1 for the outsider %s", f.Get(echo.FieldPod), f.Get(echo.FieldPeer), outsider.Status.PodIP)
		}
		conn := e.dialEcho(t, plainNS, "outsider", echo1Addr(9090))
		if err := conn.roundTrip("permissive"); err != nil {
			t.Fatalf("outsider to echo-1 under PERMISSIVE: %v", err)
		}
		c := e.findConn(t, 1, "node-1's ztunnel to show the plaintext inbound connection", func(c connInfo) bool {
			return c.Direction == "inbound-plaintext" && c.Dst == echo1Addr(9090) && strings.HasPrefix(c.Src, outsider.Status.PodIP+":")
		})
		if c.Security != "plaintext" || c.SrcIdentity != "" {
			t.Errorf("plaintext inbound shown as %s", c)
		}
		conn.Close()
		// The host is outside the mesh too.
		host, err := net.DialTimeout("tcp", echo1Addr(9090), 3*time.Second)
		if err != nil {
			t.Fatalf("host to echo-1 under PERMISSIVE: %v", err)
		}
		if err := (echoConn{host}).roundTrip("host permissive"); err != nil {
			t.Errorf("host to echo-1 under PERMISSIVE: %v", err)
		}
		host.Close()

		const strict = `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: meshtest-app}
spec:
  mtls: {mode: STRICT}
`
		if _, err := sb.Apply(ctx, strict); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := sb.Delete(context.Background(), strict); err != nil {
				t.Errorf("delete PeerAuthentication: %v", err)
			}
		})
		t0 := time.Now()
		e.eventually(t, 15*time.Second, "plaintext from the outsider refused under STRICT", func() bool {
			_, _, err := e.httpGet(plainNS, "outsider", "http://"+echo1Addr(8080)+"/strict")
			return err != nil
		})
		t.Logf("STRICT enforced %v after it was applied", time.Since(t0).Round(time.Millisecond))
		// Plaintext straight from the host to the app port: redirected to
		// ztunnel and refused; nothing reaches the app.
		if c, err := net.DialTimeout("tcp", echo1Addr(9090), 3*time.Second); err == nil {
			if err := (echoConn{c}).roundTrip("host strict"); err == nil {
				t.Error("plaintext from the host reached echo-1's app under STRICT")
			}
			c.Close()
		}
		l := e.findLog(t, node1, "node-1's ztunnel to log the STRICT refusal", func(m map[string]any) bool {
			return str(m, "msg") == "connection denied by policy" && str(m, "src.ip") == outsider.Status.PodIP &&
				strings.Contains(str(m, "policy"), "strict")
		})
		t.Logf("STRICT deny log: %v", l)
		// The mesh itself keeps working, and so do kubelet probes.
		if f := e.mustGet(t, appNS, "client", "http://"+echo1Addr(8080)+"/strict"); f.Get(echo.FieldPod) != "echo-1" {
			t.Errorf("mesh request under STRICT answered by %q", f.Get(echo.FieldPod))
		}
		time.Sleep(3 * time.Second) // three probe periods
		for _, name := range []string{"echo-0", "echo-1", "client"} {
			if p := e.pod(t, appNS, name); !ready(p) {
				t.Errorf("pod %s not ready under STRICT: kubelet probes are refused", name)
			}
		}
	})
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// deployApp creates the enrolled namespace (echo-0 on node0, echo-1 on
// node1 behind Service echo, a client on node0) and the plain one (outsider
// on node0, plain-1 on node1), removed when the test ends, before the mesh.
func (e *env) deployApp(t *testing.T, node0, node1 string) {
	t.Helper()
	cs := e.sb.Client()
	for _, ns := range []string{appNS, plainNS} {
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				t.Errorf("delete namespace %s: %v", ns, err)
			}
			// Pods go while the CNI agent and ztunnel still run.
			err := sandbox.WaitFor(ctx, 80*time.Second, "namespace "+ns+" gone", func(ctx context.Context) (bool, error) {
				_, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
				return apierrors.IsNotFound(err), nil
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	yaml := fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: %[2]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: %[1]s}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: %[1]s}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp, port: 9090, targetPort: 9090}
`, appNS, plainNS)
	if _, err := e.sb.Apply(e.ctx, yaml); err != nil {
		t.Fatalf("deploy the sample app: %v", err)
	}
	// Pods are admitted only once their ServiceAccount exists; the
	// controller manager makes "default" a moment after the namespace.
	e.eventually(t, 30*time.Second, "default ServiceAccounts", func() bool {
		_, err := cs.CoreV1().ServiceAccounts(plainNS).Get(e.ctx, "default", metav1.GetOptions{})
		return err == nil
	})
	pods := ""
	for _, p := range []string{
		echoPod(appNS, "echo-0", node0, "echo", "echo"),
		echoPod(appNS, "echo-1", node1, "echo", "echo"),
		echoPod(appNS, "client", node0, "client", "client"),
		echoPod(plainNS, "outsider", node0, "default", "outsider"),
		echoPod(plainNS, "plain-1", node1, "default", "plain"),
	} {
		pods += "---" + p
	}
	if _, err := e.sb.Apply(e.ctx, pods); err != nil {
		t.Fatalf("deploy the sample app's pods: %v", err)
	}
	if _, err := e.sb.WaitPodsRunning(e.ctx, appNS, "", 3, 90*time.Second); err != nil {
		t.Fatalf("enrolled pods: %v\n%s\n%s", err, e.podLogs(systemNS, "app=istio-cni-node"), e.podLogs(systemNS, "app=ztunnel"))
	}
	if _, err := e.sb.WaitPodsRunning(e.ctx, plainNS, "", 2, 90*time.Second); err != nil {
		t.Fatalf("plain pods: %v", err)
	}
}
