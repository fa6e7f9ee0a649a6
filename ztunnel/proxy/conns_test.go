package proxy

import (
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlite/meshlite/proto/security"
)

// registry registers the proxy's metrics for a test to read.
func (e *env) registry(t *testing.T) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	m := e.proxy.metrics
	reg.MustRegister(m.opened, m.closed, m.sent, m.received, m.refused, m.active)
	return reg
}

// count sums the series of metric whose labels include all of want.
func count(t *testing.T, reg *prometheus.Registry, metric string, want map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != metric {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue series
				}
			}
			if c := m.GetCounter(); c != nil {
				sum += c.GetValue()
			} else {
				sum += m.GetGauge().GetValue()
			}
		}
	}
	return sum
}

func TestConnections_TableAndIstioMetricsForAnHBONEConnection(t *testing.T) {
	e := newEnv(t, TunnelH2)
	reg := e.registry(t)
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: clientIP.AsSlice()}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", e.outbound.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("twelve bytes")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatalf("echo: %v\n%s", err, e.logs)
	}
	// Both ends of the tunnel are live in the table, with identities and
	// the bytes so far.
	var out, in ConnInfo
	deadline := time.Now().Add(5 * time.Second)
	for {
		conns := e.proxy.Connections()
		out, in = ConnInfo{}, ConnInfo{}
		for _, ci := range conns {
			switch ci.Direction {
			case "outbound":
				out = ci
			case "inbound":
				in = ci
			}
		}
		// Counters move just after the bytes do: wait for all four.
		n := int64(len(msg))
		if out.BytesSent == n && in.BytesSent == n && out.BytesReceived == n && in.BytesReceived == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connections %+v", conns)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if out.Pod != "Kubernetes//Pod/default/sleep" || out.Security != SecurityMTLS || out.Route != "direct" || out.Transport != "h2" ||
		out.DstIdentity != "spiffe://cluster.local/ns/default/sa/httpbin" || out.SrcIdentity != "spiffe://cluster.local/ns/default/sa/sleep" ||
		out.Dst != netip.AddrPortFrom(serverIP, e.appPort).String() || out.BytesReceived != int64(len(msg)) || out.DstWorkload != "default/httpbin" {
		t.Errorf("outbound entry %+v", out)
	}
	if in.Pod != "Kubernetes//Pod/default/httpbin" || in.Security != SecurityMTLS || in.SrcIdentity != "spiffe://cluster.local/ns/default/sa/sleep" ||
		in.SrcWorkload != "default/sleep" || in.BytesReceived != int64(len(msg)) || !strings.HasPrefix(in.Src, clientIP.String()+":") {
		t.Errorf("inbound entry %+v", in)
	}
	src := map[string]string{"reporter": "source", "source_workload": "sleep", "destination_workload": "httpbin",
		"destination_principal": "spiffe://cluster.local/ns/default/sa/httpbin", "connection_security_policy": "mutual_tls"}
	dst := map[string]string{"reporter": "destination", "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
		"destination_workload_namespace": "default", "connection_security_policy": "mutual_tls"}
	for _, l := range []map[string]string{src, dst} {
		if got := count(t, reg, "istio_tcp_connections_opened_total", l); got != 1 {
			t.Errorf("opened %v = %v, want 1", l, got)
		}
		if got := count(t, reg, "istio_tcp_received_bytes_total", l); got != float64(len(msg)) {
			t.Errorf("received bytes %v = %v", l, got)
		}
		if got := count(t, reg, "istio_tcp_sent_bytes_total", l); got != float64(len(msg)) {
			t.Errorf("sent bytes %v = %v", l, got)
		}
	}
	if got := count(t, reg, "meshlite_ztunnel_connections_active", map[string]string{"security": "mutual_tls"}); got != 2 {
		t.Errorf("active = %v, want 2", got)
	}
	c.Close()
	deadline = time.Now().Add(5 * time.Second)
	for len(e.proxy.Connections()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("connections left after close: %+v", e.proxy.Connections())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, l := range []map[string]string{src, dst} {
		if got := count(t, reg, "istio_tcp_connections_closed_total", l); got != 1 {
			t.Errorf("closed %v = %v, want 1", l, got)
		}
	}
	if got := count(t, reg, "meshlite_ztunnel_connections_active", nil); got != 0 {
		t.Errorf("active after close = %v", got)
	}
	waitLog(t, e.logs, "inbound connection closed")
	if l := e.logs.String(); !strings.Contains(l, "src.identity=spiffe://cluster.local/ns/default/sa/sleep") || !strings.Contains(l, "security=mtls") {
		t.Errorf("inbound access log:\n%s", l)
	}
}

func TestConnections_PassthroughAndPlaintextAreMarkedPlaintext(t *testing.T) {
	e := newEnv(t, TunnelH2)
	reg := e.registry(t)
	// Outbound to a workload outside the mesh: plain TCP.
	e.setOrigDst(netip.AddrPortFrom(plainIP, e.appPort))
	if err := roundTrip(e.outbound, clientIP); err != nil {
		t.Fatal(err)
	}
	// Plaintext into the server pod (PERMISSIVE: no policy).
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	if err := roundTrip(e.plain15006, plainIP); err != nil {
		t.Fatal(err)
	}
	if got := count(t, reg, "istio_tcp_connections_opened_total", map[string]string{"reporter": "source", "connection_security_policy": "none", "destination_workload": "legacy"}); got != 1 {
		t.Errorf("passthrough opened = %v", got)
	}
	if got := count(t, reg, "istio_tcp_connections_opened_total", map[string]string{"reporter": "destination", "connection_security_policy": "none",
		"source_workload": "legacy", "source_principal": "unknown", "destination_workload": "httpbin"}); got != 1 {
		t.Errorf("plaintext inbound opened = %v", got)
	}
}

func TestConnections_RefusalsCounted(t *testing.T) {
	denyAll := &security.Authorization{Name: "deny-all", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Namespaces: []*security.StringMatch{{MatchType: &security.StringMatch_Presence{}}}}}}}}}}
	e := newEnv(t, TunnelH2)
	reg := e.registry(t)
	e.applyPolicies(t, denyAll)
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	if err := roundTrip(e.outbound, clientIP); err == nil {
		t.Fatal("denied connection served")
	}
	deadline := time.Now().Add(5 * time.Second)
	for count(t, reg, "meshlite_ztunnel_connections_refused_total", map[string]string{"direction": "outbound", "reason": "policy"}) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("outbound refusal not counted\n%s", e.logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := count(t, reg, "meshlite_ztunnel_connections_refused_total", map[string]string{"direction": "inbound", "reason": "policy"}); got != 1 {
		t.Errorf("inbound policy refusals = %v", got)
	}
	if got := count(t, reg, "istio_tcp_connections_opened_total", nil); got != 0 {
		t.Errorf("a refused connection counted as opened: %v", got)
	}
	if n := len(e.proxy.Connections()); n != 0 {
		t.Errorf("%d refused connections in the table", n)
	}
}
