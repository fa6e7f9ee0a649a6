package kubelet

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func TestProbeTracker_Thresholds(t *testing.T) {
	type step struct {
		ok                    bool
		result, changed, kill bool
	}
	cases := []struct {
		name  string
		kind  probeKind
		probe v1.Probe
		steps []step
	}{
		{
			name:  "readiness needs successThreshold successes, failureThreshold failures",
			kind:  readinessProbe,
			probe: v1.Probe{SuccessThreshold: 2, FailureThreshold: 2},
			steps: []step{
				{ok: true, result: false},
				{ok: true, result: true, changed: true},
				{ok: false, result: true},
				{ok: true, result: true}, // a success resets the failure count
				{ok: false, result: true},
				{ok: false, result: false, changed: true},
				{ok: true, result: false}, // one success is not enough again
				{ok: true, result: true, changed: true},
			},
		},
		{
			name:  "liveness kills at failureThreshold and counts afresh",
			kind:  livenessProbe,
			probe: v1.Probe{FailureThreshold: 3},
			steps: []step{
				{ok: false, result: true},
				{ok: false, result: true},
				{ok: false, result: true, kill: true},
				{ok: false, result: true},
				{ok: false, result: true},
				{ok: false, result: true, kill: true},
			},
		},
		{
			name:  "startup: started at first success, never killed after",
			kind:  startupProbe,
			probe: v1.Probe{FailureThreshold: 2},
			steps: []step{
				{ok: false, result: false},
				{ok: true, result: true, changed: true},
				{ok: false, result: true},
				{ok: false, result: true},
			},
		},
		{
			name:  "startup killed when it never succeeds",
			kind:  startupProbe,
			probe: v1.Probe{FailureThreshold: 2},
			steps: []step{{ok: false}, {ok: false, kill: true}},
		},
		{
			name:  "defaults: failure threshold 3",
			kind:  readinessProbe,
			probe: v1.Probe{},
			steps: []step{
				{ok: true, result: true, changed: true},
				{ok: false, result: true}, {ok: false, result: true},
				{ok: false, result: false, changed: true},
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr := newProbeTracker(tc.kind, &tc.probe)
			for i, s := range tc.steps {
				v := tr.observe(s.ok)
				if v.result != s.result || v.changed != s.changed || v.kill != s.kill {
					t.Fatalf("step %d (ok=%v): got %+v, want result=%v changed=%v kill=%v", i, s.ok, v, s.result, s.changed, s.kill)
				}
			}
		})
	}
}

func TestResolvePort(t *testing.T) {
	ports := []v1.ContainerPort{{Name: "http", ContainerPort: 8080}}
	if p, err := resolvePort(intstr.FromString("http"), ports); err != nil || p != 8080 {
		t.Fatalf("named: %d %v", p, err)
	}
	if p, err := resolvePort(intstr.FromInt32(9090), ports); err != nil || p != 9090 {
		t.Fatalf("number: %d %v", p, err)
	}
	if _, err := resolvePort(intstr.FromString("grpc"), ports); err == nil {
		t.Fatal("unknown name must fail")
	}
	if _, err := resolvePort(intstr.FromInt32(70000), ports); err == nil {
		t.Fatal("out of range must fail")
	}
}

func TestRunProbe_HTTPTCPExec(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			if r.Header.Get("X-Probe") != "yes" || r.Host != "probe.example" || !strings.HasPrefix(r.UserAgent(), "kube-probe/") {
				http.Error(w, "bad headers", 400)
				return
			}
			w.WriteHeader(204)
		case "/redirect":
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		default:
			http.Error(w, "nope", http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	host, portS, _ := net.SplitHostPort(srv.Listener.Addr().String())
	port, _ := strconv.Atoi(portS)
	target := probeTarget{
		host:  host,
		ports: []v1.ContainerPort{{Name: "web", ContainerPort: int32(port)}},
		exec: func(_ context.Context, cmd []string) (int, []byte, error) {
			if cmd[0] == "true" {
				return 0, nil, nil
			}
			return 1, []byte("failed"), nil
		},
	}
	httpProbe := func(path string) *v1.Probe {
		return &v1.Probe{ProbeHandler: v1.ProbeHandler{HTTPGet: &v1.HTTPGetAction{
			Path: path, Port: intstr.FromString("web"),
			HTTPHeaders: []v1.HTTPHeader{{Name: "X-Probe", Value: "yes"}, {Name: "Host", Value: "probe.example"}},
		}}}
	}
	ctx := context.Background()
	if ok, msg := runProbe(ctx, httpProbe("/ok"), target); !ok {
		t.Errorf("http 204: %s", msg)
	}
	if ok, _ := runProbe(ctx, httpProbe("/redirect"), target); !ok {
		t.Error("a redirect counts as success (< 400)")
	}
	if ok, msg := runProbe(ctx, httpProbe("/fail"), target); ok || !strings.Contains(msg, "503") {
		t.Errorf("http 503 must fail with the code in the message: %v %q", ok, msg)
	}
	tcp := &v1.Probe{ProbeHandler: v1.ProbeHandler{TCPSocket: &v1.TCPSocketAction{Port: intstr.FromInt32(int32(port))}}}
	if ok, msg := runProbe(ctx, tcp, target); !ok {
		t.Errorf("tcp open port: %s", msg)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closedPort := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	tcp.TCPSocket.Port = intstr.FromInt32(int32(closedPort))
	if ok, _ := runProbe(ctx, tcp, target); ok {
		t.Error("tcp closed port must fail")
	}
	exe := &v1.Probe{ProbeHandler: v1.ProbeHandler{Exec: &v1.ExecAction{Command: []string{"true"}}}}
	if ok, _ := runProbe(ctx, exe, target); !ok {
		t.Error("exec exit 0 must succeed")
	}
	exe.Exec.Command = []string{"false"}
	if ok, msg := runProbe(ctx, exe, target); ok || !strings.Contains(msg, "exit code 1") {
		t.Errorf("exec exit 1: %v %q", ok, msg)
	}
	if ok, _ := runProbe(ctx, &v1.Probe{}, target); ok {
		t.Error("a probe without handler fails")
	}
}
