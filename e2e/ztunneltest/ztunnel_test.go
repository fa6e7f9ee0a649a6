package ztunneltest

//lint:file-ignore SA1019 x/net's http2.Transport sends the raw CONNECT and GET requests the bad-input test needs; net/http's would not send them as they are

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/net/http2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/echo"
	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/internal/nsenter"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

const (
	// appNS and otherNS are enrolled (istio.io/dataplane-mode=ambient).
	appNS   = "ztunneltest-app"
	otherNS = "ztunneltest-other"
	// certTTL is the workload certificate lifetime ztunnel asks for after
	// the restart, short enough to rotate within the outage test.
	certTTL = "2m"
	// systemNS is where the mesh runs.
	systemNS = meshinstall.Namespace
)

// env is the shared harness (e2e/meshharness) with this suite's own helpers.
type env struct{ *meshharness.Env }

func runOutput(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}

// TestZtunnel installs the mesh and the sample app once and runs the
// checks in order; later ones rely on the state earlier ones leave (the
// restart switches ztunnel to --tunnel=auto with short-lived certificates).
func TestZtunnel(t *testing.T) {
	e := &env{meshharness.Start(t, 9*time.Minute, appNS, otherNS)}
	sb, ctx := e.Sandbox, e.Ctx
	node0, node1 := sb.NodeName(0), sb.NodeName(1)
	start := time.Now()
	e.deployApp(t, node0, node1)
	t.Logf("sample app running in %v", time.Since(start).Round(time.Millisecond))

	a := &app{
		client: e.Pod(t, appNS, "client"), other: e.Pod(t, otherNS, "other"),
		echo0: e.Pod(t, appNS, "echo-0"), echo1: e.Pod(t, appNS, "echo-1"), echoQ: e.Pod(t, otherNS, "echo-q"),
	}
	svc, err := sb.Client().CoreV1().Services(appNS).Get(ctx, "echo", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a.vip = svc.Spec.ClusterIP
	for _, p := range []*corev1.Pod{a.client, a.other, a.echo0, a.echo1, a.echoQ} {
		if p.Annotations[kube.AnnotationRedirection] != kube.RedirectionEnabled {
			t.Fatalf("enrolled pod %s is not marked redirected: %v", p.Name, p.Annotations)
		}
	}

	steps := []struct {
		name string
		f    func(t *testing.T, e *env, a *app)
	}{
		{"DNS_ServiceNamesFromTheMeshOthersServfailPromptly", testDNS},
		{"ConfigDump_RedirectionVerifiedAndMissing", testRedirection},
		{"L4Policy_ByServiceAccountNamespaceAndPortWithDenyLog", testPolicy},
		{"RollingRestartUnderLoad_NoFailedConnectionNothingAroundIt", testRestart},
		{"AutoMode_QUICThenFallbackToH2WhenUDPBlocked", testAutoFallback},
		{"IstiodOutage_TrafficFlowsCertificatesRotateAfter", testIstiodOutage},
		{"BadInput_RefusedWhileOthersAreServed", testBadInput},
		{"QUICMode_EveryTunnelOverH3", testQUICMode},
	}
	for _, s := range steps {
		if !t.Run(s.name, func(t *testing.T) { s.f(t, e, a) }) && ctx.Err() != nil {
			t.Fatal("out of time")
		}
	}
}

// app is the sample app's pods.
type app struct {
	client, other, echo0, echo1 *corev1.Pod
	// echoQ (otherNS, node-1) gets no traffic before the auto-mode test.
	echoQ *corev1.Pod
	vip   string
}

func hostPort(ip string, port int) string { return net.JoinHostPort(ip, strconv.Itoa(port)) }

// podDialer dials from inside a pod's netns (its path resolved once).
type podDialer struct {
	meshharness.NetnsDialer
	// dns is the nameserver in every pod's resolv.conf (the sandbox runs
	// no cluster DNS: only ztunnel's proxy answers there).
	dns string
}

func (e *env) dialer(t *testing.T, ns, name string) podDialer {
	t.Helper()
	return podDialer{NetnsDialer: e.Dialer(t, ns, name), dns: netip.AddrPortFrom(e.Sandbox.Plan.ClusterDNS(), 53).String()}
}

// dnsQuery asks the pod's nameserver (captured to ztunnel's 15053) over
// network (udp or tcp).
func (d podDialer) dnsQuery(ctx context.Context, network, name string, qtype uint16) (*mdns.Msg, time.Duration, error) {
	c, err := d.Dial(ctx, network, d.dns)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	cl := &mdns.Client{Net: network, Timeout: 8 * time.Second}
	r, rtt, err := cl.ExchangeWithConn(m, &mdns.Conn{Conn: c})
	return r, rtt, err
}

func aRecords(m *mdns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		if a, ok := rr.(*mdns.A); ok {
			out = append(out, a.A.String())
		}
	}
	return out
}

