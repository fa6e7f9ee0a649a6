package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/cni/agentapi"
)

const prevResult = `{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:01"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/var/run/netns/x"}],
"ips":[{"interface":1,"address":"10.244.0.7/24","gateway":"10.244.0.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["10.96.0.10"]}}`

func stdin(t *testing.T, sock, timeout string, extra string) []byte {
	t.Helper()
	s := `{"cniVersion":"1.0.0","name":"sandbox","type":"mesh-cni","agent_socket":"` + sock + `"`
	if timeout != "" {
		s += `,"add_timeout":"` + timeout + `"`
	}
	s += extra + `,"prevResult":` + prevResult + `}`
	return []byte(s)
}

// agent is a stand-in node agent on a real SOCK_SEQPACKET socket: it
// answers with fn and records what it was asked.
type agent struct {
	sock string
	reqs chan *agentapi.Request
	ino  chan uint64
}

func startAgent(t *testing.T, fn func(*agentapi.Request) *agentapi.Response) *agent {
	t.Helper()
	a := &agent{sock: filepath.Join(t.TempDir(), "agent.sock"), reqs: make(chan *agentapi.Request, 10), ino: make(chan uint64, 10)}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: a.sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			req, ns, err := agentapi.ReadRequest(c, time.Second)
			if err != nil {
				agentapi.WriteResponse(c, &agentapi.Response{Error: err.Error()})
				c.Close()
				continue
			}
			if ns != nil {
				var st unix.Stat_t
				unix.Fstat(int(ns.Fd()), &st)
				a.ino <- st.Ino
				ns.Close()
			}
			a.reqs <- req
			agentapi.WriteResponse(c, fn(req))
			c.Close()
		}
	}()
	return a
}

func newTestPlugin(call caller) (*Plugin, *bytes.Buffer) {
	var out bytes.Buffer
	return &Plugin{call: call, log: slog.New(slog.DiscardHandler), stdout: &out}, &out
}

func args(in []byte) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: "c1", Netns: "/proc/self/ns/net", IfName: "eth0",
		Args:      "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=uid-1",
		StdinData: in,
	}
}

func sameJSON(t *testing.T, got []byte, want string) {
	t.Helper()
	var a, b any
	if err := json.Unmarshal(got, &a); err != nil {
		t.Fatalf("result is not JSON: %v: %s", err, got)
	}
	json.Unmarshal([]byte(want), &b)
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	if string(ja) != string(jb) {
		t.Errorf("result changed:\n got %s\nwant %s", ja, jb)
	}
}

func cniCode(t *testing.T, err error) uint {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v is not a CNI error", err)
	}
	return e.Code
}

func TestAdd_PassesPrevResultThroughForHeldAndNotEnrolled(t *testing.T) {
	for _, state := range []string{agentapi.StateHeld, agentapi.StateNotEnrolled} {
		a := startAgent(t, func(*agentapi.Request) *agentapi.Response { return &agentapi.Response{State: state} })
		p, out := newTestPlugin(agentapi.Call)
		if err := p.Add(args(stdin(t, a.sock, "", ""))); err != nil {
			t.Fatalf("%s: %v", state, err)
		}
		sameJSON(t, out.Bytes(), prevResult)
		req := <-a.reqs
		if req.Command != agentapi.CmdAdd || req.PodNamespace != "shop" || req.PodName != "cart-1" || req.PodUID != "uid-1" ||
			len(req.IPs) != 1 || req.IPs[0] != "10.244.0.7" || req.TimeoutMillis != 30000 {
			t.Errorf("%s: agent was asked %+v", state, req)
		}
		self, _ := os.Open("/proc/self/ns/net")
		var st unix.Stat_t
		unix.Fstat(int(self.Fd()), &st)
		self.Close()
		if got := <-a.ino; got != st.Ino {
			t.Errorf("agent got netns inode %d, want %d", got, st.Ino)
		}
	}
}

