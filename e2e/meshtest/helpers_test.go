package meshtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/echo"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/nsenter"
)

// env is the sandbox with the mesh installed, as the tests see it.
type env struct {
	sb       *sandbox.Sandbox
	ctx      context.Context
	repo     string
	objs     *objects
	istiodIP string
	// mesh is the installed mesh (installMesh's, or one it reused).
	mesh *meshinstall.Mesh
	// ztunnel is the ztunnel pod of each node, by node name.
	ztunnel map[string]string
}

// pod returns pod ns/name as it is now.
func (e *env) pod(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	p, err := e.sb.Client().CoreV1().Pods(ns).Get(e.ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod %s/%s: %v", ns, name, err)
	}
	return p
}

// echoPod is a bin/echo server pinned to a node, with the downward-API env
// it reports itself with and a readiness probe on its HTTP port (which
// reaches an enrolled pod through the CNI's probe SNAT exemption).
func echoPod(ns, name, node, sa, app string) string {
	return fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata:
  name: %[2]s
  namespace: %[1]s
  labels: {app: %[5]s}
spec:
  nodeName: %[3]s
  serviceAccountName: %[4]s
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "9090", --grpc-ports, ""]
    env:
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
      periodSeconds: 1
`, ns, name, node, sa, app)
}

// httpGet sends GET url from inside pod ns/name's network namespace on a
// new connection and returns the status and the echo server's answer.
func (e *env) httpGet(ns, name, url string) (int, echo.Fields, error) {
	tr := &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return e.sb.Dial(ctx, ns, name, addr)
		},
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, fmt.Errorf("read answer of %s: %w", url, err)
	}
	return resp.StatusCode, echo.ParseFields(string(body)), nil
}

// mustGet is httpGet that fails the test unless the answer is 200.
func (e *env) mustGet(t *testing.T, ns, name, url string) echo.Fields {
	t.Helper()
	code, f, err := e.httpGet(ns, name, url)
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET %s from %s/%s: status %d, %v", url, ns, name, code, err)
	}
	return f
}

// eventually polls cond until it holds or timeout passes.
func (e *env) eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if err := e.sb.WaitFor(e.ctx, timeout, what, func(context.Context) (bool, error) { return cond(), nil }); err != nil {
		t.Fatal(err)
	}
}

// echoConn is a raw TCP connection to an echo server's 9090 that says
// whether what it sends comes back.
type echoConn struct{ net.Conn }

func (c echoConn) roundTrip(msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	line, err := bufio.NewReader(io.LimitReader(c, int64(len(msg)+1))).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if strings.TrimSuffix(line, "\n") != msg {
		return fmt.Errorf("echoed %q, sent %q", line, msg)
	}
	return nil
}

// dialEcho opens a raw TCP connection from pod ns/name to addr.
func (e *env) dialEcho(t *testing.T, ns, name, addr string) echoConn {
	t.Helper()
	c, err := e.sb.Dial(e.ctx, ns, name, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return echoConn{c}
}

// connInfo is an entry of ztunnel's connection table
// (127.0.0.1:15000/debug/connections), as meshctl will read it.
type connInfo struct {
	Direction   string `json:"direction"`
	Pod         string `json:"pod"`
	Src         string `json:"src"`
	Dst         string `json:"dst"`
	SrcIdentity string `json:"src_identity"`
	DstIdentity string `json:"dst_identity"`
	SrcWorkload string `json:"src_workload"`
	DstWorkload string `json:"dst_workload"`
	Security    string `json:"security"`
	Transport   string `json:"transport"`
	Route       string `json:"route"`
}

func (c connInfo) String() string {
	return fmt.Sprintf("%s %s -> %s (%s -> %s) security=%s transport=%s", c.Direction, c.Src, c.Dst, c.SrcIdentity, c.DstIdentity, c.Security, c.Transport)
}

// admin GETs path from the ztunnel admin endpoint of node i, which listens
// on 127.0.0.1:15000 inside the node's network namespace.
func (e *env) admin(t *testing.T, node int, path string) []byte {
	t.Helper()
	nsPath := netlab.NetnsPath(e.sb.Plan.NodeNetns(node))
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
	ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:15000"+path, nil)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("ztunnel admin %s on node %d: %v", path, node, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("ztunnel admin %s on node %d: %d %v %s", path, node, resp.StatusCode, err, b)
	}
	return b
}

// connections is node i's ztunnel connection table.
func (e *env) connections(t *testing.T, node int) []connInfo {
	t.Helper()
	var out []connInfo
	if err := json.Unmarshal(e.admin(t, node, "/debug/connections"), &out); err != nil {
		t.Fatalf("decode the connection table of node %d: %v", node, err)
	}
	return out
}

// findConn waits until node i's connection table has an entry match
// accepts, and returns it.
func (e *env) findConn(t *testing.T, node int, what string, match func(connInfo) bool) connInfo {
	t.Helper()
	var got connInfo
	var table []connInfo
	err := e.sb.WaitFor(e.ctx, 5*time.Second, what, func(context.Context) (bool, error) {
		table = e.connections(t, node)
		for _, c := range table {
			if match(c) {
				got = c
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		var b strings.Builder
		for _, c := range table {
			fmt.Fprintf(&b, "\n  %s", c)
		}
		t.Fatalf("%v; node %d's ztunnel shows:%s", err, node, b.String())
	}
	return got
}

// ztunnelLog is the log of the ztunnel on node, one decoded JSON object a
// line (ztunnel logs JSON).
func (e *env) ztunnelLog(t *testing.T, node string) []map[string]any {
	t.Helper()
	name := e.ztunnel[node]
	if name == "" {
		t.Fatalf("no ztunnel on %s", node)
	}
	var buf bytes.Buffer
	if err := e.sb.Logs(e.ctx, systemNS, name, "istio-proxy", false, &buf); err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, l := range strings.Split(buf.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// findLog waits until the ztunnel on node has logged a line match accepts.
func (e *env) findLog(t *testing.T, node, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	var got map[string]any
	var last []map[string]any
	err := e.sb.WaitFor(e.ctx, 5*time.Second, what, func(context.Context) (bool, error) {
		last = e.ztunnelLog(t, node)
		for _, l := range last {
			if match(l) {
				got = l
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		var b strings.Builder
		for _, l := range last[max(0, len(last)-15):] {
			j, _ := json.Marshal(l)
			fmt.Fprintf(&b, "\n  %s", j)
		}
		t.Fatalf("%v; the last lines of ztunnel on %s:%s", err, node, b.String())
	}
	return got
}

func str(m map[string]any, k string) string {
	v, ok := m[k]
	if !ok {
		return ""
	}
	if s, ok := v.(string); ok {
		return s
	}
	return fmt.Sprint(v)
}

// wireProbe counts, on every node's forwarding path (the traffic between a
// node's pods and the underlay), the packets that carry a marker in clear
// and the packets to a destination's app and HBONE ports. Packet counters
// of iptables rules in a chain of the mangle table: no capture needed.
type wireProbe struct {
	e     *env
	chain string
	rules []string // one per counter, in chain order
	names []string
}

var counterLine = regexp.MustCompile(`^\s*(\d+)\s+\d+\s`)

// newWireProbe installs the counters on every node; they go when the test
// ends.
func (e *env) newWireProbe(t *testing.T, marker, dstIP string, ports map[string]int) *wireProbe {
	t.Helper()
	p := &wireProbe{e: e, chain: "MESHTEST-WIRE"}
	p.names = append(p.names, "marker")
	p.rules = append(p.rules, "-m string --string "+marker+" --algo bm")
	for name, port := range ports {
		p.names = append(p.names, name)
		p.rules = append(p.rules, fmt.Sprintf("-d %s/32 -p tcp --dport %d", dstIP, port))
	}
	for i := 0; i < e.sb.Plan.Nodes; i++ {
		ns := netlab.NetnsPath(e.sb.Plan.NodeNetns(i))
		p.cleanup(i) // a previous run's, if any
		cmds := [][]string{{"-N", p.chain}}
		for _, r := range p.rules {
			cmds = append(cmds, append([]string{"-A", p.chain}, strings.Fields(r)...))
		}
		cmds = append(cmds, []string{"-I", "FORWARD", "-j", p.chain})
		for _, c := range cmds {
			if err := netlab.Run(ns, "iptables", append([]string{"-w", "-t", "mangle"}, c...)...); err != nil {
				t.Fatalf("wire probe on node %d: %v", i, err)
			}
		}
		t.Cleanup(func() { p.cleanup(i) })
	}
	return p
}

func (p *wireProbe) cleanup(i int) {
	ns := netlab.NetnsPath(p.e.sb.Plan.NodeNetns(i))
	netlab.Run(ns, "iptables", "-w", "-t", "mangle", "-D", "FORWARD", "-j", p.chain)
	netlab.Run(ns, "iptables", "-w", "-t", "mangle", "-F", p.chain)
	netlab.Run(ns, "iptables", "-w", "-t", "mangle", "-X", p.chain)
}

// counts sums each counter over the nodes.
func (p *wireProbe) counts(t *testing.T) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i := 0; i < p.e.sb.Plan.Nodes; i++ {
		var b []byte
		err := nsenter.DoPath(netlab.NetnsPath(p.e.sb.Plan.NodeNetns(i)), func() error {
			var err error
			b, err = runOutput("iptables", "-w", "-t", "mangle", "-L", p.chain, "-v", "-n", "-x")
			return err
		})
		if err != nil {
			t.Fatalf("read wire probe on node %d: %v: %s", i, err, b)
		}
		var n int
		for _, l := range strings.Split(string(b), "\n") {
			m := counterLine.FindStringSubmatch(l)
			if m == nil {
				continue
			}
			if n < len(p.names) {
				v, _ := strconv.Atoi(m[1])
				out[p.names[n]] += v
			}
			n++
		}
		if n != len(p.names) {
			t.Fatalf("wire probe on node %d: %d counters, want %d:\n%s", i, n, len(p.names), b)
		}
	}
	return out
}
