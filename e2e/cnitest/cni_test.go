package cnitest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshlite/meshlite/cni/install"
	"github.com/meshlite/meshlite/cni/netnstest"
	"github.com/meshlite/meshlite/cni/rules"
	"github.com/meshlite/meshlite/cni/zds/zdstest"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/internal/nsenter"
	pb "github.com/meshlite/meshlite/proto/zds"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

const (
	agentNS     = "cnitest-system"
	plainNS     = "cnitest-plain"
	ambientNS   = "cnitest-ambient"
	lateNS      = "cnitest-late"
	readyPort   = 18090
	metricsPort = 18091
	addTimeout  = 5 * time.Second
)

// agentManifest is the agent as a DaemonSet with its own ServiceAccount and
// the least RBAC it needs. Node roots differ per node in the sandbox, so
// --host-root is derived from NODE_NAME.
func agentManifest(stateDir string) string {
	return fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata: {name: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: cni-agent, namespace: %[1]s}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: cnitest-cni-agent}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: cnitest-cni-agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cnitest-cni-agent}
subjects: [{kind: ServiceAccount, name: cni-agent, namespace: %[1]s}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cni-agent, namespace: %[1]s}
rules:
- apiGroups: [apps]
  resources: [daemonsets]
  resourceNames: [cni-agent]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: cni-agent, namespace: %[1]s}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cni-agent}
subjects: [{kind: ServiceAccount, name: cni-agent, namespace: %[1]s}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: cni-agent, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: cni-agent}}
  template:
    metadata: {labels: {app: cni-agent}}
    spec:
      serviceAccountName: cni-agent
      hostNetwork: true
      terminationGracePeriodSeconds: 20
      containers:
      - name: agent
        image: meshlite/cni-agent:dev
        args:
        - --host-root=%[2]s/nodes/$(NODE_NAME)/root
        - --cni-add-timeout=%[3]s
        - --ready-addr=:%[4]d
        - --metrics-addr=:%[5]d
        - --exclude-namespaces=%[1]s
        - --capture-namespaces=%[6]s
        - --rules-verify-interval=2s
        env:
        - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        securityContext: {privileged: true}
        readinessProbe:
          httpGet: {path: /readyz, port: %[4]d}
          periodSeconds: 1
        volumeMounts:
        - {name: cni-bin, mountPath: /opt/cni/bin}
        - {name: cni-conf, mountPath: /etc/cni/net.d}
        - {name: ztunnel, mountPath: /var/run/ztunnel}
        - {name: run, mountPath: /var/run/meshlite}
        - {name: netns, mountPath: /var/run/netns, mountPropagation: HostToContainer}
      volumes:
      - {name: cni-bin, hostPath: {path: /opt/cni/bin, type: DirectoryOrCreate}}
      - {name: cni-conf, hostPath: {path: /etc/cni/net.d, type: DirectoryOrCreate}}
      - {name: ztunnel, hostPath: {path: /var/run/ztunnel, type: DirectoryOrCreate}}
      - {name: run, hostPath: {path: /var/run/meshlite, type: DirectoryOrCreate}}
      - {name: netns, hostPath: {path: /var/run/netns}}
`, agentNS, stateDir, addTimeout, readyPort, metricsPort, strings.Join([]string{plainNS, ambientNS, lateNS}, ","))
}

// podYAML is a bin/echo pod pinned to a node. probe adds a TCP readiness
// probe on the echo port, which only passes through an enrolled pod's
// rules thanks to the probe SNAT.
func podYAML(ns, name, node string, labels map[string]string, probe bool) string {
	var lb strings.Builder
	for k, v := range labels {
		fmt.Fprintf(&lb, "\n    %s: %q", k, v)
	}
	p := ""
	if probe {
		p = `
    readinessProbe:
      tcpSocket: {port: 9090}
      periodSeconds: 1`
	}
	return fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
  labels:
    test: cni%s
spec:
  nodeName: %s
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "9090", --grpc-ports, ""]%s
`, name, ns, lb.String(), node, p)
}

type suite struct {
	t    *testing.T // the running (sub)test
	top  *testing.T
	sb   *sandbox.Sandbox
	ctx  context.Context
	repo string

	mu       sync.Mutex
	logs     map[string]*lockedBuffer // agent pod logs, followed
	holder   *zdstest.Holder
	captured map[string]net.Listener // test ztunnel's 15001 listeners by pod uid
}

func (s *suite) root(i int) netlab.NodeRoot { return s.sb.NodeRoot(i) }

func (s *suite) zdsSocket(i int) string { return filepath.Join(s.root(i).ZtunnelDir, "ztunnel.sock") }