func TestAdd_PendingFailsClosedWithRetryableError(t *testing.T) {
	a := startAgent(t, func(*agentapi.Request) *agentapi.Response { return &agentapi.Response{State: agentapi.StatePending} })
	p, out := newTestPlugin(agentapi.Call)
	err := p.Add(args(stdin(t, a.sock, "2s", "")))
	if err == nil {
		t.Fatal("ADD succeeded for a pod ztunnel does not hold")
	}
	if cniCode(t, err) != types.ErrTryAgainLater || !strings.Contains(err.Error(), "not starting it uncaptured") ||
		!strings.Contains(err.Error(), "shop/cart-1") {
		t.Errorf("error %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("a failed ADD printed a result: %s", out.Bytes())
	}
	if req := <-a.reqs; req.TimeoutMillis != 2000 {
		t.Errorf("timeout passed to the agent: %dms", req.TimeoutMillis)
	}
}

func TestAdd_AgentErrorIsCNIError(t *testing.T) {
	a := startAgent(t, func(*agentapi.Request) *agentapi.Response { return &agentapi.Response{Error: "iptables-restore: boom"} })
	p, _ := newTestPlugin(agentapi.Call)
	err := p.Add(args(stdin(t, a.sock, "", "")))
	if err == nil || !strings.Contains(err.Error(), "iptables-restore: boom") {
		t.Fatalf("err = %v", err)
	}
}

func TestAdd_UnreachableAgentFailsClosedAtOnce(t *testing.T) {
	p, out := newTestPlugin(agentapi.Call)
	start := time.Now()
	err := p.Add(args(stdin(t, filepath.Join(t.TempDir(), "gone.sock"), "", "")))
	if err == nil || cniCode(t, err) != types.ErrTryAgainLater || !strings.Contains(err.Error(), "cannot reach the meshlite CNI agent") {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("took %v", d)
	}
	if out.Len() != 0 {
		t.Errorf("printed a result: %s", out.Bytes())
	}
}

func TestAdd_ExcludedNamespaceAndNonKubernetesSkipTheAgent(t *testing.T) {
	called := false
	call := func(context.Context, string, *agentapi.Request, *os.File) (*agentapi.Response, error) {
		called = true
		return nil, errors.New("must not be called")
	}
	p, out := newTestPlugin(call)
	if err := p.Add(args(stdin(t, "/x.sock", "", `,"exclude_namespaces":["kube-system","shop"]`))); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, out.Bytes(), prevResult)
	out.Reset()
	if err := p.Add(args(stdin(t, "/x.sock", "", `,"capture_namespaces":["payments"]`))); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, out.Bytes(), prevResult)
	out.Reset()
	a := args(stdin(t, "/x.sock", "", ""))
	a.Args = ""
	if err := p.Add(a); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, out.Bytes(), prevResult)
	if called {
		t.Error("agent was called")
	}
}

func TestAdd_BadNetnsIsClearError(t *testing.T) {
	p, _ := newTestPlugin(agentapi.Call)
	a := args(stdin(t, "/x.sock", "", ""))
	a.Netns = "/nonexistent/netns"
	if err := p.Add(a); err == nil || cniCode(t, err) != types.ErrInvalidNetNS {
		t.Fatalf("err = %v", err)
	}
}

func TestDel_NeverFailsOnUnreachableAgent(t *testing.T) {
	p, _ := newTestPlugin(agentapi.Call)
	a := args(stdin(t, filepath.Join(t.TempDir(), "gone.sock"), "", ""))
	a.Netns = ""
	if err := p.Del(a); err != nil {
		t.Fatal(err)
	}
	ag := startAgent(t, func(*agentapi.Request) *agentapi.Response { return &agentapi.Response{State: agentapi.StateRemoved} })
	a.StdinData = stdin(t, ag.sock, "", "")
	if err := p.Del(a); err != nil {
		t.Fatal(err)
	}
	if r := <-ag.reqs; r.Command != agentapi.CmdDel || r.PodUID != "uid-1" {
		t.Errorf("agent was asked %+v", r)
	}
}

