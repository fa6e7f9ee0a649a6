package kubelet

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/cluster/pki"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
	"k8s.io/utils/ptr"
)

// The full kubelet (node registration, pod watch, status, tokens, volumes,
// deletion, the kubelet API behind the API server) against a real
// kube-apiserver, etcd, controller manager and scheduler started inside
// the test's own network namespace.

func kubeBinDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("SBX_KUBE_BIN_DIR")
	if dir == "" {
		dir, _ = filepath.Abs("../../.cache/kube/v1.34.4")
	}
	if missing := cluster.MissingBinaries(dir); len(missing) > 0 {
		t.Fatalf("kube binaries %v missing in %s: run hack/kube-bins.sh (or set SBX_KUBE_BIN_DIR)", missing, dir)
	}
	return dir
}

const testHostIP = "10.124.0.1"

func TestKubelet_AgainstRealAPIServer(t *testing.T) {
	if !inNodeNetns(t) {
		return
	}
	binDir := kubeBinDir(t)
	// The API server and the kubelet share an address in this namespace.
	if out, err := exec.Command("ip", "addr", "add", testHostIP+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("add host address: %v %s", err, out)
	}
	n := newTestNode(t)
	cpDir := filepath.Join(n.tmp, "cp")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cpCfg := cluster.Config{
		Dir: cpDir, BinDir: binDir, HostIP: netip.MustParseAddr(testHostIP),
		ServiceCIDR: netip.MustParsePrefix("10.96.0.0/16"), ClusterCIDR: netip.MustParsePrefix("10.123.0.0/16"),
		Nodes: []pki.Node{{Name: n.cfg.NodeName, IP: netip.MustParseAddr(testHostIP).AsSlice()}},
		Log:   log,
	}
	layout, err := cluster.Start(ctx, cpCfg)
	t.Cleanup(func() {
		if err := cluster.Stop(layout); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	if err != nil {
		t.Fatalf("start control plane: %v\n%s", err, cluster.Tail(layout.LogFile(cluster.APIServer), 30))
	}

	n.cfg.NodeIP = testHostIP
	n.cfg.Kubeconfig = filepath.Join(n.tmp, "kubelet.kubeconfig")
	if err := layout.NodeKubeconfig(n.cfg.Kubeconfig, cpCfg.Server(), n.cfg.NodeName); err != nil {
		t.Fatal(err)
	}
	n.cfg.ServingCert, n.cfg.ServingKey = layout.PKI.KubeletServing(n.cfg.NodeName)
	n.cfg.ClientCAFile = layout.PKI.CACert
	k, err := New(n.cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	k.r.close() // replaced by the test node's runner settings
	k.r = newRunner(n.cfg, log, k.r.api, k.r.initArgv)
	k.r.apiHost, k.r.apiPort = testHostIP, "6443"
	k.r.netnsPrefix = testNetnsPrefix
	k.r.backoffBase, k.r.backoffMax = 200*time.Millisecond, time.Second
	k.r.event = k.event
	kctx, stopKubelet := context.WithCancel(ctx)
	kubeletDone := make(chan error, 1)
	go func() { kubeletDone <- k.Run(kctx) }()
	t.Cleanup(func() {
		stopKubelet()
		select {
		case <-kubeletDone:
		case <-time.After(30 * time.Second):
			t.Error("kubelet did not stop")
		}
	})

	rc, err := cluster.RESTConfig(layout.AdminKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(rc)

	t.Run("node registers Ready with its pod CIDR and a lease", func(t *testing.T) {
		waitFor(t, "node Ready", 30*time.Second, func() bool {
			node, err := cs.CoreV1().Nodes().Get(ctx, n.cfg.NodeName, metav1.GetOptions{})
			if err != nil {
				return false
			}
			for _, c := range node.Status.Conditions {
				if c.Type == v1.NodeReady && c.Status == v1.ConditionTrue {
					return node.Spec.PodCIDR == n.cfg.PodCIDR && node.Status.Addresses[0].Address == testHostIP &&
						node.Status.DaemonEndpoints.KubeletEndpoint.Port == KubeletPort
				}
			}
			return false
		})
		waitFor(t, "node lease", 15*time.Second, func() bool {
			l, err := cs.CoordinationV1().Leases("kube-node-lease").Get(ctx, n.cfg.NodeName, metav1.GetOptions{})
			return err == nil && l.Spec.RenewTime != nil && *l.Spec.HolderIdentity == n.cfg.NodeName
		})
	})

	ns := "kltest"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "default service account", 30*time.Second, func() bool {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	})
	if _, err := cs.CoreV1().ConfigMaps(ns).Create(ctx, &v1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cfg"}, Data: map[string]string{"greeting": "hi from a configmap"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	mnt := n.mounts
	web := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: v1.PodSpec{
			TerminationGracePeriodSeconds: ptr.To(int64(10)),
			Volumes: []v1.Volume{
				{Name: "cfg", VolumeSource: v1.VolumeSource{ConfigMap: &v1.ConfigMapVolumeSource{LocalObjectReference: v1.LocalObjectReference{Name: "cfg"}}}},
				{Name: "istio-token", VolumeSource: v1.VolumeSource{Projected: &v1.ProjectedVolumeSource{Sources: []v1.VolumeProjection{
					{ServiceAccountToken: &v1.ServiceAccountTokenProjection{Audience: "istio-ca", ExpirationSeconds: ptr.To(int64(3600)), Path: "istio-token"}},
				}}}},
			},
			Containers: []v1.Container{{
				Name: "srv", Image: "testsrv", Args: []string{"serve", "0.0.0.0:8080", mnt},
				Ports: []v1.ContainerPort{{Name: "http", ContainerPort: 8080}},
				Env: []v1.EnvVar{{Name: "GREETING", ValueFrom: &v1.EnvVarSource{ConfigMapKeyRef: &v1.ConfigMapKeySelector{
					LocalObjectReference: v1.LocalObjectReference{Name: "cfg"}, Key: "greeting"}}}},
				VolumeMounts: []v1.VolumeMount{
					{Name: "cfg", MountPath: mnt + "/cfg"},
					{Name: "istio-token", MountPath: mnt + "/tokens"},
				},
				ReadinessProbe: &v1.Probe{ProbeHandler: v1.ProbeHandler{HTTPGet: &v1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("http")}}, PeriodSeconds: 1},
			}},
		},
	}
	if _, err := cs.CoreV1().Pods(ns).Create(ctx, web, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pod *v1.Pod
	waitFor(t, "web Running and Ready in the API", 60*time.Second, func() bool {
		pod, err = cs.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
		return err == nil && pod.Status.Phase == v1.PodRunning && podReady(pod)
	})
	netnsPath := n.r.netnsPath(string(pod.UID))
	base := "http://" + pod.Status.PodIP + ":8080"

	t.Run("status carries IPs, container state and conditions", func(t *testing.T) {
		st := pod.Status
		if !strings.HasPrefix(st.PodIP, "10.123.0.") || st.HostIP != testHostIP || st.StartTime == nil {
			t.Errorf("status IPs: %+v", st)
		}
		cs0 := st.ContainerStatuses[0]
		if !cs0.Ready || cs0.State.Running == nil || cs0.ContainerID == "" || cs0.Started == nil || !*cs0.Started {
			t.Errorf("container status: %+v", cs0)
		}
		for _, c := range []v1.PodConditionType{v1.PodScheduled, v1.PodReadyToStartContainers, v1.PodInitialized, v1.ContainersReady, v1.PodReady} {
			if !hasCondition(pod, c) {
				t.Errorf("condition %s not True: %+v", c, st.Conditions)
			}
		}
	})

	t.Run("service account token, configmap volume and env", func(t *testing.T) {
		file := func(p string) string {
			resp, err := http.Get(base + "/file?f=" + url.QueryEscape(p))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 200 {
				t.Errorf("%s: %s %s", p, resp.Status, b)
			}
			return string(b)
		}
		sa := "/var/run/secrets/kubernetes.io/serviceaccount/"
		if got := file(sa + "namespace"); got != ns {
			t.Errorf("namespace file %q", got)
		}
		if ca := file(sa + "ca.crt"); !strings.Contains(ca, "BEGIN CERTIFICATE") {
			t.Errorf("ca.crt %q", ca)
		}
		claims := jwtClaims(t, file(sa+"token"))
		if claims["sub"] != "system:serviceaccount:kltest:default" {
			t.Errorf("token subject %v", claims["sub"])
		}
		istio := jwtClaims(t, file(mnt+"/tokens/istio-token"))
		if aud, _ := istio["aud"].([]any); len(aud) != 1 || aud[0] != "istio-ca" {
			t.Errorf("istio token audience %v", istio["aud"])
		}
		if got := file(mnt + "/cfg/greeting"); got != "hi from a configmap" {
			t.Errorf("configmap file %q", got)
		}
		var info testInfo
		getJSON(t, base+"/info", &info)
		if info.Env["GREETING"] != "hi from a configmap" || info.Env["KUBERNETES_SERVICE_HOST"] != testHostIP {
			t.Errorf("env: GREETING=%q KUBERNETES_SERVICE_HOST=%q", info.Env["GREETING"], info.Env["KUBERNETES_SERVICE_HOST"])
		}
	})

	t.Run("logs, exec and port-forward through the API server", func(t *testing.T) {
		logs, err := cs.CoreV1().Pods(ns).GetLogs("web", &v1.PodLogOptions{Container: "srv"}).DoRaw(ctx)
		if err != nil || !strings.Contains(string(logs), "testsrv starting") {
			t.Errorf("logs: %v %q", err, logs)
		}
		execReq := func() *rest.Request {
			return cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name("web").SubResource("exec").
				VersionedParams(&v1.PodExecOptions{Container: "srv", Command: []string{"sh", "-c", "cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; hostname"}, Stdout: true, Stderr: true}, scheme.ParameterCodec)
		}
		spdyExec, err := remotecommand.NewSPDYExecutor(rc, "POST", execReq().URL())
		if err != nil {
			t.Fatal(err)
		}
		// Separate buffers: client-go copies both streams at once.
		var out, errb bytes.Buffer
		if err := spdyExec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &out, Stderr: &errb}); err != nil || out.String() != ns+"web\n" {
			t.Errorf("SPDY exec via API server: %v %q %q", err, out.String(), errb.String())
		}
		// kubectl 1.30+ speaks websockets to the API server, which talks SPDY to us.
		wsExec, err := remotecommand.NewWebSocketExecutor(rc, "GET", execReq().URL().String())
		if err != nil {
			t.Fatal(err)
		}
		out.Reset()
		if err := wsExec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &out, Stderr: &errb}); err != nil || out.String() != ns+"web\n" {
			t.Errorf("websocket exec via API server: %v %q %q", err, out.String(), errb.String())
		}

		rt, upgrader, err := spdy.RoundTripperFor(rc)
		if err != nil {
			t.Fatal(err)
		}
		pfURL := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name("web").SubResource("portforward").URL()
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
		var info testInfo
		getJSON(t, fmt.Sprintf("http://127.0.0.1:%d/info", ports[0].Local), &info)
		if info.Hostname != "web" {
			t.Errorf("port-forwarded to %q", info.Hostname)
		}
		close(stop)
		<-fwErr
	})

	t.Run("finished and crashing pods", func(t *testing.T) {
		mk := func(name string, policy v1.RestartPolicy, code string) {
			p := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Spec: v1.PodSpec{
				RestartPolicy: policy,
				Containers:    []v1.Container{{Name: "c", Image: "testsrv", Args: []string{"exit", code}}},
			}}
			if _, err := cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		mk("done", v1.RestartPolicyNever, "0")
		mk("crash", v1.RestartPolicyAlways, "1")
		waitFor(t, "done Succeeded", 30*time.Second, func() bool {
			p, err := cs.CoreV1().Pods(ns).Get(ctx, "done", metav1.GetOptions{})
			return err == nil && p.Status.Phase == v1.PodSucceeded
		})
		done, _ := cs.CoreV1().Pods(ns).Get(ctx, "done", metav1.GetOptions{})
		waitFor(t, "finished pod's netns released", 10*time.Second, func() bool { return !fileExists(n.r.netnsPath(string(done.UID))) })
		if term := done.Status.ContainerStatuses[0].State.Terminated; term == nil || term.Reason != "Completed" || term.ExitCode != 0 {
			t.Errorf("done container: %+v", done.Status.ContainerStatuses[0])
		}
		logs, err := cs.CoreV1().Pods(ns).GetLogs("done", &v1.PodLogOptions{}).DoRaw(ctx)
		if err != nil || string(logs) != "testsrv exiting with 0\n" {
			t.Errorf("logs of a finished pod: %v %q", err, logs)
		}
		waitFor(t, "crash restarted", 30*time.Second, func() bool {
			p, err := cs.CoreV1().Pods(ns).Get(ctx, "crash", metav1.GetOptions{})
			if err != nil || len(p.Status.ContainerStatuses) == 0 {
				return false
			}
			c := p.Status.ContainerStatuses[0]
			return p.Status.Phase == v1.PodRunning && c.RestartCount >= 2 && c.LastTerminationState.Terminated != nil &&
				c.LastTerminationState.Terminated.ExitCode == 1
		})
		prev, err := cs.CoreV1().Pods(ns).GetLogs("crash", &v1.PodLogOptions{Previous: true}).DoRaw(ctx)
		if err != nil || string(prev) != "testsrv exiting with 1\n" {
			t.Errorf("previous logs: %v %q", err, prev)
		}
	})

	t.Run("delete stops the pod gracefully and finalizes it", func(t *testing.T) {
		start := time.Now()
		if err := cs.CoreV1().Pods(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "web gone from the API", 30*time.Second, func() bool {
			_, err := cs.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
			return apierrors.IsNotFound(err)
		})
		if d := time.Since(start); d > 8*time.Second {
			t.Errorf("a pod that exits on SIGTERM took %s to go", d)
		}
		if fileExists(netnsPath) {
			t.Error("netns of the deleted pod still there")
		}
		// The object goes first; the kubelet removes the dir right after.
		waitFor(t, "pod dir removed", 5*time.Second, func() bool { return !fileExists(filepath.Join(n.cfg.PodsDir, string(pod.UID))) })
	})

	t.Run("stopping the kubelet stops its pods and removes their netns", func(t *testing.T) {
		crash, err := cs.CoreV1().Pods(ns).Get(ctx, "crash", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		stopKubelet()
		select {
		case err := <-kubeletDone:
			if err != nil {
				t.Errorf("kubelet Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("kubelet did not stop")
		}
		kubeletDone <- nil // for the cleanup
		if fileExists(n.r.netnsPath(string(crash.UID))) {
			t.Error("netns left after the kubelet stopped")
		}
		if left, _ := listNetns(testNetnsPrefix); len(left) > 0 {
			t.Errorf("pod netns left: %v", left)
		}
		if ents, _ := os.ReadDir(n.cfg.PodsDir); len(ents) > 0 {
			t.Errorf("pod dirs left: %v", ents)
		}
	})
}

func podReady(p *v1.Pod) bool { return hasCondition(p, v1.PodReady) }

func hasCondition(p *v1.Pod, t v1.PodConditionType) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == t && c.Status == v1.ConditionTrue {
			return true
		}
	}
	return false
}

func jwtClaims(t *testing.T, tok string) map[string]any {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", tok)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}