func testDNS(t *testing.T, e *env, a *app) {
	d := e.dialer(t, appNS, "client")
	fqdn := "echo." + appNS + ".svc.cluster.local."
	for _, network := range []string{"udp", "tcp"} {
		r, _, err := d.dnsQuery(e.Ctx, network, fqdn, mdns.TypeA)
		if err != nil {
			t.Fatalf("%s query for %s: %v", network, fqdn, err)
		}
		if r.Rcode != mdns.RcodeSuccess || strings.Join(aRecords(r), ",") != a.vip || !r.Authoritative {
			t.Errorf("%s answer for %s: %s %v (authoritative %v), want the Service VIP %s", network, fqdn,
				mdns.RcodeToString[r.Rcode], aRecords(r), r.Authoritative, a.vip)
		}
	}
	// A name outside the mesh goes to ztunnel's upstream (none reachable in
	// the sandbox): a clear SERVFAIL, promptly, never an invented NXDOMAIN.
	r, rtt, err := d.dnsQuery(e.Ctx, "udp", "example.com.", mdns.TypeA)
	if err != nil {
		t.Fatalf("query for example.com: %v (a hang, not an answer)", err)
	}
	if r.Rcode != mdns.RcodeServerFailure {
		t.Errorf("example.com: %s, want SERVFAIL", mdns.RcodeToString[r.Rcode])
	}
	if rtt > 4*time.Second {
		t.Errorf("SERVFAIL took %v", rtt)
	}
	// The pod's own resolver (its resolv.conf: search path, ndots:5) finds
	// the Service by short name and by FQDN, and the requests go through.
	name := "dnsclient"
	e.Sandbox.Client().CoreV1().Pods(appNS).Delete(e.Ctx, name, metav1.DeleteOptions{})
	pod := fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata: {name: %[1]s, namespace: %[2]s}
spec:
  nodeName: %[3]s
  serviceAccountName: client
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: short
    image: meshlite/echo:dev
    args: [client, -n, "3", -new-conn, "http://echo/short"]
  - name: fqdn
    image: meshlite/echo:dev
    args: [client, -n, "3", -new-conn, "http://echo.%[2]s.svc.cluster.local/fqdn"]
`, name, appNS, a.client.Spec.NodeName)
	if _, err := e.Sandbox.Apply(e.Ctx, pod); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.Sandbox.Client().CoreV1().Pods(appNS).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	var phase corev1.PodPhase
	err = e.Sandbox.WaitFor(e.Ctx, 60*time.Second, "the DNS client pod to finish", func(ctx context.Context) (bool, error) {
		p, err := e.Sandbox.Client().CoreV1().Pods(appNS).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		phase = p.Status.Phase
		return phase == corev1.PodSucceeded || phase == corev1.PodFailed, nil
	})
	if err != nil || phase != corev1.PodSucceeded {
		var b strings.Builder
		for _, c := range []string{"short", "fqdn"} {
			fmt.Fprintf(&b, "--- %s:\n", c)
			e.Sandbox.Logs(e.Ctx, appNS, name, c, false, &b)
		}
		t.Fatalf("pod requests by Service name: phase %s, %v\n%s", phase, err, b.String())
	}
}

// dump is the part of ztunnel's /config_dump these tests read.
type dump struct {
	Ztunnel *struct {
		Node, Version, Tunnel string
		H2Fallbacks           []struct {
			Endpoint string    `json:"endpoint"`
			Until    time.Time `json:"until"`
		} `json:"h2_fallbacks"`
	} `json:"ztunnel"`
	Workloads []struct {
		Name             string `json:"name"`
		Namespace        string `json:"namespace"`
		Local            bool   `json:"local"`
		Redirection      string `json:"redirection"`
		RedirectionError string `json:"redirection_error"`
	} `json:"workloads"`
	Certificates []struct {
		Identity  string    `json:"identity"`
		State     string    `json:"state"`
		Serial    string    `json:"serial"`
		NotAfter  time.Time `json:"not_after"`
		LastError string    `json:"last_error"`
	} `json:"certificates"`
}

func (e *env) dump(t *testing.T, node int) dump {
	t.Helper()
	var d dump
	if err := json.Unmarshal(e.Admin(t, node, "/config_dump"), &d); err != nil {
		t.Fatalf("decode /config_dump of node %d: %v", node, err)
	}
	return d
}

func (d dump) workload(ns, name string) (local bool, redirection, why string, ok bool) {
	for _, w := range d.Workloads {
		if w.Namespace == ns && w.Name == name {
			return w.Local, w.Redirection, w.RedirectionError, true
		}
	}
	return false, "", "", false
}

func testRedirection(t *testing.T, e *env, a *app) {
	for node := range 2 {
		d := e.dump(t, node)
		if d.Ztunnel == nil || d.Ztunnel.Node != e.Sandbox.NodeName(node) || d.Ztunnel.Tunnel != "h2" || d.Ztunnel.Version == "" {
			t.Errorf("node %d: ztunnel object %+v", node, d.Ztunnel)
		}
		for _, w := range d.Workloads {
			switch {
			case w.Local && w.Redirection != "verified":
				t.Errorf("node %d: local pod %s/%s redirection %q (%s)", node, w.Namespace, w.Name, w.Redirection, w.RedirectionError)
			case !w.Local && w.Redirection != "":
				t.Errorf("node %d: remote pod %s/%s redirection %q", node, w.Namespace, w.Name, w.Redirection)
			}
		}
		if local, _, _, _ := d.workload(appNS, []string{"echo-0", "echo-1"}[node]); !local {
			t.Errorf("node %d does not hold its echo pod", node)
		}
	}
	// Unhook the pod's outbound capture: the dump says so, with why.
	nsPath, err := e.Sandbox.PodNetns(e.Ctx, otherNS, "other")
	if err != nil {
		t.Fatal(err)
	}
	ipt := func(args ...string) error {
		return nsenter.DoPath(nsPath, func() error {
			out, err := runOutput("iptables", append([]string{"-w", "-t", "nat"}, args...)...)
			if err != nil {
				return fmt.Errorf("iptables %v: %v: %s", args, err, out)
			}
			return nil
		})
	}
	if err := ipt("-D", "OUTPUT", "-j", "ISTIO_OUTPUT"); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := ipt("-C", "OUTPUT", "-j", "ISTIO_OUTPUT"); err != nil { // the agent may have repaired it
				if err := ipt("-A", "OUTPUT", "-j", "ISTIO_OUTPUT"); err != nil {
					t.Error(err)
				}
			}
		}
	}
	t.Cleanup(restore)
	node := nodeIndex(e, a.other.Spec.NodeName)
	var why string
	e.Eventually(t, 10*time.Second, "the dump to show other's redirection missing", func() bool {
		_, r, w, _ := e.dump(t, node).workload(otherNS, "other")
		why = w
		return r == "missing"
	})
	if !strings.Contains(why, "ISTIO_OUTPUT") {
		t.Errorf("redirection_error %q does not name the missing hook", why)
	}
	restore()
	e.Eventually(t, 10*time.Second, "the dump to show other's redirection verified again", func() bool {
		_, r, _, _ := e.dump(t, node).workload(otherNS, "other")
		return r == "verified"
	})
	// tcp_migrate_req: a handover moves queued connections instead of
	// resetting them.
	out, err := e.Sandbox.Exec(e.Ctx, appNS, "client", "cat", "/proc/sys/net/ipv4/tcp_migrate_req")
	if err != nil || strings.TrimSpace(string(out)) != "1" {
		t.Errorf("tcp_migrate_req in the client pod: %q %v", out, err)
	}
}

func nodeIndex(e *env, name string) int {
	for i := range e.Sandbox.Plan.Nodes {
		if e.Sandbox.NodeName(i) == name {
			return i
		}
	}
	return -1
}

// applyPolicy applies an AuthorizationPolicy and deletes it when the test
// ends.
func (e *env) applyPolicy(t *testing.T, yaml string) {
	t.Helper()
	if _, err := e.Sandbox.Apply(e.Ctx, yaml); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Sandbox.Delete(context.Background(), yaml); err != nil {
			t.Errorf("delete policy: %v", err)
		}
	})
}

func testPolicy(t *testing.T, e *env, a *app) {
	cli, oth := e.dialer(t, appNS, "client"), e.dialer(t, otherNS, "other")
	echo1 := func(port int) string { return hostPort(a.echo1.Status.PodIP, port) }
	tcpOK := func(d podDialer) error {
		c, err := d.Dial(e.Ctx, "tcp", echo1(9090))
		if err != nil {
			return err
		}
		defer c.Close()
		return meshharness.EchoConn{Conn: c}.RoundTrip("policy check")
	}
	httpOK := func(d podDialer) error {
		code, _, err := d.Get(e.Ctx, "http://"+echo1(8080)+"/policy", 5*time.Second)
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d", code)
		}
		return err
	}
	// DENY by service account and port: the client's TCP to 9090 goes, its
	// HTTP on 8080 still works.
	t.Run("DenyByPrincipalAndPort", func(t *testing.T) {
		e.applyPolicy(t, fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-tcp, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/%[1]s/sa/client"]}}]
    to: [{operation: {ports: ["9090"]}}]
`, appNS))
		e.Eventually(t, 20*time.Second, "the DENY policy to apply", func() bool { return tcpOK(cli) != nil })
		if err := httpOK(cli); err != nil {
			t.Errorf("client HTTP on 8080 under a DENY for 9090: %v", err)
		}
		if err := tcpOK(oth); err != nil {
			t.Errorf("other namespace's TCP to 9090 (not the denied principal): %v", err)
		}
		e.FindLog(t, a.echo1.Spec.NodeName, "the deny log line", func(l meshharness.LogLine) bool {
			return l.Get("msg") == "connection denied by policy" && l.Get("src.identity") == meshharness.Spiffe(appNS, "client") &&
				l.Get("policy") == appNS+"/deny-client-tcp" && l.Get("rule") == "0" && l.Get("dst") == echo1(9090) &&
				l.Get("dst.workload") == appNS+"/echo-1" && l.Get("src.ip") == a.client.Status.PodIP
		})
	})
	// ALLOW by namespace and port: only the other namespace, only 8080.
	t.Run("AllowByNamespaceAndPort", func(t *testing.T) {
		e.applyPolicy(t, fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-other-http, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["%[2]s"]}}]
    to: [{operation: {ports: ["8080"]}}]
