package meshtest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/echo"
	"github.com/meshlite/meshlite/e2e/meshharness"
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

// TestMesh installs the mesh and the sample app once and checks, in order:
// HBONE/mTLS between pods on different nodes, Service VIPs, an L4 DENY
// policy, and plaintext from outside the mesh under PERMISSIVE and STRICT.
func TestMesh(t *testing.T) {
	e := meshharness.Start(t, 4*time.Minute, appNS, plainNS)
	sb, ctx := e.Sandbox, e.Ctx

	t.Run("AnotherInstallerReusesTheMeshOnlyIfItCapturesItsNamespaces", func(t *testing.T) {
		if e.Mesh.Reused() {
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
		if err != nil || !m.Reused() || m.IstiodIP != e.Mesh.IstiodIP {
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
	start := time.Now()
	deployApp(t, e, node0, node1)
	t.Logf("sample app running in %v", time.Since(start).Round(time.Millisecond))

	client := e.Pod(t, appNS, "client")
	echo0, echo1 := e.Pod(t, appNS, "echo-0"), e.Pod(t, appNS, "echo-1")
	outsider, plain1 := e.Pod(t, plainNS, "outsider"), e.Pod(t, plainNS, "plain-1")
	for _, p := range []*corev1.Pod{client, echo0, echo1} {
		if p.Annotations[kube.AnnotationRedirection] != kube.RedirectionEnabled {
			t.Fatalf("enrolled pod %s is not marked redirected: %v", p.Name, p.Annotations)
		}
	}
	echo1Addr := func(port int) string { return net.JoinHostPort(echo1.Status.PodIP, fmt.Sprint(port)) }

	t.Run("CrossNodePodIPTravelsAsHBONEWithMTLS", func(t *testing.T) {
		marker := meshharness.RandomMarker("meshtest")
		probe := e.NewWireProbe(t, marker, echo1.Status.PodIP, map[string]int{"app-http": 8080, "app-tcp": 9090, "hbone": 15008})

		// Control: two pods outside the mesh, node-0 to node-1; the
		// marker crosses the nodes in clear and the probe sees it.
		ctl := e.DialEcho(t, plainNS, "outsider", net.JoinHostPort(plain1.Status.PodIP, "9090"))
		if err := ctl.RoundTrip("control " + marker); err != nil {
			t.Fatalf("plain pod to plain pod: %v", err)
		}
		ctl.Close()
		before := probe.Counts(t)
		if before["marker"] == 0 {
			t.Fatalf("the wire probe did not see plaintext between plain pods (counters %v): it proves nothing", before)
		}

		// The mesh: the client (node-0) to echo-1 (node-1) by pod IP,
		// raw TCP held open and HTTP.
		conn := e.DialEcho(t, appNS, "client", echo1Addr(9090))
		if err := conn.RoundTrip("mesh " + marker); err != nil {
			t.Fatalf("client to echo-1 through the mesh: %v", err)
		}
		f := e.MustGet(t, appNS, "client", "http://"+echo1Addr(8080)+"/"+marker)
		if f.Get(echo.FieldPod) != "echo-1" {
			t.Errorf("answered by %q, want echo-1", f.Get(echo.FieldPod))
		}
		// ztunnel connects to the app with the client's own address
		// (IP_TRANSPARENT): the app sees the source pod, not a proxy.
		if host, _, _ := net.SplitHostPort(f.Get(echo.FieldPeer)); host != client.Status.PodIP {
			t.Errorf("echo-1 saw the request from %q, want the client pod's IP %s", f.Get(echo.FieldPeer), client.Status.PodIP)
		}
		after := probe.Counts(t)
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
		out := e.FindConn(t, 0, "node-0's ztunnel to show the outbound connection", func(c meshharness.ConnInfo) bool {
			return c.Direction == "outbound" && c.Dst == echo1Addr(9090) && strings.HasPrefix(c.Src, client.Status.PodIP+":")
		})
		in := e.FindConn(t, 1, "node-1's ztunnel to show the inbound connection", func(c meshharness.ConnInfo) bool {
			return c.Direction == "inbound" && c.Dst == echo1Addr(9090) && strings.HasPrefix(c.Src, client.Status.PodIP+":")
		})
		for _, c := range []meshharness.ConnInfo{out, in} {
			t.Logf("ztunnel: %s", c)
			if c.Security != "mtls" || c.Transport != "h2" || c.SrcIdentity != meshharness.Spiffe(appNS, "client") || c.DstIdentity != meshharness.Spiffe(appNS, "echo") {
				t.Errorf("connection %s: want security=mtls transport=h2 from %s to %s", c, meshharness.Spiffe(appNS, "client"), meshharness.Spiffe(appNS, "echo"))
			}
		}
		if out.Route != "direct" || out.DstWorkload != appNS+"/echo-1" {
			t.Errorf("outbound route %q to %q, want direct to %s/echo-1", out.Route, out.DstWorkload, appNS)
		}
		// Still alive after the checks.
		if err := conn.RoundTrip("still " + marker); err != nil {
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
			f := e.MustGet(t, appNS, "client", "http://"+net.JoinHostPort(vip, "80")+"/vip")
			seen[f.Get(echo.FieldPod)]++
			if host, _, _ := net.SplitHostPort(f.Get(echo.FieldPeer)); host != client.Status.PodIP {
				t.Errorf("the endpoint saw %q, want the client's IP %s", f.Get(echo.FieldPeer), client.Status.PodIP)
			}
		}
		t.Logf("8 requests to %s:80 answered by %v", vip, seen)
		if len(seen) != 2 || seen["echo-0"] == 0 || seen["echo-1"] == 0 {
			t.Errorf("Service answered by %v, want both endpoints (echo-0 on %s, echo-1 on %s)", seen, node0, node1)
		}
		conn := e.DialEcho(t, appNS, "client", net.JoinHostPort(vip, "9090"))
		if err := conn.RoundTrip("vip"); err != nil {
			t.Fatalf("raw TCP to the Service: %v", err)
		}
		c := e.FindConn(t, 0, "node-0's ztunnel to show the connection to the VIP", func(c meshharness.ConnInfo) bool {
			return c.Direction == "outbound" && c.Dst == net.JoinHostPort(vip, "9090")
		})
		t.Logf("ztunnel: %s to %s", c, c.DstWorkload)
		if c.Security != "mtls" || c.SrcIdentity != meshharness.Spiffe(appNS, "client") || c.DstIdentity != meshharness.Spiffe(appNS, "echo") ||
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
			e.Eventually(t, 15*time.Second, "the client allowed again", func() bool {
				code, _, err := e.HTTPGet(appNS, "client", "http://"+echo1Addr(8080)+"/")
				return err == nil && code == http.StatusOK
			})
		})
		url := "http://" + echo1Addr(8080) + "/denied"
		t0 := time.Now()
		e.Eventually(t, 15*time.Second, "the client's connections to echo-1 denied", func() bool {
			_, _, err := e.HTTPGet(appNS, "client", url)
			return err != nil
		})
		t.Logf("policy enforced %v after it was applied", time.Since(t0).Round(time.Millisecond))
		// Only that principal, only that port.
		if code, f, err := e.HTTPGet(appNS, "echo-0", url); err != nil || code != http.StatusOK || f.Get(echo.FieldPod) != "echo-1" {
			t.Errorf("echo-0 (another principal) to echo-1: %d %v", code, err)
		}
		conn := e.DialEcho(t, appNS, "client", echo1Addr(9090))
		if err := conn.RoundTrip("other port"); err != nil {
			t.Errorf("the client to echo-1's port 9090, which the rule does not name: %v", err)
		}
		// The same node's ztunnel denies too (echo-0 is on the client's node).
		e.Eventually(t, 10*time.Second, "the client's connections to echo-0, on its own node, denied", func() bool {
			_, _, err := e.HTTPGet(appNS, "client", "http://"+net.JoinHostPort(echo0.Status.PodIP, "8080")+"/")
			return err != nil
		})
		l := e.FindLog(t, node1, "node-1's ztunnel to log the denial", func(m meshharness.LogLine) bool {
			return m.Get("msg") == "connection denied by policy" && m.Get("policy") == appNS+"/deny-client" &&
				m.Get("src.ip") == client.Status.PodIP
		})
		t.Logf("deny log: %v", l)
		if !strings.HasSuffix(l.Get("src.identity"), "/ns/"+appNS+"/sa/client") || l.Get("rule") == "" ||
			l.Get("dst") != echo1Addr(8080) || l.Get("dst.workload") != appNS+"/echo-1" {
			t.Errorf("deny log line lacks who, what or which rule: %v", l)
		}
	})

	t.Run("PlaintextFromOutsideOnlyUnderPermissive", func(t *testing.T) {
		// PERMISSIVE (no PeerAuthentication): a pod outside the mesh
		// reaches an enrolled pod in plaintext, through ztunnel's 15006.
		f := e.MustGet(t, plainNS, "outsider", "http://"+echo1Addr(8080)+"/permissive")
		if host, _, _ := net.SplitHostPort(f.Get(echo.FieldPeer)); f.Get(echo.FieldPod) != "echo-1" || host != outsider.Status.PodIP {
			t.Errorf("answered by %q for %q, want echo-1 for the outsider %s", f.Get(echo.FieldPod), f.Get(echo.FieldPeer), outsider.Status.PodIP)
		}
		conn := e.DialEcho(t, plainNS, "outsider", echo1Addr(9090))
		if err := conn.RoundTrip("permissive"); err != nil {
			t.Fatalf("outsider to echo-1 under PERMISSIVE: %v", err)
		}
		c := e.FindConn(t, 1, "node-1's ztunnel to show the plaintext inbound connection", func(c meshharness.ConnInfo) bool {
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
		if err := (meshharness.EchoConn{Conn: host}).RoundTrip("host permissive"); err != nil {
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
		e.Eventually(t, 15*time.Second, "plaintext from the outsider refused under STRICT", func() bool {
			_, _, err := e.HTTPGet(plainNS, "outsider", "http://"+echo1Addr(8080)+"/strict")
			return err != nil
		})
		t.Logf("STRICT enforced %v after it was applied", time.Since(t0).Round(time.Millisecond))
		// Plaintext straight from the host to the app port: redirected to
		// ztunnel and refused; nothing reaches the app.
		if c, err := net.DialTimeout("tcp", echo1Addr(9090), 3*time.Second); err == nil {
			if err := (meshharness.EchoConn{Conn: c}).RoundTrip("host strict"); err == nil {
				t.Error("plaintext from the host reached echo-1's app under STRICT")
			}
			c.Close()
		}
		l := e.FindLog(t, node1, "node-1's ztunnel to log the STRICT refusal", func(m meshharness.LogLine) bool {
			return m.Get("msg") == "connection denied by policy" && m.Get("src.ip") == outsider.Status.PodIP &&
				strings.Contains(m.Get("policy"), "strict")
		})
		t.Logf("STRICT deny log: %v", l)
		// The mesh itself keeps working, and so do kubelet probes.
		if f := e.MustGet(t, appNS, "client", "http://"+echo1Addr(8080)+"/strict"); f.Get(echo.FieldPod) != "echo-1" {
			t.Errorf("mesh request under STRICT answered by %q", f.Get(echo.FieldPod))
		}
		time.Sleep(3 * time.Second) // three probe periods
		for _, name := range []string{"echo-0", "echo-1", "client"} {
			if p := e.Pod(t, appNS, name); !meshharness.Ready(p) {
				t.Errorf("pod %s not ready under STRICT: kubelet probes are refused", name)
			}
		}
	})
}

// deployApp creates the enrolled namespace (echo-0 on node0, echo-1 on
// node1 behind Service echo, a client on node0) and the plain one (outsider
// on node0, plain-1 on node1), removed when the test ends, before the mesh.
func deployApp(t *testing.T, e *meshharness.Env, node0, node1 string) {
	t.Helper()
	e.Deploy(t, []string{
		meshharness.Namespace(appNS, true),
		meshharness.Namespace(plainNS, false),
		meshharness.ServiceAccount(appNS, "echo"),
		meshharness.ServiceAccount(appNS, "client"),
		meshharness.EchoService(appNS, "echo"),
	}, []string{
		meshharness.EchoPod(appNS, "echo-0", node0, "echo", "echo"),
		meshharness.EchoPod(appNS, "echo-1", node1, "echo", "echo"),
		meshharness.EchoPod(appNS, "client", node0, "client", "client"),
		meshharness.EchoPod(plainNS, "outsider", node0, "default", "outsider"),
		meshharness.EchoPod(plainNS, "plain-1", node1, "default", "plain"),
	})
}