func TestCheck_And_Status(t *testing.T) {
	var state atomic.Value
	state.Store(agentapi.StatePending)
	ag := startAgent(t, func(r *agentapi.Request) *agentapi.Response {
		if r.Command == agentapi.CmdStatus {
			return &agentapi.Response{State: agentapi.StateReady}
		}
		return &agentapi.Response{State: state.Load().(string)}
	})
	p, _ := newTestPlugin(agentapi.Call)
	if err := p.Check(args(stdin(t, ag.sock, "", ""))); err == nil || !strings.Contains(err.Error(), "does not hold it") {
		t.Errorf("CHECK of a pending pod: %v", err)
	}
	state.Store(agentapi.StateHeld)
	if err := p.Check(args(stdin(t, ag.sock, "", ""))); err != nil {
		t.Errorf("CHECK of a held pod: %v", err)
	}
	if err := p.Status(args(stdin(t, ag.sock, "", ""))); err != nil {
		t.Errorf("STATUS: %v", err)
	}
	err := p.Status(args(stdin(t, filepath.Join(t.TempDir(), "gone.sock"), "", "")))
	if err == nil || cniCode(t, err) != ErrPluginNotAvailable {
		t.Errorf("STATUS without agent: %v", err)
	}
}

func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name, in, wantErr string
	}{
		{"minimal", `{"cniVersion":"1.0.0","name":"n","type":"mesh-cni"}`, ""},
		{"no version", `{"name":"n","type":"mesh-cni"}`, "cniVersion is required"},
		{"other type", `{"cniVersion":"1.0.0","type":"bridge"}`, `type "bridge"`},
		{"relative socket", `{"cniVersion":"1.0.0","agent_socket":"run/a.sock"}`, "absolute path"},
		{"bad timeout", `{"cniVersion":"1.0.0","add_timeout":"soon"}`, "add_timeout"},
		{"timeout too short", `{"cniVersion":"1.0.0","add_timeout":"10ms"}`, "out of range"},
		{"bad namespace", `{"cniVersion":"1.0.0","exclude_namespaces":["a/b"]}`, "not a namespace"},
		{"bad capture namespace", `{"cniVersion":"1.0.0","capture_namespaces":[""]}`, "not a namespace"},
		{"not JSON", `{"cniVersion":`, "parse mesh-cni network configuration"},
		{"bad prevResult", `{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"nope"}]}}`, "prevResult"},
		{"prevResult 1.1", `{"cniVersion":"1.1.0","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.2/24"}]}}`, ""},
	} {
		c, err := ParseConfig([]byte(tc.in))
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			} else if c.AgentSocket != DefaultAgentSocket || c.Timeout() != DefaultAddTimeout {
				t.Errorf("%s: defaults not applied: %q %v", tc.name, c.AgentSocket, c.Timeout())
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.wantErr)
		}
	}
}

func TestAdd_InvalidStdinIsInvalidConfigError(t *testing.T) {
	p, _ := newTestPlugin(agentapi.Call)
	a := args([]byte(`{"cniVersion":"1.0.0","add_timeout":"-1s"}`))
	if err := p.Add(a); err == nil || cniCode(t, err) != types.ErrInvalidNetworkConfig {
		t.Fatalf("err = %v", err)
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agent_socket":"/a.sock","add_timeout":"3s","exclude_namespaces":["x"]}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","prevResult":` + prevResult + `}`))
	f.Add([]byte(`{"cniVersion":"0.4.0","prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.1.1/24"}]}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			return
		}
		if c.Timeout() < time.Second || !filepath.IsAbs(c.AgentSocket) {
			t.Fatalf("accepted config with timeout %v socket %q", c.Timeout(), c.AgentSocket)
		}
		_ = c.podIPs()
		p, _ := newTestPlugin(nil)
		p.stdout = io.Discard
		_ = p.passThrough(c)
	})
}
