package sandboxtest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

// echoApp is a Deployment of bin/echo (image meshlite/echo, the harness's
// echo container) spread over the nodes, with its Service: HTTP on 8080,
// raw TCP echo on 9090.
func echoApp(ns string, replicas int) string {
	return fmt.Sprintf(`
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: %[1]s}
spec:
  replicas: %[2]d
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: echo}}}
      containers:
%[3]s        ports:
        - {name: http, containerPort: 8080}
        - {name: tcp, containerPort: 9090}
        readinessProbe:
          tcpSocket: {port: 9090}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: %[1]s}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp, port: 9090, targetPort: 9090}
`, ns, replicas, meshharness.EchoContainer("      "))
}

// env is one test's sandbox, namespace and kubectl.
type env struct {
	t  *testing.T
	sb *sandbox.Sandbox
	ns string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	sb := sandbox.Start(t)
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(repo, "bin", "echo")); err != nil {
		t.Fatalf("bin/echo missing (the sample app image meshlite/echo): run make build")
	}
	ns := strings.ToLower(strings.NewReplacer("_", "-", "/", "-").Replace(t.Name()))
	if len(ns) > 50 {
		ns = ns[:50]
	}
	ns = strings.Trim(ns, "-")
	e := &env{t: t, sb: sb, ns: ns}
	ctx := context.Background()
	_, err = sb.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	t.Cleanup(func() {
		err := sb.Client().CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete namespace %s: %v", ns, err)
		}
	})
	return e
}

// kubectl runs kubectl against the sandbox and returns its stdout.
func (e *env) kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", e.sb.Kubeconfig(), "-n", e.ns}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

// deployEcho applies the echo app with kubectl and waits for its pods.
func (e *env) deployEcho(ctx context.Context, replicas int) []corev1.Pod {
	e.t.Helper()
	if _, err := e.kubectl(ctx, echoApp(e.ns, replicas), "apply", "-f", "-"); err != nil {
		e.t.Fatal(err)
	}
	pods, err := e.sb.WaitPodsRunning(ctx, e.ns, "app=echo", replicas, 90*time.Second)
	if err != nil {
		out, _ := e.kubectl(ctx, "", "get", "pods", "-o", "wide")
		ev, _ := e.kubectl(ctx, "", "get", "events")
		e.t.Fatalf("%v\n%s\n%s", err, out, ev)
	}
	sort.Slice(pods, func(i, j int) bool { return pods[i].Spec.NodeName < pods[j].Spec.NodeName })
	return pods
}

func TestDeployment_FourReplicasSpreadOverNodesWithEndpointSlice(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pods := e.deployEcho(ctx, 4)

	perNode := map[string]int{}
	for _, p := range pods {
		perNode[p.Spec.NodeName]++
		node, err := e.sb.Client().CoreV1().Nodes().Get(ctx, p.Spec.NodeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cidr, err := netip.ParsePrefix(node.Spec.PodCIDR)
		if err != nil {
			t.Fatalf("node %s pod CIDR %q: %v", node.Name, node.Spec.PodCIDR, err)
		}
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !cidr.Contains(ip) {
			t.Errorf("pod %s on %s has IP %q outside the node's %s", p.Name, node.Name, p.Status.PodIP, cidr)
		}
	}
	if len(perNode) != 2 || perNode["node-0"] != 2 || perNode["node-1"] != 2 {
		t.Errorf("pods per node %v, want 2 on each of node-0 and node-1", perNode)
	}

	// The EndpointSlice controller lists every pod as a ready endpoint.
	want := map[string]bool{}
	for _, p := range pods {
		want[p.Status.PodIP] = true
	}
	var got map[string]bool
	err := e.sb.WaitFor(ctx, 30*time.Second, "EndpointSlice with 4 ready endpoints", func(ctx context.Context) (bool, error) {
		l, err := e.sb.Client().DiscoveryV1().EndpointSlices(e.ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=echo"})
		if err != nil {
			return false, nil
		}
		got = map[string]bool{}
		for _, s := range l.Items {
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
					for _, a := range ep.Addresses {
						got[a] = true
					}
				}
			}
		}
		return fmt.Sprint(got) == fmt.Sprint(want), nil
	})
	if err != nil {
		t.Fatalf("%v: ready endpoints %v, want %v", err, got, want)
	}
}