func (s *suite) conflist(i int) string {
	b, err := os.ReadFile(filepath.Join(s.root(i).CNIConfDir, netlab.ConflistName))
	if err != nil {
		s.t.Fatalf("read node %d conflist: %v", i, err)
	}
	return string(b)
}

func chainedTypes(conflist string) string {
	var l struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal([]byte(conflist), &l); err != nil {
		return "invalid: " + err.Error()
	}
	var out []string
	for _, p := range l.Plugins {
		out = append(out, p.Type)
	}
	return strings.Join(out, ",")
}

func (s *suite) waitFor(timeout time.Duration, what string, cond func() (bool, error)) {
	s.t.Helper()
	err := s.sb.WaitFor(s.ctx, timeout, what, func(context.Context) (bool, error) { return cond() })
	if err != nil {
		s.t.Fatal(err)
	}
}

func (s *suite) apply(yaml string) {
	s.t.Helper()
	if _, err := s.sb.Apply(s.ctx, yaml); err != nil {
		s.t.Fatalf("apply: %v", err)
	}
}

func (s *suite) pod(ns, name string) *corev1.Pod {
	s.t.Helper()
	p, err := s.sb.Client().CoreV1().Pods(ns).Get(s.ctx, name, metav1.GetOptions{})
	if err != nil {
		s.t.Fatalf("get pod %s/%s: %v", ns, name, err)
	}
	return p
}

