package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/certs"
	"github.com/meshlite/meshlite/ztunnel/proxy"
	"github.com/meshlite/meshlite/ztunnel/state"
)

func testStore(t *testing.T) *state.Store {
	t.Helper()
	s := state.New(nil)
	ip := func(a string) []byte { return netip.MustParseAddr(a).AsSlice() }
	wp := &workload.GatewayAddress{Destination: &workload.GatewayAddress_Hostname{Hostname: &workload.NamespacedHostname{Namespace: "default", Hostname: "waypoint.default.svc.cluster.local"}}}
	err := s.ApplyAddresses([]state.NamedAddress{
		{Name: "uid-a", Address: &workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{
			Uid: "uid-a", Name: "sleep-1", Namespace: "default", ServiceAccount: "sleep", Addresses: [][]byte{ip("10.0.1.5")},
			TunnelProtocol: workload.TunnelProtocol_HBONE, Node: "node-1", Waypoint: wp,
			Services: map[string]*workload.PortList{"default/web.default.svc.cluster.local": {}}}}}},
		{Name: "uid-b", Address: &workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{
			Uid: "uid-b", Name: "legacy", Namespace: "other", Addresses: [][]byte{ip("10.0.2.7")}}}}},
		{Name: "default/web.default.svc.cluster.local", Address: &workload.Address{Type: &workload.Address_Service{Service: &workload.Service{
			Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: []*workload.Port{{ServicePort: 80, TargetPort: 8080}}}}}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.ApplyAuthorizations([]*security.Authorization{{Name: "deny-9090", Namespace: "default", Scope: security.Scope_NAMESPACE,
		Action: security.Action_DENY, Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{DestinationPorts: []uint32{9090}}}}}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	return s
}

type fixture struct {
	srv      *Server
	level    *slog.LevelVar
	mu       sync.Mutex
	notReady error
}

func (f *fixture) setReady(err error) { f.mu.Lock(); f.notReady = err; f.mu.Unlock() }

func start(t *testing.T) *fixture {
	t.Helper()
	store := testStore(t)
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "x"})
	reg.MustRegister(c)
	c.Add(3)
	f := &fixture{level: new(slog.LevelVar), notReady: errors.New("no certificate for spiffe://cluster.local/ns/default/sa/sleep yet")}
	notAfter := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	srv, err := New(Config{
		AdminAddr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0", ReadyAddr: "127.0.0.1:0",
		Snapshot:  store.Snapshot,
		LocalPods: func() []string { return []string{"uid-a"} },
		Certificates: func() []certs.Status {
			return []certs.Status{{Identity: "spiffe://cluster.local/ns/default/sa/sleep", Pods: []string{"uid-a"}, State: "valid", NotAfter: notAfter}}
		},
		Connections: func() []proxy.ConnInfo {
			return []proxy.ConnInfo{{ID: 1, Direction: "outbound", Src: "10.0.1.5:4000", Dst: "10.0.2.7:80", Security: proxy.SecurityPlaintext, Transport: "tcp"}}
		},
		Ready:    func() error { f.mu.Lock(); defer f.mu.Unlock(); return f.notReady },
		Gatherer: reg, LogLevel: f.level,
	})
	if err != nil {
		t.Fatal(err)
	}
	f.srv = srv
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return f
}

