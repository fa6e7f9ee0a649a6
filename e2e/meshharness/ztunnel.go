package meshharness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/netlab"
)

// ConnInfo is an entry of ztunnel's connection table
// (127.0.0.1:15000/debug/connections), as meshctl reads it.
type ConnInfo struct {
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

func (c ConnInfo) String() string {
	return fmt.Sprintf("%s %s -> %s (%s -> %s) security=%s transport=%s", c.Direction, c.Src, c.Dst, c.SrcIdentity, c.DstIdentity, c.Security, c.Transport)
}

// Admin GETs path from the ztunnel admin endpoint of node i, which listens
// on 127.0.0.1:15000 inside the node's network namespace, and fails the
// test unless the answer is 200.
func (e *Env) Admin(t testing.TB, node int, path string) []byte {
	t.Helper()
	d := NetnsDialer{path: netlab.NetnsPath(e.Sandbox.Plan.NodeNetns(node))}
	code, b, err := get(e.Ctx, d.Dial, "http://127.0.0.1:15000"+path, 5*time.Second)
	if err != nil && code == 0 {
		t.Fatalf("ztunnel admin %s on node %d: %v", path, node, err)
	}
	if err != nil || code != http.StatusOK {
		t.Fatalf("ztunnel admin %s on node %d: %d %v %s", path, node, code, err, b)
	}
	return b
}

// Connections is node i's ztunnel connection table.
func (e *Env) Connections(t testing.TB, node int) []ConnInfo {
	t.Helper()
	var out []ConnInfo
	if err := json.Unmarshal(e.Admin(t, node, "/debug/connections"), &out); err != nil {
		t.Fatalf("decode the connection table of node %d: %v", node, err)
	}
	return out
}

// FindConn waits up to 5 s until node i's connection table has an entry
// match accepts, and returns it; it fails the test with the table it saw
// last otherwise.
func (e *Env) FindConn(t testing.TB, node int, what string, match func(ConnInfo) bool) ConnInfo {
	t.Helper()
	got, table, err := find(e, what, func() []ConnInfo { return e.Connections(t, node) }, match)
	if err != nil {
		var b strings.Builder
		for _, c := range table {
			fmt.Fprintf(&b, "\n  %s", c)
		}
		t.Fatalf("%v; node %d's ztunnel shows:%s", err, node, b.String())
	}
	return got
}

// find polls fetch for up to 5 s until it returns an item match accepts,
// and returns that item, or the items fetch returned last and the error.
func find[T any](e *Env, what string, fetch func() []T, match func(T) bool) (T, []T, error) {
	var got T
	var last []T
	err := e.Sandbox.WaitFor(e.Ctx, 5*time.Second, what, func(context.Context) (bool, error) {
		last = fetch()
		for _, x := range last {
			if match(x) {
				got = x
				return true, nil
			}
		}
		return false, nil
	})
	return got, last, err
}

// LogLine is one line of ztunnel's log (ztunnel logs JSON), decoded.
type LogLine map[string]any

// Get is field k as a string ("" when the line has no such field).
func (l LogLine) Get(k string) string {
	v, ok := l[k]
	if !ok {
		return ""
	}
	if s, ok := v.(string); ok {
		return s
	}
	return fmt.Sprint(v)
}

// ZtunnelLog is the log of the ztunnel on node (a node name, see
// Env.Ztunnel), its lines that decode as JSON.
func (e *Env) ZtunnelLog(t testing.TB, node string) []LogLine {
	t.Helper()
	name := e.Ztunnel[node]
	if name == "" {
		t.Fatalf("no ztunnel on %s", node)
	}
	var buf bytes.Buffer
	if err := e.Sandbox.Logs(e.Ctx, meshinstall.Namespace, name, "istio-proxy", false, &buf); err != nil {
		t.Fatal(err)
	}
	var out []LogLine
	for _, l := range strings.Split(buf.String(), "\n") {
		var m LogLine
		if json.Unmarshal([]byte(l), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// FindLog waits up to 5 s until the ztunnel on node has logged a line
// match accepts, and returns it; it fails the test with the log's last
// lines otherwise.
func (e *Env) FindLog(t testing.TB, node, what string, match func(LogLine) bool) LogLine {
	t.Helper()
	got, last, err := find(e, what, func() []LogLine { return e.ZtunnelLog(t, node) }, match)
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

// ZtunnelPods lists the ztunnel pods, terminating ones included.
func (e *Env) ZtunnelPods(t testing.TB) []corev1.Pod {
	t.Helper()
	l, err := e.Sandbox.Client().CoreV1().Pods(meshinstall.Namespace).List(e.Ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
	if err != nil {
		t.Fatal(err)
	}
	return l.Items
}

// RefreshZtunnels records each node's ztunnel pod in e.Ztunnel, leaving
// out terminating ones (call it after a rollout replaced them).
func (e *Env) RefreshZtunnels(t testing.TB) {
	t.Helper()
	e.Ztunnel = map[string]string{}
	for _, p := range e.ZtunnelPods(t) {
		if p.DeletionTimestamp == nil {
			e.Ztunnel[p.Spec.NodeName] = p.Name
		}
	}
}
