package kubelet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
	utilexec "k8s.io/utils/exec"
	"k8s.io/utils/ptr"
)

// These tests run pods for real: network namespaces, the reference CNI
// plugins, processes in private mount namespaces. They need root and the
// plugins from hack/cni-plugins.sh. Each runs in a fresh network namespace
// of its own (the "node"), re-executing the test binary there, so the
// bridge it makes never touches the host's network.

const inNodeEnv = "KUBELET_TEST_IN_NODE_NETNS"

// testNetnsPrefix names the pod netns of these tests, apart from a running
// sandbox's sbx-* ones.
const testNetnsPrefix = "kltest-pod-"

func cniBinDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("SBX_CNI_BIN_DIR")
	if dir == "" {
		abs, _ := filepath.Abs("../../.cache/cni/v1.6.2")
		dir = abs
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Fatalf("CNI plugin %s missing in %s: run hack/cni-plugins.sh (or set SBX_CNI_BIN_DIR)", p, dir)
		}
	}
	return dir
}

// inNodeNetns runs the calling test again in a new network namespace and
// reports whether the caller is that run (and should do the work).
func inNodeNetns(t *testing.T) bool {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, mounts): run the tests as root, as make test and CI do")
	}
	if os.Getenv(inNodeEnv) != "" {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			t.Fatalf("lo up: %v %s", err, out)
		}
		return true
	}
	runID := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	t.Cleanup(func() { removeTestNetns(t, runID) })
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), inNodeEnv+"="+runID)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	t.Logf("run in a new network namespace:\n%s", out)
	if err != nil {
		t.Fatalf("node-netns run failed: %v", err)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatal("node-netns run did not pass")
	}
	return false
}

// removeTestNetns removes pod netns a crashed run may have left.
func removeTestNetns(t *testing.T, runID string) {
	names, _ := listNetns(testNetnsPrefix + "kltest-" + runID)
	for _, n := range names {
		{
			t.Errorf("pod netns %s left behind; removing", n)
			_ = deleteNetns(filepath.Join(NetnsDir, n))
		}
	}
}

type testNode struct {
	cfg    *Config
	r      *runner
	tmp    string
	runID  string
	mounts string // a host dir for mount points of test pods
}