func TestNetwork_PodReachesPodOnOtherNodeAndHostReachesPods(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pods := e.deployEcho(ctx, 2)
	a, b := pods[0], pods[1]
	if a.Spec.NodeName == b.Spec.NodeName {
		t.Fatalf("both pods on %s; the spread constraint should split them", a.Spec.NodeName)
	}

	// Raw TCP from inside pod a's namespace to pod b on the other node.
	c, err := e.sb.Dial(ctx, e.ns, a.Name, net.JoinHostPort(b.Status.PodIP, "9090"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := "across the underlay\n"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != msg {
		t.Fatalf("echo from %s: %q, %v", b.Name, line, err)
	}
	// The server saw pod a's own address: no NAT between pods.
	out, err := e.kubectl(ctx, "", "exec", a.Name, "--", "echo", "client", "http://"+net.JoinHostPort(b.Status.PodIP, "8080")+"/whoami")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Pod="+b.Name) || !strings.Contains(out, "Peer="+a.Status.PodIP+":") {
		t.Errorf("echo client in %s to %s:\n%s\nwant Pod=%s and Peer=%s:<port>", a.Name, b.Name, out, b.Name, a.Status.PodIP)
	}

	// The host reaches every pod through the underlay.
	hc := &http.Client{Timeout: 5 * time.Second}
	for _, p := range pods {
		resp, err := hc.Get("http://" + net.JoinHostPort(p.Status.PodIP, "8080") + "/")
		if err != nil {
			t.Errorf("host -> pod %s (%s): %v", p.Name, p.Status.PodIP, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), "Node="+p.Spec.NodeName) {
			t.Errorf("host -> pod %s: answer lacks Node=%s:\n%s", p.Name, p.Spec.NodeName, body)
		}
	}

	// The kubernetes Service VIP leads pods to the apiserver, which
	// answers a plaintext request on its TLS port with 400.
	if out, err := e.kubectl(ctx, "", "exec", a.Name, "--", "echo", "client", "-expect-status", "400", "http://"+e.sb.Plan.ServiceCIDR.Masked().Addr().Next().String()+":443/"); err != nil {
		t.Errorf("pod -> kubernetes Service VIP: %v\n%s", err, out)
	}
}

func TestKubectl_LogsExecAndPortForward(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pod := e.deployEcho(ctx, 1)[0]

	var logs string
	err := e.sb.WaitFor(ctx, 10*time.Second, "echo's startup log", func(ctx context.Context) (bool, error) {
		var err error
		logs, err = e.kubectl(ctx, "", "logs", pod.Name)
		return err == nil && strings.Contains(logs, "echo listening"), nil
	})
	if err != nil {
		t.Errorf("kubectl logs: %v\n%s", err, logs)
	}

	out, err := e.kubectl(ctx, "", "exec", pod.Name, "--", "sh", "-c", "echo $POD_NAME; hostname; cat /etc/resolv.conf")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(out, "\n")
	if len(lines) < 3 || lines[0] != pod.Name || lines[1] != pod.Name || !strings.Contains(out, "nameserver "+e.sb.Plan.ClusterDNS().String()) {
		t.Errorf("kubectl exec output:\n%s\nwant the pod name twice and nameserver %s", out, e.sb.Plan.ClusterDNS())
	}
	// A failing command's exit code comes back through the kubelet API.
	if _, err := e.kubectl(ctx, "", "exec", pod.Name, "--", "sh", "-c", "exit 3"); err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("kubectl exec of `exit 3`: %v", err)
	}

	// port-forward: kubectl picks a free local port and says which.
	pf := exec.CommandContext(ctx, "kubectl", "--kubeconfig", e.sb.Kubeconfig(), "-n", e.ns, "port-forward", "pod/"+pod.Name, ":8080")
	stdout, err := pf.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var pfErr bytes.Buffer
	pf.Stderr = &pfErr
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pf.Process.Kill(); _ = pf.Wait() }()
	var local string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		// "Forwarding from 127.0.0.1:41235 -> 8080"
		if f := strings.Fields(sc.Text()); len(f) >= 3 && f[0] == "Forwarding" && strings.HasPrefix(f[2], "127.0.0.1:") {
			local = f[2]
			break
		}
	}
	if local == "" {
		t.Fatalf("port-forward never said where it listens: %s", pfErr.String())
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + local + "/through-port-forward")
	if err != nil {
		t.Fatalf("GET through port-forward: %v (%s)", err, pfErr.String())
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "Pod="+pod.Name) || !strings.Contains(string(body), "URL=/through-port-forward") {
		t.Errorf("answer through port-forward:\n%s", body)
	}
}

func TestDeleteDeployment_RemovesPodNamespaces(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pods := e.deployEcho(ctx, 2)
	var netns []string
	for _, p := range pods {
		path, err := e.sb.PodNetns(ctx, e.ns, p.Name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("pod %s netns: %v", p.Name, err)
		}
		netns = append(netns, path)
	}
	if _, err := e.kubectl(ctx, "", "delete", "deployment", "echo"); err != nil {
		t.Fatal(err)
	}
	err := e.sb.WaitFor(ctx, 60*time.Second, "pods and their namespaces gone", func(ctx context.Context) (bool, error) {
		l, err := e.sb.Client().CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil || len(l.Items) > 0 {
			return false, nil
		}
		for _, p := range netns {
			if _, err := os.Stat(p); err == nil {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		for _, p := range netns {
			if _, serr := os.Stat(p); serr == nil {
				t.Errorf("netns %s still exists", p)
			}
		}
		t.Fatal(err)
	}
}

func TestCLI_ExecAndLogsInPod(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pod := e.deployEcho(ctx, 1)[0]
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(repo, "bin", "sandbox")
	run := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, bin, append([]string{"--state-dir", e.sb.Dir}, args...)...).CombinedOutput()
		return string(out), err
	}
	out, err := run("exec", e.ns+"/"+pod.Name, "--", "ip", "-o", "-4", "addr", "show", "eth0")
	if err != nil || !strings.Contains(out, " "+pod.Status.PodIP+"/") {
		t.Errorf("sandbox exec ip addr: %v\n%s\nwant the pod IP %s", err, out, pod.Status.PodIP)
	}
	if _, err := run("exec", e.ns+"/"+pod.Name, "--", "sh", "-c", "exit 7"); err == nil {
		t.Error("sandbox exec of a failing command succeeded")
	} else if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 7 {
		t.Errorf("sandbox exec exit: %v, want status 7", err)
	}
	out, err = run("logs", e.ns+"/"+pod.Name)
	if err != nil || !strings.Contains(out, "echo listening") {
		t.Errorf("sandbox logs: %v\n%s", err, out)
	}
	if out, err := run("exec", e.ns+"/no-such-pod", "--", "true"); err == nil {
		t.Errorf("sandbox exec into a missing pod succeeded: %s", out)
	}
}
