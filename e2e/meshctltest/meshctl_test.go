package meshctltest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/meshctl/mtls"
)

// meshctlBin is the meshctl binary under test, built by TestMain.
var meshctlBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "meshctltest")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	meshctlBin = filepath.Join(dir, "meshctl")
	// Build the binary as `make build` does; the tests run it as a person
	// would.
	build := exec.Command("go", "build", "-trimpath", "-o", meshctlBin, "github.com/meshlite/meshlite/meshctl")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build meshctl:", err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	sandbox.TestMain(m)
}

const (
	meshNS   = "meshctl-mesh"   // enrolled; PERMISSIVE
	plainNS  = "meshctl-plain"  // not enrolled
	strictNS = "meshctl-strict" // enrolled; PeerAuthentication STRICT
	enrollNS = "meshctl-enroll" // enrolled and unenrolled by meshctl
	// fakeNS stands in for a mesh namespace whose only "ztunnel" does
	// not answer on its admin port.
	fakeNS = "meshctl-fake-mesh"
)

// result is one meshctl run.
type result struct {
	code           int
	stdout, stderr string
}

// meshctl runs the binary with args (and a timeout of its own).
func meshctl(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, meshctlBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run meshctl %v: %v", args, err)
	}
	// Never a Go stack trace, whatever happened.
	if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic:") {
		t.Fatalf("meshctl %v printed a stack trace:\n%s", args, r.stderr)
	}
	return r
}

// status runs `meshctl mtls status -o json` with args and decodes it.
func status(t *testing.T, kubeconfig string, args ...string) (mtls.Report, result) {
	t.Helper()
	r := meshctl(t, append([]string{"--kubeconfig", kubeconfig, "mtls", "status", "-o", "json"}, args...)...)
	var rep mtls.Report
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("meshctl mtls status %v: exit %d, not JSON (%v):\n%s\nstderr: %s", args, r.code, err, r.stdout, r.stderr)
	}
	return rep, r
}

func row(rep mtls.Report, ns, pod string) *mtls.Row {
	for i := range rep.Workloads {
		if rep.Workloads[i].Namespace == ns && rep.Workloads[i].Pod == pod {
			return &rep.Workloads[i]
		}
	}
	return nil
}

// waitStatus polls meshctl until cond accepts its report.
func waitStatus(t *testing.T, kubeconfig, what string, cond func(mtls.Report, result) bool, args ...string) (mtls.Report, result) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		rep, r := status(t, kubeconfig, args...)
		if cond(rep, r) {
			return rep, r
		}
		if time.Now().After(deadline) {
			j, _ := json.MarshalIndent(rep, "", "  ")
			t.Fatalf("%s: not within 45s; last exit %d, stderr %q, report:\n%s", what, r.code, r.stderr, j)
		}
		time.Sleep(time.Second)
	}
}

// holdConn opens a TCP connection from pod ns/name to addr, checks the
// echo server answers on it, and keeps it open until the test ends.
func holdConn(t *testing.T, e *meshharness.Env, ns, name, addr string) net.Conn {
	t.Helper()
	c := e.DialEcho(t, ns, name, addr)
	if err := c.RoundTrip("hello meshctl"); err != nil {
		t.Fatalf("echo over %s/%s -> %s: %v", ns, name, addr, err)
	}
	c.SetDeadline(time.Time{})
	return c
}

// TestMeshctl installs the mesh once and checks meshctl against it.
func TestMeshctl(t *testing.T) {
	e := meshharness.Start(t, 8*time.Minute, meshNS, plainNS, strictNS, enrollNS)
	sb, ctx := e.Sandbox, e.Ctx
	kc := sb.Kubeconfig()

	node0, node1 := sb.NodeName(0), sb.NodeName(1)
	e.DeleteNamespacesAtEnd(t, meshNS, plainNS, strictNS, enrollNS, fakeNS)
	yaml := fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata: {name: %[1]s, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: %[2]s}
---
apiVersion: v1
kind: Namespace
metadata: {name: %[3]s, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: %[4]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: %[1]s}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: %[3]s}
spec:
  mtls: {mode: STRICT}
