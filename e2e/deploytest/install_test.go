package deploytest

import (
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshchart "github.com/meshlite/meshlite/deploy/helm"
	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/kube"
)

const appNS = "deploytest-app"

func appYAML(node0, node1 string) string {
	return fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: %[1]s}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: %[1]s, labels: {app: client}}
spec:
  nodeName: %[2]s
  serviceAccountName: client
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "", --grpc-ports, ""]
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: %[1]s, labels: {app: echo}}
spec:
  nodeName: %[3]s
  serviceAccountName: echo
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "9090", --grpc-ports, ""]
    readinessProbe:
      httpGet: {path: /, port: 8080}
      periodSeconds: 1
`, appNS, node0, node1)
}

// TestChart_InstallEnrollUpgradeUninstall installs the mesh from the chart into
// the sandbox, as a user installs it, and checks what the chart is for:
// istiod-lite, a CNI agent and a ztunnel per node get ready; pods of an
// enrolled namespace get redirected and talk over HBONE with mTLS and their
// SPIFFE identities (seen in ztunnel's connection table); an upgrade to the
// next chart version rolls every component (ztunnel through a DaemonSet
// rollout with surge) without failing a connection; the uninstall unchains
// mesh-cni from every node and removes the in-pod redirection, after which
// the same pods talk directly.
func TestChart_InstallEnrollUpgradeUninstall(t *testing.T) {
	sb := sandbox.Start(t)
	if sb.Plan.Nodes < 2 {
		t.Fatalf("the sandbox has %d nodes; this test needs 2", sb.Plan.Nodes)
	}
	if err := meshharness.NeedBinaries(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	// The harness's probes of ztunnel's admin endpoint; the install is
	// this test's own.
	h := &meshharness.Env{Sandbox: sb, Ctx: ctx}
	if have, err := meshinstall.Installed(ctx, sb); err != nil {
		t.Fatal(err)
	} else if have {
		t.Fatalf("a mesh is installed in the sandbox already (make demo's, or a leftover): `make down` first")
	}

	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	start := time.Now()
	mesh, err := meshinstall.Install(ctx, sb, meshinstall.Options{CaptureNamespaces: []string{appNS}, Log: log})
	if err != nil {
		t.Fatalf("install from the chart: %v", err)
	}
	t.Logf("mesh installed from the chart and ready in %v (%d objects)", time.Since(start).Round(time.Millisecond), len(mesh.Objects()))
	uninstalled := false
	t.Cleanup(func() {
		if !uninstalled {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := mesh.Uninstall(ctx); err != nil {
				t.Errorf("uninstall: %v", err)
			}
		}
	})

	if _, err := sb.Apply(ctx, appYAML(sb.NodeName(0), sb.NodeName(1))); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Wait for the namespace to go: a next run would otherwise
		// create its pods while these are still being deleted.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		sb.Client().CoreV1().Namespaces().Delete(ctx, appNS, metav1.DeleteOptions{})
		for ctx.Err() == nil {
			if _, err := sb.Client().CoreV1().Namespaces().Get(ctx, appNS, metav1.GetOptions{}); apierrors.IsNotFound(err) {
				return
			}
			time.Sleep(300 * time.Millisecond)
		}
		t.Errorf("namespace %s still there a minute after its deletion", appNS)
	})
	client := waitRedirected(ctx, t, sb, "client")
	echo := waitRedirected(ctx, t, sb, "echo")

	// Enrolled: a connection from client to echo is HBONE with mTLS, as
	// the client node's ztunnel sees it.
	conn, err := sb.Dial(ctx, appNS, "client", net.JoinHostPort(echo.Status.PodIP, "9090"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := (meshharness.EchoConn{Conn: conn}).RoundTrip("over the mesh"); err != nil {
		t.Fatal(err)
	}
	spiffe := func(sa string) string { return meshharness.Spiffe(appNS, sa) }
	found := false
	var table []meshharness.ConnInfo
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !found; time.Sleep(200 * time.Millisecond) {
		table = h.Connections(t, 0)
		for _, c := range table {
			if c.Dst == net.JoinHostPort(echo.Status.PodIP, "9090") && c.Direction == "outbound" {
				if c.Security != "mtls" || c.SrcIdentity != spiffe("client") || c.DstIdentity != spiffe("echo") {
					t.Fatalf("client -> echo is not mTLS with the pods' identities: %v", c)
				}
				found = true
			}
		}
	}
	if !found {
		t.Fatalf("ztunnel on %s shows no connection from client (%s) to echo:9090: %v", sb.NodeName(0), client.Status.PodIP, table)
	}
	conn.Close()

	for _, p := range []*corev1.Pod{client, echo} {
		if rules := inPodRules(ctx, t, sb, p.Name); !strings.Contains(rules, "ISTIO_OUTPUT") {
			t.Fatalf("pod %s has no redirection rules while enrolled:\n%s", p.Name, rules)
		}
	}

	// Upgrade to the next chart version: every component rolls, ztunnel
	// with a surge pod beside the old one on each node. New connections
	// from the enrolled client keep working all along.
	oldZtunnels := podNames(ctx, t, sb, "app=ztunnel")
	logCtx, stopLogs := context.WithCancel(ctx)
	defer stopLogs()
	meshLog := followMeshLogs(logCtx, sb)
	stopTraffic := make(chan struct{})
	type result struct {
		ok, failed int
		firstErr   error
	}
	results := make(chan result, 1)
	go func() {
		var r result
		defer func() { results <- r }()
		for {
			select {
			case <-stopTraffic:
				return
			case <-time.After(200 * time.Millisecond):
			}
			c, err := sb.Dial(ctx, appNS, "client", net.JoinHostPort(echo.Status.PodIP, "9090"))
			if err == nil {
				err = meshharness.EchoConn{Conn: c}.RoundTrip("during the upgrade")
				c.Close()
			}
			if err != nil {
				r.failed++
				if r.firstErr == nil {
					r.firstErr = fmt.Errorf("%s: %w", time.Now().Format(time.TimeOnly), err)
				}
				continue
			}
			r.ok++
		}
	}()
	start = time.Now()
	upErr := mesh.Upgrade(ctx, meshinstall.Options{CaptureNamespaces: []string{appNS}, Chart: nextChartVersion(t), Log: log})
	close(stopTraffic)
	traffic := <-results
	if upErr != nil {
		t.Fatalf("upgrade to the next chart version: %v", upErr)
	}
	t.Logf("upgraded in %v; connections during the upgrade: %d ok, %d failed", time.Since(start).Round(time.Millisecond), traffic.ok, traffic.failed)
	if traffic.failed > 0 || traffic.ok < 10 {
		t.Errorf("connections during the upgrade: %d ok, %d failed (first: %v)", traffic.ok, traffic.failed, traffic.firstErr)
		time.Sleep(time.Second) // the stopping pods' last lines
		stopLogs()
		meshLog.wg.Wait()
		t.Logf("mesh logs during the upgrade:\n%s", meshLog)
	}
	for _, n := range podNames(ctx, t, sb, "app=ztunnel") {
		if slices.Contains(oldZtunnels, n) {
			t.Errorf("ztunnel pod %s did not roll", n)
		}
	}
	conn2, err := sb.Dial(ctx, appNS, "client", net.JoinHostPort(echo.Status.PodIP, "9090"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	if err := (meshharness.EchoConn{Conn: conn2}).RoundTrip("after the upgrade"); err != nil {
		t.Fatal(err)
	}
	found = false
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !found; time.Sleep(200 * time.Millisecond) {
		for _, c := range h.Connections(t, 0) {
			if c.Dst == net.JoinHostPort(echo.Status.PodIP, "9090") && c.Direction == "outbound" &&
				c.Security == "mtls" && c.SrcIdentity == spiffe("client") {
				found = true
			}
		}
	}
	if !found {
		t.Errorf("after the upgrade the new ztunnel on %s shows no mTLS connection from client to echo", sb.NodeName(0))
	}
	conn2.Close()

	// Uninstall: nodes unchained (Uninstall fails otherwise), no rule left
	// in the pods, and they talk directly.
	start = time.Now()
	err = mesh.Uninstall(ctx)
	uninstalled = true
	if err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	t.Logf("uninstalled in %v", time.Since(start).Round(time.Millisecond))
	for _, p := range []*corev1.Pod{client, echo} {
		if rules := inPodRules(ctx, t, sb, p.Name); strings.Contains(rules, "ISTIO_") || strings.Contains(rules, "lookup 100") {
			t.Errorf("pod %s keeps meshlite's redirection after the uninstall:\n%s", p.Name, rules)
		}
	}
	var lastErr error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		var c net.Conn
		if c, lastErr = sb.Dial(ctx, appNS, "client", net.JoinHostPort(echo.Status.PodIP, "9090")); lastErr == nil {
			lastErr = meshharness.EchoConn{Conn: c}.RoundTrip("without the mesh")
			c.Close()
			if lastErr == nil {
				break
			}
		}
	}
	if lastErr != nil {
		t.Errorf("client -> echo after the uninstall: %v", lastErr)
	}
}

// podNames are the names of the mesh pods matching selector.
func podNames(ctx context.Context, t *testing.T, sb *sandbox.Sandbox, selector string) []string {
	t.Helper()
	l, err := sb.Client().CoreV1().Pods(meshinstall.Namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range l.Items {
		out = append(out, p.Name)
	}
	return out
}

// nextChartVersion is the embedded chart as its next patch version: the
// same templates, a new version in every object's helm.sh/chart label, so
// an upgrade rolls every pod.
func nextChartVersion(t *testing.T) fs.FS {
	t.Helper()
	next := fstest.MapFS{}
	err := fs.WalkDir(meshchart.Chart(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(meshchart.Chart(), p)
		if err != nil {
			return err
		}
		if p == "Chart.yaml" {
			if !strings.Contains(string(b), "\nversion: 0.1.0\n") {
				return fmt.Errorf("Chart.yaml has no version 0.1.0 to bump:\n%s", b)
			}
			b = []byte(strings.Replace(string(b), "\nversion: 0.1.0\n", "\nversion: 0.1.1\n", 1))
		}
		next[p] = &fstest.MapFile{Data: b, Mode: 0o644}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return next
}

// waitRedirected waits until pod name in appNS runs, is ready and carries
// the CNI agent's redirection annotation.
func waitRedirected(ctx context.Context, t *testing.T, sb *sandbox.Sandbox, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	err := sb.WaitFor(ctx, 90*time.Second, "pod "+name+" redirected", func(ctx context.Context) (bool, error) {
		p, err := sb.Client().CoreV1().Pods(appNS).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" &&
			p.Annotations[kube.AnnotationRedirection] == "enabled", nil
	})
	if err != nil {
		t.Fatalf("%v (pod: %+v)", err, pod)
	}
	return pod
}

// inPodRules is what pod name's network namespace holds of iptables rules
// and policy routing.
func inPodRules(ctx context.Context, t *testing.T, sb *sandbox.Sandbox, name string) string {
	t.Helper()
	path, err := sb.PodNetns(ctx, appNS, name)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, argv := range [][]string{{"iptables-save"}, {"ip", "rule", "show"}} {
		out, err := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + path, "--"}, argv...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v in pod %s: %v\n%s", argv, name, err, out)
		}
		b.Write(out)
	}
	return b.String()
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