func running(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (s *suite) waitRunning(ns, name string, timeout time.Duration) *corev1.Pod {
	s.t.Helper()
	var p *corev1.Pod
	err := s.sb.WaitFor(s.ctx, timeout, fmt.Sprintf("pod %s/%s running and ready", ns, name), func(ctx context.Context) (bool, error) {
		var err error
		p, err = s.sb.Client().CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return running(p), nil
	})
	if err != nil {
		s.t.Fatalf("%v\nevents:\n%s", err, s.events(ns, name))
	}
	return p
}

func (s *suite) events(ns, name string) string {
	l, err := s.sb.Client().CoreV1().Events(ns).List(s.ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range l.Items {
		fmt.Fprintf(&b, "  %s %s: %s\n", e.Type, e.Reason, e.Message)
	}
	return b.String()
}

func (s *suite) podRules(ns, name string) string {
	s.t.Helper()
	out, err := s.sb.Exec(s.ctx, ns, name, "iptables-save")
	if err != nil {
		s.t.Fatalf("iptables-save in pod %s/%s: %v", ns, name, err)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "ISTIO") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

func (s *suite) nodeRules(i int) string {
	s.t.Helper()
	var out []byte
	err := nsenter.DoPath(netlab.NetnsPath(s.sb.Plan.NodeNetns(i)), func() error {
		var err error
		out, err = runCmd("iptables-save", "-t", "nat")
		return err
	})
	if err != nil {
		s.t.Fatalf("iptables-save in node %d: %v", i, err)
	}
	return string(out)
}

func (s *suite) annotation(ns, name string) string {
	return s.pod(ns, name).Annotations[kube.AnnotationRedirection]
}

func (s *suite) label(ns string, value *string) {
	s.t.Helper()
	v := "null"
	if value != nil {
		v = fmt.Sprintf("%q", *value)
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, kube.LabelDataplaneMode, v)
	if _, err := s.sb.Client().CoreV1().Namespaces().Patch(s.ctx, ns, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		s.t.Fatalf("label namespace %s: %v", ns, err)
	}
}

func (s *suite) namespace(name string, ambient bool) {
	s.t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if ambient {
		ns.Labels = map[string]string{kube.LabelDataplaneMode: kube.DataplaneModeAmbient}
	}
	_, err := s.sb.Client().CoreV1().Namespaces().Create(s.ctx, ns, metav1.CreateOptions{})
	if err != nil {
		s.t.Fatalf("create namespace %s: %v", name, err)
	}
}

// netnsOf opens a pod's network namespace.
func (s *suite) netnsOf(ns, name string) *os.File {
	s.t.Helper()
	p, err := s.sb.PodNetns(s.ctx, ns, name)
	if err != nil {
		s.t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		s.t.Fatalf("open netns of %s/%s: %v", ns, name, err)
	}
	s.t.Cleanup(func() { f.Close() })
	return f
}

// connectHolder connects a test ztunnel to node i's ZDS socket. For pods
// named capture-*, it listens on 15001 inside the netns it is handed, as
// ztunnel would, so redirected traffic can be seen arriving.
func (s *suite) connectHolder(i int) *zdstest.Holder {
	s.t.Helper()
	h, err := s.tryConnectHolder(i)
	if err != nil {
		s.t.Fatalf("connect test ztunnel: %v", err)
	}
	return h
}

// tryConnectHolder is connectHolder returning the dial error.
func (s *suite) tryConnectHolder(i int) (*zdstest.Holder, error) {
	h, err := zdstest.NewHolder(s.zdsSocket(i))
	if err != nil {
		return nil, err
	}
	h.OnAdd = func(uid string, info *pb.WorkloadInfo, ns *os.File) {
		if ns == nil || !strings.HasPrefix(info.GetName(), "capture") {
			return
		}
		var l net.Listener
		err := netnstest.In(ns, func() error {
			var err error
			l, err = net.Listen("tcp4", "0.0.0.0:15001")
			return err
		})
		if err != nil {
			s.t.Errorf("test ztunnel: listen in %s's netns: %v", info.GetName(), err)
			return
		}
		s.mu.Lock()
		if old := s.captured[uid]; old != nil {
			old.Close()
		}
		s.captured[uid] = l
		s.mu.Unlock()
	}
	h.Start()
	s.mu.Lock()
	s.holder = h
	s.mu.Unlock()
	return h, nil
}

func (s *suite) closeHolder() {
	s.mu.Lock()
	h := s.holder
	s.holder = nil
	for uid, l := range s.captured {
		l.Close()
		delete(s.captured, uid)
	}
	s.mu.Unlock()
	if h != nil {
		h.Close()
	}
}

func runCmd(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}

func (s *suite) metric(i int, name string) string {
	resp, err := http.Get(fmt.Sprintf("http://%s:%d/metrics", s.sb.Plan.NodeIP(i), metricsPort))
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, name) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// runPlugin runs the installed mesh-cni binary of node i the way a runtime
// does, for pod ns/name (nil pod: STATUS), and returns its stdout.
func (s *suite) runPlugin(i int, command, cniVersion string, pod *corev1.Pod) (string, error) {
	sock := filepath.Join(s.root(i).Dir, "var/run/meshlite/cni/agent.sock")
	conf := map[string]any{"cniVersion": cniVersion, "name": "sandbox", "type": "mesh-cni", "agent_socket": sock, "add_timeout": "5s"}
	env := []string{"CNI_COMMAND=" + command, "CNI_PATH=" + s.root(i).CNIBinDir}
	if pod != nil {
		netnsPath, err := s.sb.PodNetns(s.ctx, pod.Namespace, pod.Name)
		if err != nil {
			return "", err
		}
		conf["prevResult"] = map[string]any{
			"cniVersion": cniVersion,
			"interfaces": []any{map[string]any{"name": "eth0", "sandbox": netnsPath}},
			"ips":        []any{map[string]any{"interface": 0, "address": pod.Status.PodIP + "/24"}},
		}
		env = append(env, "CNI_CONTAINERID="+string(pod.UID), "CNI_NETNS="+netnsPath, "CNI_IFNAME=eth0",
			fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", pod.Namespace, pod.Name, pod.UID))
	}
	stdin, _ := json.Marshal(conf)
	cmd := exec.CommandContext(s.ctx, filepath.Join(s.root(i).CNIBinDir, "mesh-cni"))
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	return out.String(), err
}

// followAgentLogs copies every agent pod's log into s.logs until ctx ends,
// so a failure can show what the agent did.
func (s *suite) followAgentLogs(ctx context.Context) {
	seen := map[string]bool{}
	for ctx.Err() == nil {
		l, err := s.sb.Client().CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent"})
		if err == nil {
			for _, p := range l.Items {
				if seen[p.Name] || p.Status.Phase != corev1.PodRunning {
					continue
				}
				seen[p.Name] = true
				buf := &lockedBuffer{}
				s.mu.Lock()
				s.logs[p.Spec.NodeName+"/"+p.Name] = buf
				s.mu.Unlock()
				go s.sb.Logs(ctx, agentNS, p.Name, "agent", true, buf)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// cleanup removes everything the test made, and, should the agent not have
// uninstalled itself, takes mesh-cni out of the nodes' conflists so the
// shared sandbox keeps working.
func (s *suite) cleanup() {
	s.closeHolder()
	if s.top.Failed() || testing.Verbose() {
		s.mu.Lock()
		for name, b := range s.logs {
			s.top.Logf("log of agent %s:\n%s", name, b.String())
		}
		s.mu.Unlock()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cs := s.sb.Client()
	for _, ns := range []string{ambientNS, plainNS, lateNS} {
		if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			s.top.Errorf("delete namespace %s: %v", ns, err)
		}
	}
	if err := s.sb.Delete(ctx, agentManifest(s.sb.Dir)); err != nil {
		s.top.Errorf("delete agent: %v", err)
	}
	// Give the agent its chance to uninstall, then make sure.
	sandbox.WaitFor(ctx, 30*time.Second, "agent pods gone", func(ctx context.Context) (bool, error) {
		l, err := cs.CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent"})
		return err == nil && len(l.Items) == 0, nil
	})
	tables, terr := rules.NewTables()
	for i := 0; i < s.sb.Plan.Nodes; i++ {
		p := filepath.Join(s.root(i).CNIConfDir, netlab.ConflistName)
		if b, err := os.ReadFile(p); err == nil {
			if out, changed, err := install.Unchain(b, "mesh-cni"); err == nil && changed {
				s.top.Errorf("node %d: mesh-cni was still chained after the test; removing it", i)
				os.WriteFile(p, out, 0o644)
			}
		}
		os.Remove(filepath.Join(s.root(i).CNIBinDir, "mesh-cni"))
		if terr == nil {
			if h, err := rules.NewHost(tables, rules.Config{}); err == nil {
				nsenter.DoPath(netlab.NetnsPath(s.sb.Plan.NodeNetns(i)), h.Remove)
			}
		}
	}
}

func TestCNI(t *testing.T) {
	netnstest.RequireRoot(t)
	sb := sandbox.Start(t)
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"cni-agent", "mesh-cni", "echo"} {
		if _, err := os.Stat(filepath.Join(repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing: run make build", b)
		}
	}
	if sb.Plan.Nodes < 2 {
		t.Fatalf("the sandbox has %d nodes; this test needs 2", sb.Plan.Nodes)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	s := &suite{t: t, top: t, sb: sb, ctx: ctx, repo: repo, captured: map[string]net.Listener{}, logs: map[string]*lockedBuffer{}}
	for i := 0; i < sb.Plan.Nodes; i++ {
		if strings.Contains(s.conflist(i), "mesh-cni") {
			t.Fatalf("node %d conflist already chains mesh-cni (another run's leftover?):\n%s", i, s.conflist(i))
		}
	}
	t.Cleanup(s.cleanup)
	logCtx, stopLogs := context.WithCancel(ctx)
	t.Cleanup(stopLogs)
	go s.followAgentLogs(logCtx)

	start := time.Now()
	s.apply(agentManifest(sb.Dir))
	s.waitFor(90*time.Second, "agent ready on every node and chained", func() (bool, error) {
		l, err := sb.Client().CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent"})
		if err != nil || len(l.Items) != sb.Plan.Nodes {
			return false, nil
		}
		for _, p := range l.Items {
			if !running(&p) {
				return false, nil
			}
		}
		for i := 0; i < sb.Plan.Nodes; i++ {
			if chainedTypes(s.conflist(i)) != "bridge,portmap,mesh-cni" {
				return false, nil
			}
		}
		return true, nil
	})
	t.Logf("agent deployed, ready and chained on %d nodes in %v", sb.Plan.Nodes, time.Since(start).Round(time.Millisecond))
	for i := 0; i < sb.Plan.Nodes; i++ {
		if _, err := os.Stat(filepath.Join(s.root(i).CNIBinDir, "mesh-cni")); err != nil {
			t.Errorf("node %d: plugin binary not installed: %v", i, err)
		}
		c := s.conflist(i)
		sock := fmt.Sprintf("%s/nodes/%s/root/var/run/meshlite/cni/agent.sock", sb.Dir, sb.NodeName(i))
		if want := fmt.Sprintf(`"agent_socket": %q`, sock); !strings.Contains(c, want) {
			t.Errorf("node %d conflist does not point the plugin at the node's agent socket (%s):\n%s", i, want, c)
		}
		if nr := s.nodeRules(i); !strings.Contains(nr, "--match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127") {
			t.Errorf("node %d lacks the probe SNAT rule:\n%s", i, nr)
		}
	}
	node0, node1 := sb.NodeName(0), sb.NodeName(1)

	t.Run("NotEnrolledPodsStartWithoutDelay", func(t *testing.T) {
		s.t = t
		s.namespace(plainNS, false)
		t0 := time.Now()
		s.apply(podYAML(plainNS, "server", node1, nil, false) + "---" + podYAML(plainNS, "client", node0, nil, false))
		s.waitRunning(plainNS, "server", 60*time.Second)
		s.waitRunning(plainNS, "client", 60*time.Second)
		took := time.Since(t0)
		t.Logf("two pods of a plain namespace running in %v", took.Round(time.Millisecond))
		if took > 15*time.Second {
			t.Errorf("plain pods took %v to start", took)
		}
		if r := s.podRules(plainNS, "client"); r != "" {
			t.Errorf("a plain pod has redirect rules:\n%s", r)
		}
		if a := s.annotation(plainNS, "client"); a != "" {
			t.Errorf("a plain pod is annotated %q", a)
		}
		if m := s.metric(0, `meshlite_cni_agent_plugin_requests_total{command="ADD",state="not-enrolled"}`); m == "" {
			t.Errorf("the agent on node-0 did not answer the plugin's ADD (metrics: %q)", s.metric(0, "meshlite_cni_agent_plugin_requests_total"))
		}
	})

	t.Run("EnrolledPodDoesNotStartUntilZtunnelHoldsIt", func(t *testing.T) {
		s.t = t
		s.namespace(ambientNS, true)
		s.apply(podYAML(ambientNS, "app", node0, nil, true))
		// With no ztunnel on the node, CNI ADD must time out and fail.
		var msg string
		s.waitFor(60*time.Second, "a failed pod sandbox for lack of ztunnel", func() (bool, error) {
			msg = s.events(ambientNS, "app")
			return strings.Contains(msg, "FailedCreatePodSandBox") && strings.Contains(msg, "ztunnel has not taken it over"), nil
		})
		t.Logf("events while no ztunnel runs:\n%s", msg)
		p := s.pod(ambientNS, "app")
		if p.Status.Phase == corev1.PodRunning || p.Status.PodIP != "" {
			t.Fatalf("enrolled pod started without ztunnel: phase %s ip %q", p.Status.Phase, p.Status.PodIP)
		}
		time.Sleep(addTimeout) // another full attempt: still not started
		if p := s.pod(ambientNS, "app"); p.Status.Phase == corev1.PodRunning {
			t.Fatal("enrolled pod started without ztunnel")
		}
		t0 := time.Now()
		h := s.connectHolder(0)
		p = s.waitRunning(ambientNS, "app", 60*time.Second)
		t.Logf("pod running %v after a ztunnel connected", time.Since(t0).Round(time.Millisecond))
		if !h.Has(string(p.UID)) {
			t.Error("the test ztunnel does not hold the pod")
		}
		// The descriptor ztunnel got is the pod's netns.
		pods := h.Pods()
		if ns := pods[string(p.UID)].Netns; ns != nil {
			if !sameFile(t, ns, s.netnsOf(ambientNS, "app")) {
				t.Error("the netns fd sent over ZDS is not the pod's netns")
			}
			if info := pods[string(p.UID)].Info; info.GetName() != "app" || info.GetNamespace() != ambientNS || info.GetServiceAccount() != "default" {
				t.Errorf("workload info %v", info)
			}
		} else {
			t.Error("AddWorkload came without the netns fd")
		}
		s.waitFor(10*time.Second, "redirection annotation", func() (bool, error) {
			return s.annotation(ambientNS, "app") == kube.RedirectionEnabled, nil
		})
		r := s.podRules(ambientNS, "app")
		for _, want := range []string{
			"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
			"-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
			"-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
			"--dport 53 -j REDIRECT --to-ports 15053",
		} {
			if !strings.Contains(r, want) {
				t.Errorf("pod netns lacks %q; has:\n%s", want, r)
			}
		}
		ipRule, err := s.sb.Exec(ctx, ambientNS, "app", "ip", "rule")
		if err != nil || !strings.Contains(string(ipRule), "fwmark 0x111/0xfff lookup 100") {
			t.Errorf("pod netns lacks the fwmark rule (%v):\n%s", err, ipRule)
		}
		// Ready means the kubelet's TCP probe reached the app: SNATed on
		// the node, let through in the pod although nothing listens on 15006.
	})

	t.Run("TrafficIsCapturedNotLeaked", func(t *testing.T) {
		s.t = t
		server := s.pod(plainNS, "server")
		plainL := netnstest.Listen(t, s.netnsOf(plainNS, "server"), "0.0.0.0:7777")
		dst := net.JoinHostPort(server.Status.PodIP, "7777")

		// Control: a plain pod reaches the plain listener.
		c, err := s.sb.Dial(ctx, plainNS, "client", dst)
		if err != nil {
			t.Fatalf("plain pod to plain pod: %v", err)
		}
		c.Close()
		if a, err := netnstest.AcceptWithin(plainL, 3*time.Second); err != nil {
			t.Fatalf("control connection did not arrive: %v", err)
		} else {
			a.Close()
		}

		// An enrolled pod whose ztunnel listens nowhere: blocked, not leaked.
		if c, err := s.sb.Dial(ctx, ambientNS, "app", dst); err == nil {
			c.Close()
			t.Error("enrolled pod's outbound connection succeeded without ztunnel listening")
		}
		if a, err := netnstest.AcceptWithin(plainL, 500*time.Millisecond); err == nil {
			a.Close()
			t.Error("enrolled pod's traffic leaked to the plain pod in plaintext")
		}
		// Inbound plaintext to the enrolled pod is captured too (15006).
		app := s.pod(ambientNS, "app")
		if c, err := s.sb.Dial(ctx, plainNS, "server", net.JoinHostPort(app.Status.PodIP, "9090")); err == nil {
			c.Close()
			t.Error("plaintext reached the enrolled pod's app port uncaptured")
		}

		// A pod whose ztunnel does listen: outbound ends there, with its
		// original destination.
		s.apply(podYAML(ambientNS, "capture-1", node0, nil, false))
		cp := s.waitRunning(ambientNS, "capture-1", 60*time.Second)
		s.mu.Lock()
		zl := s.captured[string(cp.UID)]
		s.mu.Unlock()
		if zl == nil {
			t.Fatal("the test ztunnel was not handed capture-1")
		}
		c, err = s.sb.Dial(ctx, ambientNS, "capture-1", dst)
		if err != nil {
			t.Fatalf("dial from capture-1: %v", err)
		}
		defer c.Close()
		got, err := netnstest.AcceptWithin(zl, 3*time.Second)
		if err != nil {
			t.Fatalf("redirected connection did not reach ztunnel's 15001: %v", err)
		}
		defer got.Close()
		if od, err := netnstest.OriginalDst(got); err != nil || od != dst {
			t.Errorf("SO_ORIGINAL_DST %q (%v), want %s", od, err, dst)
		}
		if a, err := netnstest.AcceptWithin(plainL, 300*time.Millisecond); err == nil {
			a.Close()
			t.Error("captured connection also reached the destination directly")
		}
	})

	t.Run("PluginCheckAndStatusSeeTheRealRules", func(t *testing.T) {
		s.t = t
		if out, err := s.runPlugin(0, "STATUS", "1.1.0", nil); err != nil {
			t.Errorf("STATUS with the agent up: %v %s", err, out)
		}
		app := s.pod(ambientNS, "app")
		if out, err := s.runPlugin(0, "CHECK", "1.0.0", app); err != nil {
			t.Errorf("CHECK of a held pod: %v %s", err, out)
		}
		if out, err := s.runPlugin(0, "CHECK", "1.0.0", s.pod(plainNS, "client")); err != nil {
			t.Errorf("CHECK of a plain pod: %v %s", err, out)
		}
		// Someone deletes the outbound redirect: CHECK says so, and the
		// agent puts it back.
		if _, err := s.sb.Exec(ctx, ambientNS, "app", "iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", "!", "-d", "127.0.0.1/32",
			"-p", "tcp", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001"); err != nil {
			t.Fatal(err)
		}
		out, err := s.runPlugin(0, "CHECK", "1.0.0", app)
		if err == nil || !strings.Contains(out, "15001") {
			t.Errorf("CHECK with the outbound redirect deleted: %v %s", err, out)
		}
		t0 := time.Now()
		s.waitFor(15*time.Second, "agent to repair the rules", func() (bool, error) {
			_, err := s.runPlugin(0, "CHECK", "1.0.0", app)
			return err == nil, nil
		})
		t.Logf("drifted rule repaired in %v", time.Since(t0).Round(time.Millisecond))
	})

	t.Run("LabellingEnrollsRunningPodsAndUnlabellingReleasesThem", func(t *testing.T) {
		s.t = t
		s.namespace(lateNS, false)
		s.apply(podYAML(lateNS, "late", node0, nil, false) + "---" +
			podYAML(lateNS, "optout", node0, map[string]string{kube.LabelDataplaneMode: kube.DataplaneModeNone}, false))
		late := s.waitRunning(lateNS, "late", 60*time.Second)
		s.waitRunning(lateNS, "optout", 60*time.Second)
		if r := s.podRules(lateNS, "late"); r != "" {
			t.Fatalf("rules before enrollment:\n%s", r)
		}
		amb := kube.DataplaneModeAmbient
		t0 := time.Now()
		s.label(lateNS, &amb)
		s.waitFor(30*time.Second, "running pod enrolled after labelling", func() (bool, error) {
			return strings.Contains(s.podRules(lateNS, "late"), "ISTIO_OUTPUT") &&
				s.annotation(lateNS, "late") == kube.RedirectionEnabled && s.holder.Has(string(late.UID)), nil
		})
		t.Logf("running pod captured and annotated %v after its namespace was labelled", time.Since(t0).Round(time.Millisecond))
		if r := s.podRules(lateNS, "optout"); r != "" || s.annotation(lateNS, "optout") != "" {
			t.Errorf("a pod labelled none was captured:\n%s", r)
		}
		t0 = time.Now()
		s.label(lateNS, nil)
		s.waitFor(30*time.Second, "pod released after unlabelling", func() (bool, error) {
			return s.podRules(lateNS, "late") == "" && s.annotation(lateNS, "late") == "" && !s.holder.Has(string(late.UID)), nil
		})
		t.Logf("rules, annotation and ztunnel's hold gone %v after unlabelling", time.Since(t0).Round(time.Millisecond))
		out, _ := s.sb.Exec(ctx, lateNS, "late", "ip", "rule")
		if strings.Contains(string(out), "lookup 100") {
			t.Errorf("fwmark rule left after un-enrollment:\n%s", out)
		}
		log := strings.Join(s.holder.Log(), " ")
		if !strings.Contains(log, "del "+string(late.UID)) {
			t.Errorf("no DelWorkload for the released pod; ZDS log: %s", log)
		}
	})

	t.Run("AgentRestartKeepsPodsCapturedAndReplaysSnapshot", func(t *testing.T) {
		s.t = t
		app := s.pod(ambientNS, "app")
		capture := s.pod(ambientNS, "capture-1")
		l, err := sb.Client().CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent", FieldSelector: "spec.nodeName=" + node0})
		if err != nil || len(l.Items) != 1 {
			t.Fatalf("agent pod on node-0: %v %d", err, len(l.Items))
		}
		old := l.Items[0]
		if err := sb.Client().CoreV1().Pods(agentNS).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		h := s.holder
		s.waitFor(30*time.Second, "the ZDS connection to end with the agent", func() (bool, error) {
			err := h.WaitFor(ctx, func(map[string]zdstest.Pod, bool) bool { return false })
			return err != nil && !errors.Is(err, context.Canceled), nil
		})
		// Meanwhile nothing is uncaptured and nothing is unchained.
		if r := s.podRules(ambientNS, "app"); !strings.Contains(r, "REDIRECT --to-ports 15001") {
			t.Errorf("rules gone while the agent restarts:\n%s", r)
		}
		if chainedTypes(s.conflist(0)) != "bridge,portmap,mesh-cni" {
			t.Errorf("plugin unchained by a restart: %s", chainedTypes(s.conflist(0)))
		}
		s.closeHolder()
		// Connect as soon as the new agent listens, as a waiting ztunnel
		// does: before it has re-found its pods.
		var newAgent string
		var h2 *zdstest.Holder
		t0 := time.Now()
		s.waitFor(60*time.Second, "the new agent on node-0 to accept a ZDS connection", func() (bool, error) {
			l, err := sb.Client().CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent", FieldSelector: "spec.nodeName=" + node0})
			if err != nil || len(l.Items) != 1 || l.Items[0].UID == old.UID {
				return false, nil
			}
			newAgent = l.Items[0].Name
			h, err := s.tryConnectHolder(0)
			if err != nil {
				return false, nil
			}
			h2 = h
			return true, nil
		})
		err = h2.WaitFor(ctx, func(pods map[string]zdstest.Pod, done bool) bool {
			_, a := pods[string(app.UID)]
			_, c := pods[string(capture.UID)]
			return done && a && c && pods[string(app.UID)].Netns != nil
		})
		if err != nil {
			t.Fatalf("new agent %s did not hand over the enrolled pods: %v (ZDS log %v)", newAgent, err, h2.Log())
		}
		t.Logf("after the restart, ztunnel got %v in %v", h2.Log(), time.Since(t0).Round(time.Millisecond))
		// The snapshot is the whole truth: ztunnel drops every pod it does
		// not name, so both pods come before SnapshotSent.
		zlog := h2.Log()
		end := slices.Index(zlog, "snapshot-sent")
		for _, uid := range []string{string(app.UID), string(capture.UID)} {
			if i := slices.Index(zlog, "add "+uid); i < 0 || i > end {
				t.Errorf("pod %s not in the new agent's snapshot (ztunnel would drop it): ZDS log %v", uid, zlog)
			}
		}
		if p := h2.Pods()[string(app.UID)]; !sameFile(t, p.Netns, s.netnsOf(ambientNS, "app")) {
			t.Error("replayed netns is not the pod's")
		}
		if s.annotation(ambientNS, "app") != kube.RedirectionEnabled {
			t.Error("annotation lost over the restart")
		}
		// New pods keep working with the new agent.
		s.apply(podYAML(ambientNS, "after-restart", node0, nil, false))
		s.waitRunning(ambientNS, "after-restart", 60*time.Second)
	})

	t.Run("UninstallUnchainsAndReleasesPods", func(t *testing.T) {
		s.t = t
		agents, err := sb.Client().CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent"})
		if err != nil || len(agents.Items) != sb.Plan.Nodes {
			t.Fatalf("agent pods before uninstall: %v %d", err, len(agents.Items))
		}
		// As `kubectl delete -f` does: the agent's permissions go with its
		// DaemonSet (here first), so at shutdown it cannot read the API and
		// has to rely on the deletion its watch saw.
		t0 := time.Now()
		cs := sb.Client()
		for what, del := range map[string]func() error{
			"ClusterRoleBinding": func() error {
				return cs.RbacV1().ClusterRoleBindings().Delete(ctx, "cnitest-cni-agent", metav1.DeleteOptions{})
			},
			"RoleBinding": func() error {
				return cs.RbacV1().RoleBindings(agentNS).Delete(ctx, "cni-agent", metav1.DeleteOptions{})
			},
			"Role": func() error { return cs.RbacV1().Roles(agentNS).Delete(ctx, "cni-agent", metav1.DeleteOptions{}) },
		} {
			if err := del(); err != nil {
				t.Fatalf("delete the agent's %s: %v", what, err)
			}
		}
		if err := cs.AppsV1().DaemonSets(agentNS).Delete(ctx, "cni-agent", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitFor(60*time.Second, "agent pods gone", func() (bool, error) {
			l, err := sb.Client().CoreV1().Pods(agentNS).List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent"})
			return err == nil && len(l.Items) == 0, nil
		})
		t.Logf("agent uninstalled in %v", time.Since(t0).Round(time.Millisecond))
		// Each agent decided from what its watch saw, not from a read.
		for _, p := range agents.Items {
			s.waitFor(5*time.Second, "agent "+p.Name+" logs its uninstall decision", func() (bool, error) {
				s.mu.Lock()
				b := s.logs[p.Spec.NodeName+"/"+p.Name]
				s.mu.Unlock()
				if b == nil {
					return false, nil
				}
				for _, l := range strings.Split(b.String(), "\n") {
					if strings.Contains(l, `msg="own DaemonSet is gone: uninstalling"`) && strings.Contains(l, "observed=gone") {
						return true, nil
					}
				}
				return false, nil
			})
		}
		for i := 0; i < sb.Plan.Nodes; i++ {
			if got := chainedTypes(s.conflist(i)); got != "bridge,portmap" {
				t.Errorf("node %d plugins after uninstall: %s", i, got)
			}
			if nr := s.nodeRules(i); strings.Contains(nr, "ISTIO_POSTRT") {
				t.Errorf("node %d: probe SNAT chain left:\n%s", i, nr)
			}
		}
		if r := s.podRules(ambientNS, "app"); r != "" {
			t.Errorf("rules left in an enrolled pod after uninstall:\n%s", r)
		}
		// The redirection annotation stays: with its RBAC gone the agent
		// can no longer patch pods (it logs that). What matters for the
		// node, the chain and the rules, is undone.
		out, err := s.runPlugin(0, "STATUS", "1.1.0", nil)
		if err == nil || !strings.Contains(out, `"code": 50`) {
			t.Errorf("STATUS without the agent: %v %s", err, out)
		}
		// Pods start without the plugin on every node, in any namespace.
		s.apply(podYAML(ambientNS, "after-uninstall", node0, nil, false))
		s.apply(podYAML(ambientNS, "after-uninstall-1", node1, nil, false))
		s.waitRunning(ambientNS, "after-uninstall", 30*time.Second)
		s.waitRunning(ambientNS, "after-uninstall-1", 30*time.Second)
		// A pod set up while chained is torn down through the cached chain,
		// mesh-cni included: its DEL must still succeed.
		app := s.pod(ambientNS, "app")
		if err := sb.Client().CoreV1().Pods(ambientNS).Delete(ctx, "app", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitFor(60*time.Second, "pod set up while chained deleted", func() (bool, error) {
			_, err := sb.Client().CoreV1().Pods(ambientNS).Get(ctx, "app", metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
		klog, _ := os.ReadFile(filepath.Join(sb.Dir, "logs", "kubelet-"+node0+".log"))
		for _, l := range strings.Split(string(klog), "\n") {
			if strings.Contains(l, string(app.UID)) && strings.Contains(l, "CNI DEL failed") {
				t.Errorf("DEL after uninstall failed: %s", l)
			}
		}
	})
}

func sameFile(t *testing.T, a, b *os.File) bool {
	t.Helper()
	sa, err1 := a.Stat()
	sb, err2 := b.Stat()
	if err1 != nil || err2 != nil {
		t.Errorf("stat: %v %v", err1, err2)
		return false
	}
	return os.SameFile(sa, sb)
}