`, meshNS, plainNS, strictNS, enrollNS)
	if _, err := sb.Apply(ctx, yaml); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{plainNS, strictNS, enrollNS} {
		if err := sb.WaitFor(ctx, 30*time.Second, ns+" default ServiceAccount", func(ctx context.Context) (bool, error) {
			_, err := sb.Client().CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
			return err == nil, nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	pods := meshharness.EchoPod(meshNS, "server-0", node0, "echo", "echo") + "---" +
		meshharness.EchoPod(meshNS, "server-1", node1, "echo", "echo") + "---" +
		meshharness.EchoPod(meshNS, "client", node0, "client", "echo") + "---" +
		meshharness.EchoPodWithLabels(meshNS, "opted-out", node1, "default", map[string]string{"app": "echo", "istio.io/dataplane-mode": "none"}) + "---" +
		meshharness.EchoPod(plainNS, "outsider", node0, "default", "echo") + "---" +
		meshharness.EchoPod(strictNS, "strict", node1, "default", "echo") + "---" +
		meshharness.EchoPod(enrollNS, "joiner", node1, "default", "echo")
	start := time.Now()
	if _, err := sb.Apply(ctx, pods); err != nil {
		t.Fatal(err)
	}
	for ns, n := range map[string]int{meshNS: 4, plainNS: 1, strictNS: 1, enrollNS: 1} {
		if _, err := sb.WaitPodsRunning(ctx, ns, "app=echo", n, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("pods running in %v", time.Since(start).Round(time.Millisecond))
	ip := func(ns, name string) string { return e.Pod(t, ns, name).Status.PodIP }

	t.Run("StatusJSONMatchesTheTruth", func(t *testing.T) {
		// Wait until the enrolled pods are redirected and hold
		// certificates (new pods take a moment).
		// -A: the other namespaces in the shared sandbox are not this
		// test's to judge, so the wait looks at this test's rows only.
		rep, _ := waitStatus(t, kc, "the enrolled pods redirected, with certificates", func(rep mtls.Report, r result) bool {
			for _, k := range [][2]string{{meshNS, "server-0"}, {meshNS, "server-1"}, {meshNS, "client"}, {strictNS, "strict"}} {
				if w := row(rep, k[0], k[1]); w == nil || len(w.Problems) > 0 || !w.Enrolled {
					return false
				}
			}
			return row(rep, strictNS, "strict").Mode == mtls.ModeStrict
		}, "-A")
		for _, ns := range []string{meshNS, strictNS, plainNS} {
			if _, r := status(t, kc, "-n", ns); r.code != 0 || !strings.HasPrefix(r.stderr, "OK: ") {
				t.Errorf("-n %s: exit %d, summary %q", ns, r.code, r.stderr)
			}
		}
		for _, name := range []string{"server-0", "server-1", "client"} {
			w := row(rep, meshNS, name)
			if w == nil {
				t.Fatalf("no row for %s/%s", meshNS, name)
			}
			sa := "echo"
			if name == "client" {
				sa = "client"
			}
			if !w.Enrolled || w.Enrollment != mtls.EnrolledByNamespace || w.Protocol != "HBONE" || w.Mode != mtls.ModePermissive ||
				w.ModeSource != "ztunnel" || w.Cert.State != mtls.CertValid ||
				w.Cert.Identity != "spiffe://cluster.local/ns/"+meshNS+"/sa/"+sa || w.Address != ip(meshNS, name) {
				t.Errorf("%s: %+v", name, *w)
			}
			// ztunnel's own check when it reports one; the CNI's
			// annotation otherwise, never "verified" on its word.
			if w.Redirection != mtls.RedirVerified && w.Redirection != mtls.RedirAnnotated {
				t.Errorf("%s: redirection %q", name, w.Redirection)
			}
		}
		if w := row(rep, meshNS, "server-1"); w != nil && w.Node != node1 {
			t.Errorf("server-1 on %q, want %s", w.Node, node1)
		}
		if w := row(rep, meshNS, "opted-out"); w == nil || w.Enrolled || w.Enrollment != mtls.OptedOut || w.Protocol != "TCP" ||
			w.Redirection != mtls.RedirNone || w.Cert.State != mtls.CertNone || w.Mode != "" {
			t.Errorf("opted-out: %+v", w)
		}
		if w := row(rep, plainNS, "outsider"); w == nil || w.Enrolled || w.Enrollment != mtls.NotEnrolled || w.Protocol != "TCP" ||
			w.Redirection != mtls.RedirNone {
			t.Errorf("outsider: %+v", w)
		}
		if w := row(rep, strictNS, "strict"); w == nil || !w.Enrolled || w.Mode != mtls.ModeStrict || w.ModeConfigured != mtls.ModeStrict ||
			w.ModeSource != "ztunnel" || w.Protocol != "HBONE" {
			t.Errorf("strict: %+v", w)
		}
		for _, w := range rep.Workloads {
			if w.Namespace == "istio-system" && strings.HasPrefix(w.Pod, "ztunnel-") {
				t.Errorf("host-network ztunnel pod %s is listed", w.Pod)
			}
		}

		// -n and --pod narrow the scope; the table says the same.
		one, _ := status(t, kc, "-n", meshNS, "--pod", "server-1")
		if len(one.Workloads) != 1 || one.Workloads[0].Pod != "server-1" {
			t.Errorf("--pod server-1: %+v", one.Workloads)
		}
		tbl := meshctl(t, "--kubeconfig", kc, "mtls", "status", "-n", meshNS)
		if tbl.code != 0 || !regexpLine(tbl.stdout, `^NAMESPACE +POD +ADDRESS +NODE +WAYPOINT +PROTOCOL +MODE +REDIRECTION +CERT +LIVE$`) ||
			!regexpLine(tbl.stdout, `^`+meshNS+` +server-1 +`+ip(meshNS, "server-1")+` +`+node1+` +None +HBONE +PERMISSIVE +(verified|annotated) +`+meshNS+`/echo until `) {
			t.Errorf("table (exit %d):\n%s%s", tbl.code, tbl.stdout, tbl.stderr)
		}
	})

	t.Run("ExitsZeroWhenAllIsMTLS", func(t *testing.T) {
		conn := holdConn(t, e, meshNS, "client", net.JoinHostPort(ip(meshNS, "server-1"), "9090"))
		defer conn.Close()
		rep, r := waitStatus(t, kc, "the client's connection live as mTLS at both ends", func(rep mtls.Report, r result) bool {
			c, s := row(rep, meshNS, "client"), row(rep, meshNS, "server-1")
			return c != nil && s != nil && c.Live.MTLS >= 1 && s.Live.MTLS >= 1
		}, "-n", meshNS)
		if r.code != 0 || !rep.Summary.OK || rep.Summary.PlainConnections != 0 {
			t.Errorf("exit %d, summary %+v", r.code, rep.Summary)
		}
	})

	t.Run("ExitsOneOnPlaintextIntoEnrolledNamespace", func(t *testing.T) {
		// PERMISSIVE: ztunnel accepts plaintext from outside the mesh (its
		// port 15006); meshctl must not.
		conn := holdConn(t, e, plainNS, "outsider", net.JoinHostPort(ip(meshNS, "server-0"), "9090"))
		rep, r := waitStatus(t, kc, "the plaintext connection flagged", func(rep mtls.Report, r result) bool {
			return r.code == 1
		}, "-n", meshNS)
		s := row(rep, meshNS, "server-0")
		if rep.Summary.OK || s == nil || s.Live.Plaintext < 1 {
			t.Fatalf("summary %+v, server-0 %+v", rep.Summary, s)
		}
		if !strings.Contains(r.stderr, "FAIL") || !strings.Contains(r.stderr, meshNS+"/server-0") || !strings.Contains(r.stderr, "plaintext") ||
			!strings.Contains(r.stderr, plainNS+"/outsider") {
			t.Errorf("the summary does not say who talks plaintext to whom: %q", r.stderr)
		}
		tbl := meshctl(t, "--kubeconfig", kc, "mtls", "status", "-n", meshNS)
		if tbl.code != 1 || !strings.Contains(tbl.stdout, "FAIL: ") || !regexpLine(tbl.stdout, `^`+meshNS+` +server-0 .* PLAINTEXT$`) {
			t.Errorf("table (exit %d):\n%s", tbl.code, tbl.stdout)
		}
		// Once it closes, the verdict passes again.
		conn.Close()
		waitStatus(t, kc, "the verdict passing after the plaintext connection closed", func(rep mtls.Report, r result) bool {
			return r.code == 0
		}, "-n", meshNS)
		// STRICT refuses what PERMISSIVE let in.
		c, err := sb.Dial(ctx, plainNS, "outsider", net.JoinHostPort(ip(strictNS, "strict"), "9090"))
		if err == nil {
			c.SetDeadline(time.Now().Add(3 * time.Second))
			io.WriteString(c, "x\n")
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil {
			t.Errorf("plaintext into the STRICT namespace got an answer")
		}
	})

	t.Run("EnrollUnenrollRoundTrip", func(t *testing.T) {
		r := meshctl(t, "--kubeconfig", kc, "enroll", enrollNS)
		if r.code != 0 || !strings.Contains(r.stdout, "enrolled") {
			t.Fatalf("enroll: exit %d %s%s", r.code, r.stdout, r.stderr)
		}
		ns, err := sb.Client().CoreV1().Namespaces().Get(ctx, enrollNS, metav1.GetOptions{})
		if err != nil || ns.Labels["istio.io/dataplane-mode"] != "ambient" {
			t.Fatalf("namespace labels after enroll: %v %v", ns.Labels, err)
		}
		waitStatus(t, kc, "the running pod captured after enroll", func(rep mtls.Report, r result) bool {
			w := row(rep, enrollNS, "joiner")
			return r.code == 0 && w != nil && w.Enrolled && w.Protocol == "HBONE" && w.Cert.State == mtls.CertValid &&
				(w.Redirection == mtls.RedirVerified || w.Redirection == mtls.RedirAnnotated)
		}, "-n", enrollNS)
		if r := meshctl(t, "--kubeconfig", kc, "enroll", enrollNS); r.code != 0 || !strings.Contains(r.stdout, "already") {
			t.Errorf("enroll twice: exit %d %s", r.code, r.stdout)
		}

		r = meshctl(t, "--kubeconfig", kc, "unenroll", enrollNS)
		if r.code != 0 || !strings.Contains(r.stdout, "unenrolled") {
			t.Fatalf("unenroll: exit %d %s%s", r.code, r.stdout, r.stderr)
		}
		ns, err = sb.Client().CoreV1().Namespaces().Get(ctx, enrollNS, metav1.GetOptions{})
		if _, has := ns.Labels["istio.io/dataplane-mode"]; err != nil || has {
			t.Fatalf("namespace labels after unenroll: %v %v", ns.Labels, err)
		}
		waitStatus(t, kc, "the pod released after unenroll", func(rep mtls.Report, r result) bool {
			w := row(rep, enrollNS, "joiner")
			return r.code == 0 && w != nil && !w.Enrolled && w.Protocol == "TCP" && w.Redirection == mtls.RedirNone
		}, "-n", enrollNS)
		if r := meshctl(t, "--kubeconfig", kc, "enroll", "meshctl-no-such-namespace"); r.code != 1 || !strings.Contains(r.stderr, "does not exist") {
			t.Errorf("enroll of a missing namespace: exit %d %q", r.code, r.stderr)
		}
	})

	t.Run("ZtunnelConfigShowsEveryNode", func(t *testing.T) {
		r := meshctl(t, "--kubeconfig", kc, "ztunnel-config", "workloads", "-n", meshNS)
		if r.code != 0 || !strings.HasPrefix(r.stdout, "NAMESPACE") || !strings.Contains(r.stdout, "POD NAME") ||
			!regexpLine(r.stdout, `^`+meshNS+` +server-1 +`+ip(meshNS, "server-1")+` +`+node1+` +None +HBONE$`) {
			t.Errorf("workloads (exit %d):\n%s%s", r.code, r.stdout, r.stderr)
		}
		r = meshctl(t, "--kubeconfig", kc, "ztunnel-config", "certificates", "--node", node1, "-o", "json")
		var out []struct {
			Node  string `json:"node"`
			Items []struct {
				Identity string `json:"identity"`
				State    string `json:"state"`
			} `json:"items"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || r.code != 0 || len(out) != 1 || out[0].Node != node1 {
			t.Fatalf("certificates --node %s: exit %d %v\n%s", node1, r.code, err, r.stdout)
		}
		found := false
		for _, c := range out[0].Items {
			found = found || (c.Identity == "spiffe://cluster.local/ns/"+meshNS+"/sa/echo" && c.State == "valid")
		}
		if !found {
			t.Errorf("node %s's ztunnel holds no valid certificate for %s/echo: %+v", node1, meshNS, out[0].Items)
		}
	})

	t.Run("WaypointApplyListDelete", func(t *testing.T) {
		r := meshctl(t, "--kubeconfig", kc, "waypoint", "apply", "-n", meshNS, "--for", "workload", "--enroll-namespace")
		if r.code != 0 {
			t.Fatalf("apply: exit %d %s%s", r.code, r.stdout, r.stderr)
		}
		u, err := dynamicGet(ctx, sb, meshNS, "waypoint")
		if err != nil {
			t.Fatalf("the Gateway: %v", err)
		}
		class, _, _ := unstructured.NestedString(u.Object, "spec", "gatewayClassName")
		ls, _, _ := unstructured.NestedSlice(u.Object, "spec", "listeners")
		if class != "istio-waypoint" || len(ls) != 1 || u.GetLabels()["istio.io/waypoint-for"] != "workload" {
			t.Errorf("gateway: class %q listeners %v labels %v", class, ls, u.GetLabels())
		} else if l := ls[0].(map[string]any); l["name"] != "mesh" || l["protocol"] != "HBONE" || fmt.Sprint(l["port"]) != "15008" {
			t.Errorf("listener %v", l)
		}
		ns, _ := sb.Client().CoreV1().Namespaces().Get(ctx, meshNS, metav1.GetOptions{})
		if ns.Labels["istio.io/use-waypoint"] != "waypoint" {
			t.Errorf("namespace labels %v", ns.Labels)
		}
		r = meshctl(t, "--kubeconfig", kc, "waypoint", "list", "-n", meshNS)
		if r.code != 0 || !regexpLine(r.stdout, `^`+meshNS+` +waypoint +workload +\S+ +yes$`) {
			t.Errorf("list: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		r = meshctl(t, "--kubeconfig", kc, "waypoint", "delete", "-n", meshNS)
		if r.code != 0 {
			t.Fatalf("delete: exit %d %s%s", r.code, r.stdout, r.stderr)
		}
		if _, err := dynamicGet(ctx, sb, meshNS, "waypoint"); !apierrors.IsNotFound(err) {
			t.Errorf("the Gateway after delete: %v", err)
		}
		ns, _ = sb.Client().CoreV1().Namespaces().Get(ctx, meshNS, metav1.GetOptions{})
		if _, has := ns.Labels["istio.io/use-waypoint"]; has {
			t.Errorf("namespace still uses the deleted waypoint: %v", ns.Labels)
		}
	})

	t.Run("MarksZtunnelThatDoesNotAnswer", func(t *testing.T) {
		// A pod labelled app=ztunnel on node-1 that listens on no admin
		// port: the port-forward to its 15000 fails as with a hung or
		// crashed ztunnel.
		if _, err := sb.Apply(ctx, fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata: {name: %[1]s}
---
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-silent, namespace: %[1]s, labels: {app: ztunnel}}
spec:
  nodeName: %[2]s
  terminationGracePeriodSeconds: 1
  containers:
  - name: istio-proxy
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "", --grpc-ports, ""]
`, fakeNS, node1)); err != nil {
			t.Fatal(err)
		}
		if _, err := sb.WaitPodsRunning(ctx, fakeNS, "app=ztunnel", 1, time.Minute); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		r := meshctl(t, "--kubeconfig", kc, "--istio-namespace", fakeNS, "--timeout", "5s", "mtls", "status", "-n", meshNS)
		if r.code != 1 || !strings.Contains(r.stdout, "did not answer") || !strings.Contains(r.stdout, "node "+node1) {
			t.Errorf("exit %d:\n%s%s", r.code, r.stdout, r.stderr)
		}
		if !regexpLine(r.stdout, `^`+meshNS+` +server-1 .* unknown +\? +`) {
			t.Errorf("server-1's row is not marked unknown:\n%s", r.stdout)
		}
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("took %v with a 5s timeout", d)
		}
		r = meshctl(t, "--kubeconfig", kc, "--istio-namespace", fakeNS, "--timeout", "5s", "ztunnel-config", "workloads")
		if r.code != 1 || !strings.Contains(r.stderr, "ztunnel "+fakeNS+"/ztunnel-silent on node "+node1) {
			t.Errorf("ztunnel-config: exit %d, stderr %q", r.code, r.stderr)
		}
	})

	t.Run("ErrorsWhenMeshNotInstalled", func(t *testing.T) {
		// A namespace without ztunnel or istiod-lite stands for a cluster
		// without meshlite.
		r := meshctl(t, "--kubeconfig", kc, "--istio-namespace", plainNS, "mtls", "status", "-A")
		if r.code != 1 || !strings.Contains(r.stderr, "meshlite is not installed") || r.stdout != "" {
			t.Errorf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
		}
	})
}

// TestErrorsWhenClusterUnreachable needs no cluster: a kubeconfig that
// points at a closed port.
func TestErrorsWhenClusterUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kc, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: gone, cluster: {server: "https://%s", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: gone, context: {cluster: gone, user: u}}]
current-context: gone
`, addr)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"mtls", "status", "-A"},
		{"ztunnel-config", "workloads"},
		{"enroll", "demo"},
		{"waypoint", "list", "-A"},
	} {
		start := time.Now()
		r := meshctl(t, append([]string{"--kubeconfig", kc, "--timeout", "3s"}, args...)...)
		if r.code != 1 || !strings.HasPrefix(r.stderr, "meshctl: ") || !strings.Contains(r.stderr, "cannot reach the Kubernetes API at "+addr) {
			t.Errorf("%v: exit %d, stderr %q", args, r.code, r.stderr)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("%v took %v", args, d)
		}
	}
	r := meshctl(t, "--kubeconfig", filepath.Join(t.TempDir(), "missing"), "mtls", "status")
	if r.code != 1 || !strings.Contains(r.stderr, "load kubeconfig") {
		t.Errorf("missing kubeconfig: exit %d, stderr %q", r.code, r.stderr)
	}
}

func dynamicGet(ctx context.Context, sb *sandbox.Sandbox, ns, name string) (*unstructured.Unstructured, error) {
	dyn, err := dynamic.NewForConfig(sb.RESTConfig())
	if err != nil {
		return nil, err
	}
	gvr := schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}
	return dyn.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
}

func regexpLine(s, re string) bool {
	rx := regexp.MustCompile(re)
	for _, l := range strings.Split(s, "\n") {
		if rx.MatchString(strings.TrimRight(l, " ")) {
			return true
		}
	}
	return false
}