`, appNS, otherNS))
		e.Eventually(t, 20*time.Second, "the ALLOW policy to apply", func() bool { return httpOK(cli) != nil })
		if err := httpOK(oth); err != nil {
			t.Errorf("other namespace's HTTP on 8080, allowed: %v", err)
		}
		if err := tcpOK(oth); err == nil {
			t.Error("other namespace's TCP on 9090 passed an ALLOW for 8080 only")
		}
		e.FindLog(t, a.echo1.Spec.NodeName, "the no-ALLOW-matched log line", func(l meshharness.LogLine) bool {
			return l.Get("msg") == "connection denied by policy" && l.Get("src.identity") == meshharness.Spiffe(appNS, "client") &&
				l.Get("reason") == "no ALLOW policy matched" && l.Get("dst") == echo1(8080)
		})
	})
	// Both gone: the client is served again.
	e.Eventually(t, 20*time.Second, "the policies to go", func() bool { return httpOK(cli) == nil && tcpOK(cli) == nil })
}

// setZtunnelArgs rewrites the ztunnel DaemonSet's args (a rolling update).
func (e *env) setZtunnelArgs(t *testing.T, edit func([]string) []string) {
	t.Helper()
	dss := e.Sandbox.Client().AppsV1().DaemonSets(systemNS)
	ds, err := dss.Get(e.Ctx, "ztunnel", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c := &ds.Spec.Template.Spec.Containers[0]
	c.Args = edit(c.Args)
	if _, err := dss.Update(e.Ctx, ds, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update the ztunnel DaemonSet: %v", err)
	}
}

// waitRollout waits until every node runs exactly one ztunnel of the
// DaemonSet's current template, ready, and refreshes e.Ztunnel.
func (e *env) waitRollout(t *testing.T, timeout time.Duration) {
	t.Helper()
	dss := e.Sandbox.Client().AppsV1().DaemonSets(systemNS)
	err := e.Sandbox.WaitFor(e.Ctx, timeout, "the ztunnel rollout", func(ctx context.Context) (bool, error) {
		ds, err := dss.Get(ctx, "ztunnel", metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		gen := strconv.FormatInt(ds.Generation, 10)
		pods := e.ZtunnelPods(t)
		if len(pods) != e.Sandbox.Plan.Nodes {
			return false, nil
		}
		for _, p := range pods {
			if p.Labels["pod-template-generation"] != gen || !meshharness.Ready(&p) || p.DeletionTimestamp != nil {
				return false, nil
			}
		}
		return ds.Status.ObservedGeneration == ds.Generation && ds.Status.UpdatedNumberScheduled == int32(e.Sandbox.Plan.Nodes), nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, e.PodLogs(systemNS, "app=ztunnel"))
	}
	e.RefreshZtunnels(t)
}

func testRestart(t *testing.T, e *env, a *app) {
	marker := meshharness.RandomMarker("ztunneltest")
	probe := e.NewWireProbe(t, marker, a.echo1.Status.PodIP, map[string]int{"app-http": 8080, "hbone": 15008})
	before := probe.Counts(t)
	cli := e.dialer(t, appNS, "client")
	targets := []string{
		"http://" + hostPort(a.echo1.Status.PodIP, 8080) + "/" + marker, // pod IP, across nodes
		"http://" + hostPort(a.vip, 80) + "/" + marker,                  // Service VIP
	}
	// A steady load, ~60 new connections a second from node-0's client,
	// while both nodes' ztunnels are replaced one after the other.
	var sent, failed atomic.Int64
	var errMu sync.Mutex
	var errs []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(33 * time.Millisecond)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				sent.Add(1)
				start := time.Now()
				code, f, err := cli.Get(e.Ctx, targets[(i+w)%2], 5*time.Second)
				if err == nil && (code != 200 || f.Get(echo.FieldPod) == "") {
					err = fmt.Errorf("status %d, answer %v", code, f)
				}
				if err != nil {
					failed.Add(1)
					errMu.Lock()
					errs = append(errs, fmt.Sprintf("%s after %v: %v", time.Now().Format("15:04:05.000"), time.Since(start).Round(time.Millisecond), err))
					errMu.Unlock()
				}
			}
		}()
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()
	time.Sleep(2 * time.Second)
	old := map[string]string{}
	oldLogs := map[string]*syncBuf{}
	var logsWG sync.WaitGroup
	lctx, lcancel := context.WithTimeout(e.Ctx, 3*time.Minute)
	defer lcancel()
	for _, p := range e.ZtunnelPods(t) {
		old[p.Name] = p.Spec.NodeName
		// Follow each old ztunnel's log to its end: it must say it handed
		// its pods over to a successor rather than just stopping.
		b := &syncBuf{}
		oldLogs[p.Name] = b
		logsWG.Add(1)
		go func() {
			defer logsWG.Done()
			e.Sandbox.Logs(lctx, systemNS, p.Name, "istio-proxy", true, b)
		}()
	}
	start := time.Now()
	e.setZtunnelArgs(t, func(args []string) []string {
		var out []string
		for _, a := range args {
			if a == "--tunnel=h2" {
				a = "--tunnel=auto"
			}
			out = append(out, a)
		}
		return append(out, "--cert-ttl="+certTTL)
	})
	e.waitRollout(t, 3*time.Minute)
	// The old ones may still be draining: wait until they are gone.
	e.Eventually(t, 60*time.Second, "the old ztunnels to exit", func() bool {
		for _, p := range e.ZtunnelPods(t) {
			if _, isOld := old[p.Name]; isOld {
				return false
			}
		}
		return true
	})
	t.Logf("both ztunnels replaced in %v", time.Since(start).Round(time.Millisecond))
	lcancel()
	logsWG.Wait()
	for name, b := range oldLogs {
		if !strings.Contains(b.String(), "handover: a successor listens in every pod") {
			t.Errorf("old ztunnel %s (%s) did not hand its pods over to a successor; its log ends:\n%s", name, old[name], tail(b.String(), 15))
		}
	}
	time.Sleep(2 * time.Second)
	stopLoad()
	after := probe.Counts(t)
	t.Logf("requests %d, failed %d; forwarding-path counters %v -> %v", sent.Load(), failed.Load(), before, after)
	if failed.Load() > 0 {
		t.Errorf("%d of %d requests failed during the restart:\n%s", failed.Load(), sent.Load(), strings.Join(errs, "\n"))
	}
	if sent.Load() < 100 {
		t.Errorf("only %d requests sent: the load proves little", sent.Load())
	}
	if after["marker"] != before["marker"] || after["app-http"] != before["app-http"] {
		t.Errorf("traffic went around ztunnel during the restart: marker in clear %d, packets to 8080 %d",
			after["marker"]-before["marker"], after["app-http"]-before["app-http"])
	}
	if after["hbone"] == before["hbone"] {
		t.Error("no HBONE packets crossed the nodes under load")
	}
	// The old ones said how they handed over.
	for node := range 2 {
		if d := e.dump(t, node); d.Ztunnel == nil || d.Ztunnel.Tunnel != "auto" {
			t.Errorf("node %d after the restart: %+v", node, d.Ztunnel)
		}
	}
}

// syncBuf is a bytes.Buffer safe for a writer and a reader.
type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func testAutoFallback(t *testing.T, e *env, a *app) {
	cli := e.dialer(t, appNS, "client")
	// QUIC to the other pod, an endpoint the restart's load did not touch
	// (one caught mid-handover may have been remembered as h2 for a while).
	c, err := cli.Dial(e.Ctx, "tcp", hostPort(a.other.Status.PodIP, 9090))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := (meshharness.EchoConn{Conn: c}).RoundTrip("over quic"); err != nil {
		t.Fatalf("client to the other pod in auto mode: %v", err)
	}
	ci := e.FindConn(t, 0, "the outbound connection to the other pod", func(ci meshharness.ConnInfo) bool {
		return ci.Direction == "outbound" && ci.Dst == hostPort(a.other.Status.PodIP, 9090)
	})
	if ci.Transport != "h3" || ci.Security != "mtls" {
		t.Errorf("auto mode to a reachable QUIC endpoint: %s", ci)
	}
	c.Close()

	// UDP 15008 dropped inside echo-q's netns (node-1): the first
	// connection falls back to HTTP/2 after the QUIC attempt, the next goes
	// HTTP/2 at once.
	nsPath, err := e.Sandbox.PodNetns(e.Ctx, otherNS, "echo-q")
	if err != nil {
		t.Fatal(err)
	}
	rule := []string{"INPUT", "-p", "udp", "--dport", "15008", "-j", "DROP"}
	ipt := func(op string) error {
		return nsenter.DoPath(nsPath, func() error {
			out, err := runOutput("iptables", append([]string{"-w", op}, rule...)...)
			if err != nil {
				return fmt.Errorf("iptables %s: %v: %s", op, err, out)
			}
			return nil
		})
	}
	if err := ipt("-I"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ipt("-D") })
	target := hostPort(a.echoQ.Status.PodIP, 9090)
	for i, limit := range []time.Duration{5 * time.Second, 700 * time.Millisecond} {
		// The first pays the QUIC attempt (1 s): proof that it was tried.
		minimum := []time.Duration{900 * time.Millisecond, 0}[i]
		start := time.Now()
		c, err := cli.Dial(e.Ctx, "tcp", target)
		if err != nil {
			t.Fatal(err)
		}
		if err := (meshharness.EchoConn{Conn: c}).RoundTrip(fmt.Sprintf("fallback %d", i)); err != nil {
			t.Fatalf("connection %d to echo-q with UDP 15008 blocked: %v", i, err)
		}
		took := time.Since(start)
		ci := e.FindConn(t, 0, "the outbound connection to echo-q", func(ci meshharness.ConnInfo) bool {
			return ci.Direction == "outbound" && ci.Dst == target
		})
		c.Close()
		if ci.Transport != "h2" || ci.Security != "mtls" {
			t.Errorf("connection %d with UDP blocked: %s", i, ci)
		}
		if took > limit || took < minimum {
			t.Errorf("connection %d took %v (want %v to %v)", i, took, minimum, limit)
		}
		t.Logf("connection %d over %s in %v", i, ci.Transport, took.Round(time.Millisecond))
	}
	// The remembered choice is in the dump.
	node := nodeIndex(e, a.client.Spec.NodeName)
	remembered := false
	d := e.dump(t, node)
	for _, fb := range d.Ztunnel.H2Fallbacks {
		remembered = remembered || fb.Endpoint == hostPort(a.echoQ.Status.PodIP, 15008) && time.Until(fb.Until) > time.Minute
	}
	if !remembered {
		t.Errorf("node %d's dump does not show the remembered fallback to h2 for echo-q: %+v", node, d.Ztunnel)
	}
	e.FindLog(t, a.client.Spec.NodeName, "the fallback log line", func(l meshharness.LogLine) bool {
		return l.Get("msg") == "QUIC to endpoint failed; using HTTP/2" && l.Get("endpoint") == hostPort(a.echoQ.Status.PodIP, 15008)
	})
}

func testQUICMode(t *testing.T, e *env, a *app) {
	e.setZtunnelArgs(t, func(args []string) []string {
		for i, a := range args {
			if a == "--tunnel=auto" {
				args[i] = "--tunnel=quic"
			}
		}
		return args
	})
	e.waitRollout(t, 2*time.Minute)
	for node := range 2 {
		e.Eventually(t, 30*time.Second, fmt.Sprintf("node %d's ztunnel in quic mode", node), func() bool {
			d := e.dump(t, node)
			return d.Ztunnel != nil && d.Ztunnel.Tunnel == "quic"
		})
	}
	cli := e.dialer(t, appNS, "client")
	for _, ip := range []string{a.echo1.Status.PodIP, a.echo0.Status.PodIP} {
		target := hostPort(ip, 9090)
		c, err := cli.Dial(e.Ctx, "tcp", target)
		if err != nil {
			t.Fatal(err)
		}
		if err := (meshharness.EchoConn{Conn: c}).RoundTrip("quic mode"); err != nil {
			t.Fatalf("client to %s in quic mode: %v", target, err)
		}
		ci := e.FindConn(t, 0, "the outbound connection to "+target, func(ci meshharness.ConnInfo) bool {
			return ci.Direction == "outbound" && ci.Dst == target
		})
		c.Close()
		if ci.Transport != "h3" || ci.Security != "mtls" {
			t.Errorf("quic mode to %s: %s", target, ci)
		}
	}
}

// istiodPIDs finds the istiod-lite processes (those in its pod's netns).
func (e *env) istiodPIDs(t *testing.T) []int {
	t.Helper()
	pods, err := e.Sandbox.WaitPodsRunning(e.Ctx, systemNS, "app=istiod", 1, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	path, err := e.Sandbox.PodNetns(e.Ctx, systemNS, pods[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	var want syscall.Stat_t
	if err := syscall.Stat(path, &want); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", ent.Name(), "ns/net"), &st) != nil || st.Ino != want.Ino || st.Dev != want.Dev {
			continue
		}
		if exe, _ := os.Readlink(filepath.Join("/proc", ent.Name(), "exe")); strings.HasSuffix(exe, "/istiod-lite") {
			out = append(out, pid)
		}
	}
	if len(out) == 0 {
		t.Fatal("no istiod-lite process found in its pod's netns")
	}
	return out
}

func (e *env) serials(t *testing.T, node int) map[string]string {
	out := map[string]string{}
	for _, c := range e.dump(t, node).Certificates {
		if c.State == "valid" {
			out[c.Identity] = c.Serial
		}
	}
	return out
}

func testIstiodOutage(t *testing.T, e *env, a *app) {
	cli := e.dialer(t, appNS, "client")
	held, err := cli.Dial(e.Ctx, "tcp", hostPort(a.echo1.Status.PodIP, 9090))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := (meshharness.EchoConn{Conn: held}).RoundTrip("before the outage"); err != nil {
		t.Fatal(err)
	}
	ids := []struct {
		node int
		id   string
	}{{0, meshharness.Spiffe(appNS, "client")}, {1, meshharness.Spiffe(appNS, "echo")}}
	before := map[int]map[string]string{0: e.serials(t, 0), 1: e.serials(t, 1)}
	for _, x := range ids {
		if before[x.node][x.id] == "" {
			t.Fatalf("node %d holds no valid certificate for %s: %+v", x.node, x.id, e.dump(t, x.node).Certificates)
		}
	}
	pids := e.istiodPIDs(t)
	signal := func(sig syscall.Signal) {
		for _, pid := range pids {
			if err := syscall.Kill(pid, sig); err != nil {
				t.Errorf("signal %v to istiod-lite %d: %v", sig, pid, err)
			}
		}
	}
	signal(syscall.SIGSTOP)
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			signal(syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)
	start := time.Now()
	t.Logf("istiod-lite (pids %v) stopped", pids)
	for time.Since(start) < 60*time.Second {
		for _, u := range []string{"http://" + hostPort(a.echo1.Status.PodIP, 8080) + "/outage", "http://" + hostPort(a.vip, 80) + "/outage"} {
			if code, _, err := cli.Get(e.Ctx, u, 5*time.Second); err != nil || code != 200 {
				t.Errorf("%v into the outage, new connection %s: %d %v", time.Since(start).Round(time.Second), u, code, err)
			}
		}
		time.Sleep(5 * time.Second)
	}
	if err := (meshharness.EchoConn{Conn: held}).RoundTrip("after the outage"); err != nil {
		t.Errorf("connection held through the outage: %v", err)
	}
	resume()
	t.Log("istiod-lite resumed")
	for _, x := range ids {
		var now string
		e.Eventually(t, 90*time.Second, fmt.Sprintf("node %d to rotate %s", x.node, x.id), func() bool {
			now = e.serials(t, x.node)[x.id]
			return now != "" && now != before[x.node][x.id]
		})
		t.Logf("node %d rotated %s: serial %s -> %s", x.node, x.id, before[x.node][x.id], now)
	}
	if code, _, err := cli.Get(e.Ctx, "http://"+hostPort(a.echo1.Status.PodIP, 8080)+"/rotated", 5*time.Second); err != nil || code != 200 {
		t.Errorf("after rotation: %d %v", code, err)
	}
}

// meshCA reads istiod-lite's CA (the sandbox's own) to mint test peers.
func (e *env) meshCA(t *testing.T) (*x509.Certificate, any) {
	t.Helper()
	s, err := e.Sandbox.Client().CoreV1().Secrets(systemNS).Get(e.Ctx, "istio-ca-secret", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("istiod-lite's CA secret: %v", err)
	}
	certs, err := identity.ParseCertsPEM(s.Data["ca-cert.pem"])
	if err != nil || len(certs) == 0 {
		t.Fatalf("CA cert: %v", err)
	}
	key, err := identity.ParseKeyPEM(s.Data["ca-key.pem"])
	if err != nil {
		t.Fatalf("CA key: %v", err)
	}
	return certs[0], key
}

// mint returns a client certificate for the SPIFFE ID uri signed by ca.
func mint(t *testing.T, ca *x509.Certificate, caKey any, uri string) tls.Certificate {
	t.Helper()
	key, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(uri)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: time.Now().Add(-time.Minute),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Raw}, PrivateKey: key}
}

func testBadInput(t *testing.T, e *env, a *app) {
	ca, caKey := e.meshCA(t)
	hbone := hostPort(a.echo1.Status.PodIP, 15008)
	cli := e.dialer(t, appNS, "client")
	served := func(what string) {
		t.Helper()
		start := time.Now()
		if code, _, err := cli.Get(e.Ctx, "http://"+hostPort(a.echo1.Status.PodIP, 8080)+"/meanwhile", 3*time.Second); err != nil || code != 200 {
			t.Errorf("client to echo-1 %s: %d %v", what, code, err)
		} else if d := time.Since(start); d > 2*time.Second {
			t.Errorf("client to echo-1 %s took %v", what, d)
		}
	}
	tlsConf := func(cert *tls.Certificate) *tls.Config {
		c := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
			// The server's identity is not what is tested here.
			InsecureSkipVerify: true}
		if cert != nil {
			c.Certificates = []tls.Certificate{*cert}
		}
		return c
	}
	handshake := func(cert *tls.Certificate) error {
		d := &tls.Dialer{Config: tlsConf(cert), NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
		c, err := d.DialContext(e.Ctx, "tcp", hbone)
		if err != nil {
			return err
		}
		defer c.Close()
		// TLS 1.3: a refused client certificate shows on the first read.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		return err
	}
	t.Run("ForeignTrustDomainAndNoCertificateRefusedAtHandshake", func(t *testing.T) {
		foreign := mint(t, ca, caKey, "spiffe://evil.example/ns/"+appNS+"/sa/client")
		if err := handshake(&foreign); err == nil || !strings.Contains(err.Error(), "tls") {
			t.Errorf("peer from trust domain evil.example: %v, want a TLS refusal", err)
		}
		if err := handshake(nil); err == nil || !strings.Contains(err.Error(), "tls") {
			t.Errorf("peer without a certificate: %v, want a TLS refusal", err)
		}
		served("after the refused handshakes")
	})
	t.Run("MalformedCONNECTAndUnknownTargets", func(t *testing.T) {
		good := mint(t, ca, caKey, meshharness.Spiffe(appNS, "client"))
		// x/net's own HTTP/2 transport sends the raw CONNECT and GET
		// requests this test needs over the test's TLS connection.
		tr := &http2.Transport{DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			d := &tls.Dialer{Config: tlsConf(&good)}
			return d.DialContext(ctx, network, hbone)
		}}
		defer tr.CloseIdleConnections()
		do := func(method, authority string) int {
			ctx, cancel := context.WithTimeout(e.Ctx, 10*time.Second)
			defer cancel()
			req := &http.Request{Method: method, URL: &url.URL{Scheme: "https", Host: authority, Path: "/"}, Host: authority,
				Header: http.Header{}, Body: http.NoBody}
			if method == http.MethodConnect {
				req.URL.Path = ""
			}
			req = req.WithContext(ctx)
			resp, err := tr.RoundTrip(req)
			if err != nil {
				t.Errorf("%s %s: %v", method, authority, err)
				return 0
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		for _, tc := range []struct {
			method, authority string
			want              int
		}{
			{http.MethodConnect, "not-an-address", http.StatusBadRequest},
			{http.MethodGet, hostPort(a.echo1.Status.PodIP, 8080), http.StatusBadRequest},
			{http.MethodConnect, hostPort(a.echo0.Status.PodIP, 8080), http.StatusBadRequest}, // not this pod
			{http.MethodConnect, hostPort(a.echo1.Status.PodIP, 1), http.StatusServiceUnavailable},
			{http.MethodConnect, hostPort(a.echo1.Status.PodIP, 8080), http.StatusOK},
		} {
			if got := do(tc.method, tc.authority); got != tc.want {
				t.Errorf("%s %s: %d, want %d", tc.method, tc.authority, got, tc.want)
			}
		}
		served("after the malformed requests")
	})
	t.Run("AbandonedHandshakesTimeOutOthersServed", func(t *testing.T) {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for i := range 60 {
			c, err := net.DialTimeout("tcp", hbone, 5*time.Second)
			if err != nil {
				t.Fatalf("open abandoned connection %d: %v", i, err)
			}
			if i%2 == 1 {
				c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // a ClientHello that never ends
			}
			conns = append(conns, c)
		}
		served("with 60 abandoned handshakes open")
		// ztunnel closes them once its handshake timeout passes.
		deadline := time.Now().Add(20 * time.Second)
		for i, c := range conns {
			c.SetReadDeadline(deadline)
			if _, err := io.Copy(io.Discard, c); err != nil && os.IsTimeout(err) {
				t.Fatalf("abandoned connection %d still open after 20 s", i)
			}
		}
		served("after the abandoned handshakes")
	})
	// ztunnel on node-1 never restarted.
	for _, p := range e.ZtunnelPods(t) {
		for _, cs := range p.Status.ContainerStatuses {
			if cs.RestartCount != 0 {
				t.Errorf("ztunnel %s restarted %d times", p.Name, cs.RestartCount)
			}
		}
	}
}

// deployApp creates the enrolled namespaces: in appNS echo-0 on node0,
// echo-1 on node1 behind Service echo, a client on node0; in otherNS a
// client "other" on node0 and echo-q on node1. They are removed when the
// test ends, before the mesh.
func (e *env) deployApp(t *testing.T, node0, node1 string) {
	t.Helper()
	e.Deploy(t, []string{
		meshharness.Namespace(appNS, true),
		meshharness.Namespace(otherNS, true),
		meshharness.ServiceAccount(appNS, "echo"),
		meshharness.ServiceAccount(appNS, "client"),
		meshharness.EchoService(appNS, "echo"),
	}, []string{
		meshharness.EchoPod(appNS, "echo-0", node0, "echo", "echo"),
		meshharness.EchoPod(appNS, "echo-1", node1, "echo", "echo"),
		meshharness.EchoPod(appNS, "client", node0, "client", "client"),
		meshharness.EchoPod(otherNS, "other", node0, "default", "other"),
		// Untouched until the auto-mode test: no remembered transport.
		meshharness.EchoPod(otherNS, "echo-q", node1, "default", "echoq"),
	})
}
