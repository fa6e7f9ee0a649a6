package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/waypoint/config"
	"github.com/meshlite/meshlite/waypoint/telemetry"
)

// The loopback mesh: a test CA; the waypoint's HBONE server on
// 127.77.0.1:<port>; per endpoint a fake ztunnel (a real HBONE server that
// checks the caller is the waypoint and dials the app) on
// <endpoint ip>:<port> and the app itself on <endpoint ip>:8080; the test
// plays the client's ztunnel and opens HBONE tunnels to the waypoint with
// the client's identity. Everything is TLS 1.3 with SPIFFE IDs verified.

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

const (
	waypointIP = "127.77.0.1"
	clientIP   = "127.77.0.2"
	vip        = "10.96.0.10"
	domain     = ".default.svc.cluster.local"
)

var logLevel = func() slog.Level {
	if os.Getenv("WAYPOINT_TEST_LOG") != "" {
		return slog.LevelDebug
	}
	return slog.LevelWarn + 4
}()

type mesh struct {
	t          testing.TB
	ca         *identity.Authority
	port       uint16 // HBONE port of every node in the test
	store      *config.Store
	proxy      *Proxy
	registry   *prometheus.Registry
	clientSVID *x509svid.SVID
	wpID       spiffeid.ID
	tunnels    *hbone.Client // the client ztunnel's
	logs       *logBuffer
	addrs      []*workload.Address
	nextIP     atomic.Uint32
	ztunnelHdr sync.Map // endpoint ip -> last CONNECT request seen (*hbone.Request)
}