func get(t *testing.T, method, url string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (f *fixture) url(name, path string) string { return "http://" + f.srv.Addr(name).String() + path }

func TestConfigDump_ShowsStateCertificatesAndConnections(t *testing.T) {
	f := start(t)
	code, body := get(t, "GET", f.url("admin", "/config_dump"))
	if code != 200 {
		t.Fatalf("status %d: %s", code, body)
	}
	var d ConfigDump
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, body)
	}
	if len(d.Workloads) != 2 {
		t.Fatalf("workloads %+v", d.Workloads)
	}
	a, b := d.Workloads[0], d.Workloads[1]
	if a.UID != "uid-a" || a.Addresses[0] != "10.0.1.5" || a.Protocol != "HBONE" || !a.Local || a.Node != "node-1" ||
		a.Waypoint != "default/waypoint.default.svc.cluster.local:15008" || a.ServiceAccount != "sleep" || a.Status != "HEALTHY" {
		t.Errorf("workload a %+v", a)
	}
	if b.Protocol != "TCP" || b.Local || b.ServiceAccount != "default" {
		t.Errorf("workload b %+v", b)
	}
	if len(d.Services) != 1 || d.Services[0].Addresses[0] != "10.96.0.10" || d.Services[0].Ports[0] != "80->8080" {
		t.Errorf("services %+v", d.Services)
	}
	if len(d.Policies) != 1 || d.Policies[0].Key != "default/deny-9090" || d.Policies[0].Action != "DENY" || !strings.Contains(string(d.Policies[0].Spec), "9090") {
		t.Errorf("policies %+v", d.Policies)
	}
	if len(d.Certificates) != 1 || d.Certificates[0].State != "valid" || d.Certificates[0].NotAfter.Year() != 2030 {
		t.Errorf("certificates %+v", d.Certificates)
	}
	if len(d.Connections) != 1 || d.Connections[0].Security != "plaintext" {
		t.Errorf("connections %+v", d.Connections)
	}
	code, body = get(t, "GET", f.url("admin", "/debug/connections"))
	if code != 200 || !strings.Contains(body, `"dst": "10.0.2.7:80"`) {
		t.Errorf("/debug/connections %d %s", code, body)
	}
}

func TestReady_503WithReasonUntilReady(t *testing.T) {
	f := start(t)
	code, body := get(t, "GET", f.url("ready", "/healthz/ready"))
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "no certificate for spiffe://cluster.local/ns/default/sa/sleep") {
		t.Errorf("not ready: %d %q", code, body)
	}
	f.setReady(nil)
	if code, body := get(t, "GET", f.url("ready", "/healthz/ready")); code != 200 {
		t.Errorf("ready: %d %q", code, body)
	}
	// The readiness port serves nothing else.
	if code, _ := get(t, "GET", f.url("ready", "/config_dump")); code != http.StatusNotFound {
		t.Errorf("config dump on the readiness port: %d", code)
	}
}

func TestMetrics_ServedInPrometheusFormat(t *testing.T) {
	f := start(t)
	for _, p := range []string{"/metrics", "/stats/prometheus"} {
		code, body := get(t, "GET", f.url("metrics", p))
		if code != 200 || !strings.Contains(body, "istio_tcp_connections_opened_total 3") {
			t.Errorf("%s: %d %s", p, code, body)
		}
	}
}

func TestLogging_ChangesLevelOnPostOnly(t *testing.T) {
	f := start(t)
	if code, body := get(t, "GET", f.url("admin", "/logging")); code != 200 || !strings.Contains(body, "INFO") {
		t.Errorf("GET: %d %s", code, body)
	}
	if code, _ := get(t, "POST", f.url("admin", "/logging?level=debug")); code != 200 || f.level.Level() != slog.LevelDebug {
		t.Errorf("POST debug: %d, level %s", code, f.level.Level())
	}
	if code, _ := get(t, "POST", f.url("admin", "/logging?level=loud")); code != http.StatusBadRequest || f.level.Level() != slog.LevelDebug {
		t.Errorf("bad level: %d, level %s", code, f.level.Level())
	}
	if code, _ := get(t, "PUT", f.url("admin", "/logging?level=error")); code != http.StatusMethodNotAllowed {
		t.Errorf("PUT: %d", code)
	}
	if code, _ := get(t, "GET", f.url("admin", "/debug/pprof/")); code != 200 {
		t.Errorf("pprof: %d", code)
	}
}

func TestNew_BusyPortIsAnError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f := start(t)
	cfg := f.srv.cfg
	cfg.AdminAddr, cfg.MetricsAddr, cfg.ReadyAddr = "127.0.0.1:0", ln.Addr().String(), ""
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "metrics") {
		t.Errorf("busy port: %v", err)
	}
	if !strings.HasPrefix(DefaultAdminAddr, "127.0.0.1:") {
		t.Error("the admin interface must listen on localhost only")
	}
}
