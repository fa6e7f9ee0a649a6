package deploytest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshchart "github.com/meshlite/meshlite/deploy/helm"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/internal/nsenter"
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
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"istiod-lite", "cni-agent", "mesh-cni", "ztunnel", "echo"} {
		if _, err := os.Stat(filepath.Join(repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing: run make build", b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
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
	if err := roundTrip(conn, "over the mesh"); err != nil {
		t.Fatal(err)
	}
	spiffe := func(sa string) string { return "spiffe://cluster.local/ns/" + appNS + "/sa/" + sa }
	found := false
	var table []map[string]any
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !found; time.Sleep(200 * time.Millisecond) {
		table = connections(t, sb, 0)
		for _, c := range table {
			if c["dst"] == net.JoinHostPort(echo.Status.PodIP, "9090") && c["direction"] == "outbound" {
				if c["security"] != "mtls" || c["src_identity"] != spiffe("client") || c["dst_identity"] != spiffe("echo") {
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
				err = roundTrip(c, "during the upgrade")
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
	if err := roundTrip(conn2, "after the upgrade"); err != nil {
		t.Fatal(err)
	}
	found = false
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !found; time.Sleep(200 * time.Millisecond) {
		for _, c := range connections(t, sb, 0) {
			if c["dst"] == net.JoinHostPort(echo.Status.PodIP, "9090") && c["direction"] == "outbound" &&
				c["security"] == "mtls" && c["src_identity"] == spiffe("client") {
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
			lastErr = roundTrip(c, "without the mesh")
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

func roundTrip(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if strings.TrimSuffix(line, "\n") != msg {
		return fmt.Errorf("echoed %q, sent %q", line, msg)
	}
	return nil
}

// connections is node i's ztunnel connection table (its admin endpoint,
// 127.0.0.1:15000 inside the node).
func connections(t *testing.T, sb *sandbox.Sandbox, node int) []map[string]any {
	t.Helper()
	nsPath := netlab.NetnsPath(sb.Plan.NodeNetns(node))
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
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("http://127.0.0.1:15000/debug/connections")
	if err != nil {
		t.Fatalf("ztunnel admin on node %d: %v", node, err)
	}
	defer resp.Body.Close()
	var out []map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("decode the connection table of node %d: %v", node, err)
	}
	return out
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