func newTestNode(t *testing.T) *testNode {
	t.Helper()
	tmp := t.TempDir()
	runID := os.Getenv(inNodeEnv)
	n := &testNode{tmp: tmp, runID: runID}
	n.mounts = filepath.Join(os.TempDir(), "kltest-mnt-"+runID)
	t.Cleanup(func() { os.RemoveAll(n.mounts) })
	cfg := &Config{
		NodeName: "kltest-node", NodeIP: "10.123.0.1", PodCIDR: "10.123.0.0/24",
		RootDir: filepath.Join(tmp, "root"), CNIConfDir: filepath.Join(tmp, "net.d"), CNIBinDir: cniBinDir(t),
		CNICacheDir: filepath.Join(tmp, "cni-cache"), PodsDir: filepath.Join(tmp, "pods"),
		ImageBinDirs: []string{filepath.Join(tmp, "images")},
		ClusterDNS:   "10.96.0.10", ClusterDomain: "cluster.local",
	}
	for _, d := range []string{cfg.RootDir, cfg.CNIConfDir, cfg.PodsDir, cfg.ImageBinDirs[0]} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conflist := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"kltest","plugins":[{"type":"bridge","bridge":"kltest0",
"isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.123.0.0/24"}]],"dataDir":%q}}]}`,
		filepath.Join(tmp, "ipam"))
	if err := os.WriteFile(filepath.Join(cfg.CNIConfDir, "10-kltest.conflist"), []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(self, filepath.Join(cfg.ImageBinDirs[0], "testsrv")); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n.cfg = cfg
	n.r = newRunner(cfg, log, nil, []string{"/proc/self/exe", InitVerb})
	n.r.backoffBase, n.r.backoffMax = 200*time.Millisecond, time.Second
	n.r.netnsPrefix = testNetnsPrefix
	t.Cleanup(n.r.close)
	return n
}

func (n *testNode) pod(name string, spec v1.PodSpec) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "kltest", UID: types.UID("kltest-" + n.runID + "-" + name)},
		Spec:       spec,
	}
}

// runningPod is a pod whose sandbox is up and whose containers run.
type runningPod struct {
	p      *podRun
	cancel context.CancelFunc
	done   chan struct{}
}

func (n *testNode) start(t *testing.T, pod *v1.Pod) *runningPod {
	t.Helper()
	p := n.r.newPodRun(pod)
	if err := p.setupSandbox(context.Background()); err != nil {
		t.Fatalf("setup sandbox: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rp := &runningPod{p: p, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(rp.done); p.run(ctx) }()
	t.Cleanup(func() { rp.stop(time.Second) })
	return rp
}

// stop does what the pod worker does on delete.
func (rp *runningPod) stop(grace time.Duration) {
	rp.cancel()
	rp.p.killAll(grace)
	<-rp.done
	rp.p.teardownNetwork(context.Background())
	_ = rp.p.removeDir()
	rp.p.r.forget(rp.p)
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ctrStatus(p *podRun, name string) v1.ContainerStatus {
	s := p.snapshot()
	for _, c := range append(s.ctrs, s.init...) {
		if c.status.Name == name {
			return c.status
		}
	}
	return v1.ContainerStatus{}
}

func serverPodSpec(mounts string) v1.PodSpec {
	return v1.PodSpec{
		RestartPolicy:                 v1.RestartPolicyAlways,
		TerminationGracePeriodSeconds: ptr.To(int64(5)),
		Volumes: []v1.Volume{
			{Name: "data", VolumeSource: v1.VolumeSource{EmptyDir: &v1.EmptyDirVolumeSource{}}},
			{Name: "host", VolumeSource: v1.VolumeSource{HostPath: &v1.HostPathVolumeSource{Path: "/var/run/kltest", Type: ptr.To(v1.HostPathDirectoryOrCreate)}}},
		},
		Containers: []v1.Container{{
			Name:  "srv",
			Image: "registry.local:5000/test/testsrv:v1",
			Args:  []string{"serve", "0.0.0.0:8080", mounts + "/data"},
			Ports: []v1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			Env: []v1.EnvVar{
				{Name: "POD_IP", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
				{Name: "GREETING", Value: "hello $(POD_IP)"},
			},
			VolumeMounts: []v1.VolumeMount{
				{Name: "data", MountPath: mounts + "/data"},
				{Name: "host", MountPath: mounts + "/host"},
			},
			ReadinessProbe: &v1.Probe{
				ProbeHandler:  v1.ProbeHandler{HTTPGet: &v1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("http")}},
				PeriodSeconds: 1, FailureThreshold: 1,
			},
			LivenessProbe: &v1.Probe{
				ProbeHandler:  v1.ProbeHandler{HTTPGet: &v1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(8080)}},
				PeriodSeconds: 1, FailureThreshold: 2,
			},
		}},
	}
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	c := &http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if v != nil {
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("decode %s: %v", url, err)
		}
	}
}

func TestPodRuntime_RunsPodInNetnsWithMountsProbesExecAndTeardown(t *testing.T) {
	if !inNodeNetns(t) {
		return
	}
	n := newTestNode(t)
	pod := n.pod("web", serverPodSpec(n.mounts))
	rp := n.start(t, pod)
	p := rp.p
	netnsPath := n.r.netnsPath(string(pod.UID))
	if !isNetns(netnsPath) {
		t.Fatalf("no pod netns at %s", netnsPath)
	}
	ip := p.firstIP()
	if !strings.HasPrefix(ip, "10.123.0.") {
		t.Fatalf("pod IP %q not from the node's range", ip)
	}
	waitFor(t, "container ready", 15*time.Second, func() bool { return ctrStatus(p, "srv").Ready })
	base := "http://" + net.JoinHostPort(ip, "8080")

	t.Run("process runs in the pod netns and mount namespace", func(t *testing.T) {
		var info testInfo
		getJSON(t, base+"/info", &info)
		wantIno, _ := netnsInode(netnsPath)
		if info.NetnsIno != wantIno {
			t.Errorf("process netns %d, pod netns %d", info.NetnsIno, wantIno)
		}
		if info.Hostname != "web" {
			t.Errorf("hostname %q, want the pod name", info.Hostname)
		}
		wantResolv := "nameserver 10.96.0.10\nsearch kltest.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
		if info.Resolv != wantResolv {
			t.Errorf("resolv.conf in the pod:\n%s", info.Resolv)
		}
		if !strings.Contains(info.Hosts, ip+"\tweb\n") {
			t.Errorf("/etc/hosts in the pod:\n%s", info.Hosts)
		}
		if got := info.Env["GREETING"]; got != "hello "+ip {
			t.Errorf("GREETING = %q", got)
		}
		host, _ := os.ReadFile("/etc/resolv.conf")
		if string(host) == info.Resolv {
			t.Error("the host's resolv.conf was changed")
		}
	})

	t.Run("emptyDir and hostPath volumes are shared with the node", func(t *testing.T) {
		getJSON(t, base+"/write?f="+url.QueryEscape(n.mounts+"/data/x")+"&v=1", nil)
		getJSON(t, base+"/write?f="+url.QueryEscape(n.mounts+"/host/y")+"&v=2", nil)
		if b, err := os.ReadFile(filepath.Join(p.dir, "volumes", "data", "x")); err != nil || string(b) != "1" {
			t.Errorf("emptyDir file on the node: %q %v", b, err)
		}
		if b, err := os.ReadFile(filepath.Join(n.cfg.RootDir, "var/run/kltest/y")); err != nil || string(b) != "2" {
			t.Errorf("hostPath file under the node root: %q %v", b, err)
		}
		if _, err := os.Stat(filepath.Join(n.mounts, "data", "x")); err == nil {
			t.Error("the volume mount leaked into the kubelet's mount namespace")
		}
	})

	t.Run("exec runs in the container's namespaces with its env", func(t *testing.T) {
		c := p.container("srv")
		var out, errb bytes.Buffer
		code, err := n.r.execInContainer(context.Background(), p, c, []string{"sh", "-c", "cat /etc/resolv.conf; echo $GREETING; hostname"}, nil, &out, &errb, false, nil)
		if err != nil || code != 0 {
			t.Fatalf("exec: %d %v %s", code, err, errb.String())
		}
		if !strings.Contains(out.String(), "nameserver 10.96.0.10\n") || !strings.Contains(out.String(), "hello "+ip+"\nweb\n") {
			t.Errorf("exec output:\n%s", out.String())
		}
		code, err = n.r.execInContainer(context.Background(), p, c, []string{"sh", "-c", "exit 3"}, nil, nil, nil, false, nil)
		if err != nil || code != 3 {
			t.Errorf("exit code %d, %v; want 3", code, err)
		}
		out.Reset()
		code, err = n.r.execInContainer(context.Background(), p, c, []string{"cat"}, strings.NewReader("from stdin"), &out, nil, false, nil)
		if err != nil || code != 0 || out.String() != "from stdin" {
			t.Errorf("stdin: %q %d %v", out.String(), code, err)
		}
		if _, err := n.r.execInContainer(context.Background(), p, c, []string{"no-such-command-xyz"}, nil, nil, nil, false, nil); err == nil {
			t.Error("unknown command accepted")
		}
	})

	t.Run("port-forward dials the pod's loopback", func(t *testing.T) {
		client, server := net.Pipe()
		errc := make(chan error, 1)
		go func() { errc <- n.r.portForward(context.Background(), p, 8080, server) }()
		fmt.Fprint(client, "GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(client), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		client.Close()
		if resp.StatusCode != 200 || string(body) != "ok" {
			t.Errorf("through port-forward: %s %q", resp.Status, body)
		}
		if err := <-errc; err != nil {
			t.Errorf("portForward: %v", err)
		}
	})

	t.Run("logs capture stdout and stderr", func(t *testing.T) {
		var b bytes.Buffer
		path := filepath.Join(p.dir, "logs", "srv", "0.log")
		if err := writeLogs(context.Background(), &b, func() {}, path, logOptions{tailLines: -1}, func() bool { return false }); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(b.String(), "testsrv starting on ") || !strings.Contains(b.String(), "testsrv stderr line\n") {
			t.Errorf("log:\n%s", b.String())
		}
	})

	t.Run("kubelet API over TLS serves logs, exec and port-forward", func(t *testing.T) {
		testKubeletAPI(t, n, p)
	})

	t.Run("liveness failure restarts the container", func(t *testing.T) {
		getJSON(t, base+"/write?f="+url.QueryEscape(n.mounts+"/data/unhealthy")+"&v=1", nil)
		waitFor(t, "not ready after readiness failure", 5*time.Second, func() bool { return !ctrStatus(p, "srv").Ready })
		waitFor(t, "restart after liveness failure", 15*time.Second, func() bool {
			st := ctrStatus(p, "srv")
			return st.RestartCount == 1 && st.State.Running != nil && st.Ready
		})
		st := ctrStatus(p, "srv")
		if st.LastTerminationState.Terminated == nil || !strings.Contains(st.LastTerminationState.Terminated.Message, "liveness") {
			t.Errorf("last termination: %+v", st.LastTerminationState)
		}
		if _, err := os.Stat(filepath.Join(p.dir, "logs", "srv", "1.log")); err != nil {
			t.Errorf("no log for the second instance: %v", err)
		}
		if phase := podPhase(pod, p.snapshot()); phase != v1.PodRunning {
			t.Errorf("phase %s", phase)
		}
	})

	t.Run("stop sends SIGTERM, tears down netns and CNI", func(t *testing.T) {
		rp.stop(5 * time.Second)
		if isNetns(netnsPath) || fileExists(netnsPath) {
			t.Error("pod netns still there")
		}
		if _, err := os.Stat(p.dir); !os.IsNotExist(err) {
			t.Error("pod dir still there")
		}
		atts, _ := n.r.cni.cni.GetCachedAttachments(string(pod.UID))
		if len(atts) != 0 {
			t.Errorf("CNI cache still holds %d attachments", len(atts))
		}
		ipam, _ := os.ReadDir(filepath.Join(n.tmp, "ipam", "kltest"))
		for _, e := range ipam {
			if strings.HasPrefix(e.Name(), "10.") {
				t.Errorf("IP %s still allocated", e.Name())
			}
		}
	})
}

func testKubeletAPI(t *testing.T, n *testNode, p *podRun) {
	pki := newTestPKI(t)
	n.cfg.ServingCert, n.cfg.ServingKey, n.cfg.ClientCAFile = pki.serverCert, pki.serverKey, pki.caFile
	tlsCfg, err := apiServerTLS(n.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsCfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: newAPIHandler(n.r, n.r.log)}
	go srv.Serve(ln)
	defer srv.Close()
	host := "https://" + ln.Addr().String()
	restCfg := &rest.Config{Host: host, TLSClientConfig: rest.TLSClientConfig{CAFile: pki.caFile, CertFile: pki.clientCert, KeyFile: pki.clientKey}}

	tr, err := rest.TransportFor(restCfg)
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := hc.Get(host + "/containerLogs/kltest/web/srv?tailLines=2&timestamps=true")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "Z testsrv starting") || strings.Count(string(body), "\n") != 2 {
		t.Errorf("logs: %s\n%s", resp.Status, body)
	}
	for path, want := range map[string]int{
		"/containerLogs/kltest/nope/srv":              404,
		"/containerLogs/kltest/web/nope":              404,
		"/containerLogs/kltest/web/srv?previous=true": 400,
		"/containerLogs/kltest/web/srv?tailLines=x":   400,
	} {
		resp, err := hc.Get(host + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
	// Without a client certificate: only /healthz.
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pki.pool}}}
	if resp, err := anon.Get(host + "/containerLogs/kltest/web/srv"); err != nil || resp.StatusCode != 401 {
		t.Errorf("anonymous logs: %v %v", resp, err)
	}
	if resp, err := anon.Get(host + "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("anonymous healthz: %v %v", resp, err)
	}
	// A node's certificate, from the same CA, is not enough.
	nodeCert, err := tls.LoadX509KeyPair(pki.nodeCert, pki.nodeKey)
	if err != nil {
		t.Fatal(err)
	}
	asNode := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pki.pool, Certificates: []tls.Certificate{nodeCert}}}}
	if resp, err := asNode.Get(host + "/containerLogs/kltest/web/srv"); err != nil || resp.StatusCode != 403 {
		t.Errorf("logs with a node certificate: %v %v", resp, err)
	}

	execURL := func(tty bool, stdin bool, cmd ...string) *url.URL {
		q := url.Values{}
		for _, c := range cmd {
			q.Add("command", c)
		}
		q.Set("output", "1")
		if tty {
			q.Set("tty", "1")
		} else {
			q.Set("error", "1")
		}
		if stdin {
			q.Set("input", "1")
		}
		u, _ := url.Parse(host + "/exec/kltest/web/srv?" + q.Encode())
		return u
	}
	spdyExec, err := remotecommand.NewSPDYExecutor(restCfg, "POST", execURL(false, false, "sh", "-c", "echo out; echo err >&2; hostname"))
	if err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if err := spdyExec.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdout: &out, Stderr: &errb}); err != nil {
		t.Fatalf("SPDY exec: %v", err)
	}
	if out.String() != "out\nweb\n" || errb.String() != "err\n" {
		t.Errorf("SPDY exec: stdout %q stderr %q", out.String(), errb.String())
	}
	// The API server speaks SPDY to kubelets; websockets (v4, as the
	// kubelet's streaming server has them) work too.
	wsExec, err := remotecommand.NewWebSocketExecutorForProtocols(restCfg, "GET", execURL(false, false, "sh", "-c", "echo ws; exit 7").String(), "v4.channel.k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	err = wsExec.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdout: &out, Stderr: &errb})
	var exitErr utilexec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitStatus() != 7 || out.String() != "ws\n" {
		t.Errorf("websocket exec: err %v, out %q", err, out.String())
	}
	// Stdin over SPDY, closed by the client: the command sees EOF.
	stdinExec, err := remotecommand.NewSPDYExecutor(restCfg, "POST", execURL(false, true, "sh", "-c", "cat; exit 7"))
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	err = stdinExec.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdin: strings.NewReader("spdy stdin"), Stdout: &out, Stderr: &errb})
	if !errors.As(err, &exitErr) || exitErr.ExitStatus() != 7 || out.String() != "spdy stdin" {
		t.Errorf("SPDY exec with stdin: err %v, out %q", err, out.String())
	}
	ttyExec, err := remotecommand.NewSPDYExecutor(restCfg, "POST", execURL(true, true, "sh", "-c", "tty; sleep 0.5; stty size"))
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	sizes := &fixedSize{size: remotecommand.TerminalSize{Width: 100, Height: 40}}
	if err := ttyExec.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdin: &blockingReader{}, Stdout: &out, Tty: true, TerminalSizeQueue: sizes}); err != nil {
		t.Fatalf("tty exec: %v", err)
	}
	if !strings.Contains(out.String(), "/dev/pts/") || !strings.Contains(out.String(), "40 100") {
		t.Errorf("tty exec output %q", out.String())
	}

	// Port-forward with client-go, as kubectl port-forward does.
	rt, upgrader, err := spdy.RoundTripperFor(restCfg)
	if err != nil {
		t.Fatal(err)
	}
	pfURL, _ := url.Parse(host + "/portForward/kltest/web")
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, "POST", pfURL)
	stop, ready := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:8080"}, stop, ready, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	fwErr := make(chan error, 1)
	go func() { fwErr <- fw.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-fwErr:
		t.Fatalf("port-forward: %v", err)
	}
	ports, _ := fw.GetPorts()
	for i := 0; i < 3; i++ {
		var info testInfo
		getJSON(t, fmt.Sprintf("http://127.0.0.1:%d/info", ports[0].Local), &info)
		if info.Hostname != "web" {
			t.Errorf("port-forwarded /info from %q", info.Hostname)
		}
	}
	close(stop)
	<-fwErr
	_ = p
}

// fixedSize hands out one terminal size.
type fixedSize struct {
	once sync.Once
	size remotecommand.TerminalSize
}

func (f *fixedSize) Next() *remotecommand.TerminalSize {
	var s *remotecommand.TerminalSize
	f.once.Do(func() { s = &f.size })
	return s // nil after the first: no more resizes
}

// blockingReader is a terminal stdin that types nothing.
type blockingReader struct{}

func (blockingReader) Read([]byte) (int, error) { select {} }

func TestPodRuntime_RestartPolicyNeverFailsAndHostNetwork(t *testing.T) {
	if !inNodeNetns(t) {
		return
	}
	n := newTestNode(t)

	failing := n.pod("fail", v1.PodSpec{
		RestartPolicy: v1.RestartPolicyNever,
		Containers:    []v1.Container{{Name: "c", Image: "testsrv", Args: []string{"exit", "3"}}},
	})
	rp := n.start(t, failing)
	select {
	case <-rp.done:
	case <-time.After(10 * time.Second):
		t.Fatal("pod with restartPolicy Never did not finish")
	}
	st := ctrStatus(rp.p, "c")
	if st.State.Terminated == nil || st.State.Terminated.ExitCode != 3 || st.RestartCount != 0 {
		t.Fatalf("container status %+v", st)
	}
	if ph := podPhase(failing, rp.p.snapshot()); ph != v1.PodFailed {
		t.Fatalf("phase %s, want Failed", ph)
	}
	rp.stop(time.Second)

	// Init containers run first, in order; a bad image is a waiting container.
	initPod := n.pod("init", v1.PodSpec{
		RestartPolicy:  v1.RestartPolicyAlways,
		InitContainers: []v1.Container{{Name: "i1", Image: "testsrv", Args: []string{"exit", "0"}}},
		Containers: []v1.Container{
			{Name: "ok", Image: "testsrv", Args: []string{"serve", "127.0.0.1:9000", n.mounts}},
			{Name: "bad", Image: "nosuchimage:1"},
		},
	})
	rp = n.start(t, initPod)
	waitFor(t, "init done and ok running", 10*time.Second, func() bool {
		return ctrStatus(rp.p, "i1").State.Terminated != nil && ctrStatus(rp.p, "ok").State.Running != nil
	})
	waitFor(t, "bad container waiting with ErrImagePull", 5*time.Second, func() bool {
		w := ctrStatus(rp.p, "bad").State.Waiting
		return w != nil && w.Reason == "ErrImagePull"
	})
	if ph := podPhase(initPod, rp.p.snapshot()); ph != v1.PodPending {
		t.Errorf("phase with a container never started: %s, want Pending", ph)
	}
	rp.stop(time.Second)

	hostPod := n.pod("hostnet", v1.PodSpec{
		HostNetwork: true,
		Containers:  []v1.Container{{Name: "c", Image: "testsrv", Args: []string{"serve", "127.0.0.1:18080", n.mounts}}},
	})
	rp = n.start(t, hostPod)
	if rp.p.firstIP() != n.cfg.NodeIP {
		t.Errorf("hostNetwork pod IP %q, want node IP", rp.p.firstIP())
	}
	waitFor(t, "hostNetwork container running", 10*time.Second, func() bool { return ctrStatus(rp.p, "c").State.Running != nil })
	var info testInfo
	waitFor(t, "hostNetwork server answering", 5*time.Second, func() bool {
		resp, err := http.Get("http://127.0.0.1:18080/info")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return json.NewDecoder(resp.Body).Decode(&info) == nil
	})
	self, _ := netnsInode("/proc/thread-self/ns/net")
	if info.NetnsIno != self {
		t.Errorf("hostNetwork process is not in the node netns")
	}
	if names, _ := listNetns(testNetnsPrefix); containsPrefix(names, testNetnsPrefix+string(hostPod.UID)) {
		t.Error("a hostNetwork pod got a netns")
	}
	rp.stop(time.Second)
}

func containsPrefix(list []string, s string) bool {
	for _, l := range list {
		if strings.HasPrefix(l, s) {
			return true
		}
	}
	return false
}

func TestPodRuntime_RestartedKubeletCleansUpLeftovers(t *testing.T) {
	if !inNodeNetns(t) {
		return
	}
	n := newTestNode(t)
	pod := n.pod("left", v1.PodSpec{
		RestartPolicy: v1.RestartPolicyNever,
		Containers:    []v1.Container{{Name: "c", Image: "testsrv", Args: []string{"serve", "0.0.0.0:8080", n.mounts}}},
	})
	p := n.r.newPodRun(pod)
	if err := p.setupSandbox(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); p.run(ctx) }()
	waitFor(t, "running", 10*time.Second, func() bool { return ctrStatus(p, "c").State.Running != nil })
	inst, _ := p.container("c").runningInstance()
	netnsPath := n.r.netnsPath(string(pod.UID))

	// A new kubelet over the same pods dir, as after a crash.
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	r2 := newRunner(n.cfg, log, nil, []string{"/proc/self/exe", InitVerb})
	r2.netnsPrefix = testNetnsPrefix
	defer r2.close()
	if err := r2.cleanupLeftovers(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inst.exited:
	case <-time.After(5 * time.Second):
		t.Fatal("leftover container process not killed")
	}
	<-done
	if fileExists(netnsPath) {
		t.Error("leftover netns not removed")
	}
	if fileExists(p.dir) {
		t.Error("leftover pod dir not removed")
	}
	if atts, _ := n.r.cni.cni.GetCachedAttachments(string(pod.UID)); len(atts) != 0 {
		t.Error("leftover CNI attachment not deleted")
	}
}

// testPKI is a CA with a serving certificate for 127.0.0.1 and a client
// certificate, as the sandbox's PKI gives the kubelet and the API server.
type testPKI struct {
	caFile, serverCert, serverKey, clientCert, clientKey string
	nodeCert, nodeKey                                    string
	pool                                                 *x509.CertPool
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kltest-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name string, blockType string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pki := &testPKI{caFile: write("ca.crt", "CERTIFICATE", caDER), pool: x509.NewCertPool()}
	pki.pool.AddCert(caCert)
	leaf := func(serial int64, cn, org string, usage x509.ExtKeyUsage, ips []net.IP) (string, string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: []string{org}},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature, IPAddresses: ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, _ := x509.MarshalECPrivateKey(key)
		return write(cn+".crt", "CERTIFICATE", der), write(cn+".key", "EC PRIVATE KEY", keyDER)
	}
	pki.serverCert, pki.serverKey = leaf(2, "kubelet", "", x509.ExtKeyUsageServerAuth, []net.IP{net.ParseIP("127.0.0.1")})
	pki.clientCert, pki.clientKey = leaf(3, "kube-apiserver-kubelet-client", AdminGroup, x509.ExtKeyUsageClientAuth, nil)
	pki.nodeCert, pki.nodeKey = leaf(4, "system:node:other", "system:nodes", x509.ExtKeyUsageClientAuth, nil)
	return pki
}