type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func mustID(t testing.TB, ns, sa string) spiffeid.ID {
	id, err := identity.NewID("cluster.local", ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func freePort(t testing.TB) uint16 {
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if p != 8080 {
			return uint16(p)
		}
	}
}

func newMesh(t testing.TB, tweak ...func(*Config)) *mesh {
	t.Helper()
	ca, err := identity.NewAuthority(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	m := &mesh{t: t, ca: ca, port: freePort(t), logs: &logBuffer{}, wpID: mustID(t, "default", "waypoint")}
	m.nextIP.Store(10)
	log := slog.New(slog.NewTextHandler(io.MultiWriter(m.logs, levelWriter{}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	wpSVID, err := ca.NewSVID(m.wpID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if m.clientSVID, err = ca.NewSVID(mustID(t, "default", "client"), time.Hour); err != nil {
		t.Fatal(err)
	}
	m.store = config.NewStore("cluster.local", log)
	up, err := hbone.NewClient(hbone.ClientConfig{Bundle: ca.Bundle(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	m.registry = prometheus.NewRegistry()
	metrics, err := telemetry.NewMetrics(m.registry)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Store: m.store, SVID: staticSource{wpSVID}, Tunnels: up, HBONEPort: m.port, Metrics: metrics, Log: log,
		ReadHeaderTimeout: 500 * time.Millisecond, SniffTimeout: 500 * time.Millisecond}
	for _, f := range tweak {
		f(&cfg)
	}
	if m.proxy, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	srv, err := hbone.NewServer(hbone.ServerConfig{
		Certificates: func(netip.Addr) (*tls.Certificate, error) { return identity.TLSCertificate(wpSVID), nil },
		Bundle:       ca.Bundle(), Authorize: identity.AuthorizeMemberOf(td), Handler: m.proxy.HandleTunnel, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(waypointIP, fmt.Sprint(m.port)))
	if err != nil {
		t.Fatal(err)
	}
	udp, err := net.ListenPacket("udp", net.JoinHostPort(waypointIP, fmt.Sprint(m.port)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); _ = srv.ServeH2(ctx, ln) }()
	go func() { defer wg.Done(); _ = srv.ServeH3(ctx, udp); udp.Close() }()
	go func() { defer wg.Done(); _ = m.proxy.Run(ctx) }()
	if m.tunnels, err = hbone.NewClient(hbone.ClientConfig{Bundle: ca.Bundle(), Logger: log}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.tunnels.Close()
		cancel()
		wg.Wait()
		up.Close()
		if t.Failed() {
			t.Logf("waypoint log:\n%s", tail(m.logs.String(), 60))
		}
	})
	return m
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type levelWriter struct{}

func (levelWriter) Write(p []byte) (int, error) {
	if logLevel <= slog.LevelDebug {
		return os.Stderr.Write(p)
	}
	return len(p), nil
}

type staticSource struct{ s *x509svid.SVID }

func (s staticSource) GetX509SVID() (*x509svid.SVID, error) { return s.s, nil }

// endpoint is one backend pod: its app and, with HBONE, its fake ztunnel.
type endpoint struct {
	ip       netip.Addr
	uid      string
	hits     atomic.Int64
	lastSeen atomic.Pointer[http.Request]
	// dead makes the app hang up without answering (a crashed backend).
	dead atomic.Bool
	// tunnels counts the HBONE tunnels its ztunnel accepted.
	tunnels atomic.Int64
}

// addEndpoint starts a backend pod of Service svc (short name) running h.
func (m *mesh) addEndpoint(svc string, hboneOn bool, h http.HandlerFunc) *endpoint {
	t := m.t
	t.Helper()
	n := m.nextIP.Add(1)
	ep := &endpoint{ip: netip.AddrFrom4([4]byte{127, 77, byte(n / 250), byte(n%250 + 1)})}
	ep.uid = "Kubernetes//Pod/default/" + svc + "-" + ep.ip.String()
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ep.dead.Load() {
			panic(http.ErrAbortHandler)
		}
		ep.hits.Add(1)
		ep.lastSeen.Store(r)
		h(w, r)
	}), Protocols: new(http.Protocols)}
	app.Protocols.SetHTTP1(true)
	app.Protocols.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ep.ip, 8080).String())
	if err != nil {
		t.Fatal(err)
	}
	go app.Serve(ln)
	t.Cleanup(func() { app.Close() })
	if hboneOn {
		id := mustID(t, "default", svc)
		svid, err := m.ca.NewSVID(id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		zt, err := hbone.NewServer(hbone.ServerConfig{
			Certificates: func(netip.Addr) (*tls.Certificate, error) { return identity.TLSCertificate(svid), nil },
			Bundle:       m.ca.Bundle(), Authorize: identity.AuthorizeMemberOf(td),
			Handler: func(ctx context.Context, req *hbone.Request) (net.Conn, error) {
				m.ztunnelHdr.Store(ep.ip, req)
				ep.tunnels.Add(1)
				// Like ztunnel for a pod bound to a waypoint: only the waypoint.
				if req.PeerID != m.wpID {
					return nil, hbone.ErrDenied
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", req.Target.String())
			},
			Logger: slog.New(slog.DiscardHandler),
		})
		if err != nil {
			t.Fatal(err)
		}
		zln, err := net.Listen("tcp", netip.AddrPortFrom(ep.ip, m.port).String())
		if err != nil {
			t.Fatal(err)
		}
		zudp, err := net.ListenPacket("udp", netip.AddrPortFrom(ep.ip, m.port).String())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var done sync.WaitGroup
		done.Add(2)
		go func() { defer done.Done(); _ = zt.ServeH2(ctx, zln) }()
		go func() { defer done.Done(); _ = zt.ServeH3(ctx, zudp); zudp.Close() }()
		t.Cleanup(func() { cancel(); done.Wait() })
	}
	tp := workload.TunnelProtocol_NONE
	if hboneOn {
		tp = workload.TunnelProtocol_HBONE
	}
	m.addrs = append(m.addrs, &workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{
		Uid: ep.uid, Name: svc + "-pod", Namespace: "default", ServiceAccount: svc, WorkloadName: svc, TunnelProtocol: tp,
		Addresses: [][]byte{ep.ip.AsSlice()},
		Services:  map[string]*workload.PortList{"default/" + svc + domain: {Ports: []*workload.Port{{ServicePort: 80, TargetPort: 8080}}}},
	}}})
	m.store.SetAddresses(m.addrs...)
	return ep
}

// addService declares Service svc (port 80 -> 8080) in the Workload API,
// with the VIP when given.
func (m *mesh) addService(svc string, vipAddr string) {
	s := &workload.Service{Name: svc, Namespace: "default", Hostname: svc + domain, Ports: []*workload.Port{{ServicePort: 80, TargetPort: 8080}}}
	if vipAddr != "" {
		s.Addresses = []*workload.NetworkAddress{{Address: netip.MustParseAddr(vipAddr).AsSlice()}}
	}
	m.addrs = append(m.addrs, &workload.Address{Type: &workload.Address_Service{Service: s}})
	m.store.SetAddresses(m.addrs...)
}

// bind makes svc (at vip) a Service of the waypoint with sc's L7 parts.
func (m *mesh) bind(svc string, sc *l7.ServiceConfig) {
	if sc == nil {
		sc = &l7.ServiceConfig{}
	}
	sc.Namespace, sc.Name, sc.Hostname = "default", svc, svc+domain
	sc.Addresses = []string{vip}
	sc.Ports = []*l7.ServicePort{{Port: 80, TargetPort: 8080, Name: "http"}}
	m.store.SetServiceConfigs(sc)
}

func ref(svc string, weight uint32) *l7.BackendRef {
	return &l7.BackendRef{Hostname: svc + domain, Port: 80, Weight: weight, Namespace: "default", Name: svc}
}

// client returns an HTTP client whose connections are HBONE tunnels from
// the client pod to the waypoint, targeting the VIP (h2c when h2).
func (m *mesh) client(h2 bool) *http.Client {
	return m.clientTo(netip.MustParseAddrPort(vip+":80"), h2)
}

// clientTo is client with another tunnel target (a pod IP:port).
func (m *mesh) clientTo(target netip.AddrPort, h2 bool) *http.Client {
	return m.clientVia(hbone.H2, target, h2)
}

// clientVia is clientTo over the given HBONE transport (H3: QUIC).
func (m *mesh) clientVia(tr hbone.Transport, target netip.AddrPort, h2 bool) *http.Client {
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return m.tunnels.Dial(ctx, hbone.DialRequest{
			Transport: tr,
			Endpoint:  netip.AddrPortFrom(netip.MustParseAddr(waypointIP), m.port),
			Target:    target,
			Source:    staticSource{m.clientSVID},
			PeerIDs:   []spiffeid.ID{m.wpID},
			// From the client pod's address, as a ztunnel dials.
			SourceAddr: netip.MustParseAddr(clientIP),
			Forwarded:  netip.MustParseAddrPort(clientIP + ":40000"),
		})
	}
	ht := &http.Transport{DialContext: dial, MaxIdleConnsPerHost: 16, Protocols: new(http.Protocols)}
	if h2 {
		ht.Protocols.SetUnencryptedHTTP2(true)
	} else {
		ht.Protocols.SetHTTP1(true)
	}
	var rt http.RoundTripper = ht
	m.t.Cleanup(func() {
		if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	})
	return &http.Client{Transport: rt, Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// rawTunnel opens one tunnel to the waypoint for hand-written bytes.
func (m *mesh) rawTunnel() net.Conn {
	c, err := m.tunnels.Dial(context.Background(), hbone.DialRequest{
		Endpoint: netip.AddrPortFrom(netip.MustParseAddr(waypointIP), m.port),
		Target:   netip.MustParseAddrPort(vip + ":80"), Source: staticSource{m.clientSVID}, PeerIDs: []spiffeid.ID{m.wpID},
	})
	if err != nil {
		m.t.Fatal(err)
	}
	return c
}

func get(t testing.TB, c *http.Client, path string, hdr ...string) (int, string, http.Header) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://echo"+domain+path, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func named(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, name) }
}

var _ = bufio.NewReader

func waitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
