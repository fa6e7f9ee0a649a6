package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// hostNet is a pod "network" on the host's loopback: sockets are not in a
// netns and need no mark (every 127/8 address is local, so binding the
// caller's address keeps the source visible to the app).
type hostNet struct{}

func (hostNet) DialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort, transparent bool) (*net.TCPConn, error) {
	d := net.Dialer{}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	c, err := d.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func (hostNet) ListenUDP(ctx context.Context, addr netip.AddrPort) (*net.UDPConn, error) {
	return net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
}

var (
	clientIP = netip.MustParseAddr("127.77.0.2")
	serverIP = netip.MustParseAddr("127.77.0.3")
	plainIP  = netip.MustParseAddr("127.77.0.4")
	wpIP     = netip.MustParseAddr("127.77.0.5")
)

type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

type env struct {
	t          *testing.T
	ca         *identity.Authority
	store      *state.Store
	proxy      *Proxy
	logs       *logBuf
	hbonePort  uint16
	origDst    netip.AddrPort
	odMu       sync.Mutex
	outbound   netip.AddrPort // client pod's capture listener
	plain15006 netip.AddrPort
	appPort    uint16
	// seen receives the remote address of each connection the app accepts.
	seen  chan netip.AddrPort
	ids   map[string]spiffeid.ID
	svids map[string]*x509svid.SVID
}

func id(t *testing.T, ns, sa string) spiffeid.ID {
	i, err := identity.NewID("cluster.local", ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return i
}

func podWl(name string, ip netip.Addr, opts ...func(*workload.Workload)) *workload.Workload {
	w := &workload.Workload{Uid: "Kubernetes//Pod/default/" + name, Name: name, Namespace: "default",
		ServiceAccount: name, Addresses: [][]byte{ip.AsSlice()}, TunnelProtocol: workload.TunnelProtocol_HBONE}
	for _, o := range opts {
		o(w)
	}
	return w
}

func named(w *workload.Workload) state.NamedAddress {
	return state.NamedAddress{Name: w.Uid, Address: &workload.Address{Type: &workload.Address_Workload{Workload: w}}}
}

// newEnv starts one proxy serving two local pods on loopback: "sleep"
// (client, 127.77.0.2) and "httpbin" (server, 127.77.0.3) with an echo app.
func newEnv(t *testing.T, tunnel Tunnel, serverOpts ...func(*workload.Workload)) *env {
	t.Helper()
	return newEnvQ(t, tunnel, true, serverOpts...)
}

// newEnvQ is newEnv; serveQUIC false leaves the server's UDP port closed.
func newEnvQ(t *testing.T, tunnel Tunnel, serveQUIC bool, serverOpts ...func(*workload.Workload)) *env {
	t.Helper()
	return newEnvCfg(t, tunnel, serveQUIC, nil, serverOpts...)
}

// newEnvCfg is newEnvQ with cfg editing the proxy's Config.
func newEnvCfg(t *testing.T, tunnel Tunnel, serveQUIC bool, cfg func(*Config), serverOpts ...func(*workload.Workload)) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	go1 := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }

	ca, err := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ca: ca, store: state.New(nil), logs: &logBuf{}, seen: make(chan netip.AddrPort, 16),
		ids: map[string]spiffeid.ID{}, svids: map[string]*x509svid.SVID{}}
	for _, n := range []string{"sleep", "httpbin", "waypoint"} {
		e.ids[n] = id(t, "default", n)
		if e.svids[n], err = ca.NewSVID(e.ids[n], time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	// Server pod's HBONE listener (TCP and UDP on one port) and app.
	// The UDP port may be taken (other tests' QUIC sockets): try another
	// TCP port then.
	var hln net.Listener
	var udp *net.UDPConn
	for try := 0; ; try++ {
		l, err := net.Listen("tcp", netip.AddrPortFrom(serverIP, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(l.Addr().(*net.TCPAddr).Port)
		u, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(serverIP, port)))
		if err != nil {
			l.Close()
			if try < 20 {
				continue
			}
			t.Fatal(err)
		}
		hln, udp, e.hbonePort = l, u, port
		break
	}
	t.Cleanup(func() { udp.Close() })
	app, err := net.Listen("tcp", netip.AddrPortFrom(serverIP, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	e.appPort = uint16(app.Addr().(*net.TCPAddr).Port)
	go1(func() { serveEcho(ctx, app, e.seen) })
	// A plain (not enrolled) server.
	plain, err := net.Listen("tcp", netip.AddrPortFrom(plainIP, e.appPort).String())
	if err != nil {
		t.Fatal(err)
	}
	go1(func() { serveEcho(ctx, plain, e.seen) })

	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	pcfg := Config{State: e.store, Bundle: ca.Bundle(), Tunnel: tunnel, HBONEPort: e.hbonePort, Log: log,
		QUICAttemptTimeout: 300 * time.Millisecond,
		OriginalDst: func(net.Conn) (netip.AddrPort, error) {
			e.odMu.Lock()
			defer e.odMu.Unlock()
			return e.origDst, nil
		}}
	if cfg != nil {
		cfg(&pcfg)
	}
	e.proxy, err = New(pcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.proxy.Close() })
	plainWl := podWl("legacy", plainIP)
	plainWl.TunnelProtocol = workload.TunnelProtocol_NONE
	if err := e.store.ApplyAddresses([]state.NamedAddress{
		named(podWl("sleep", clientIP)), named(podWl("httpbin", serverIP, serverOpts...)), named(plainWl),
		named(podWl("waypoint", wpIP, func(w *workload.Workload) { w.TunnelProtocol = workload.TunnelProtocol_NONE })),
	}, nil); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"sleep", "httpbin"} {
		e.proxy.AddPod(&Pod{UID: "Kubernetes//Pod/default/" + n, SVID: e.svids[n], Net: hostNet{}})
	}
	go1(func() { e.proxy.ServeHBONE(ctx, hln) })
	if serveQUIC {
		go1(func() { e.proxy.ServeHBONEQUIC(ctx, udp) })
	} else {
		udp.Close()
	}
	oln, err := net.Listen("tcp", netip.AddrPortFrom(clientIP, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	e.outbound = netip.MustParseAddrPort(oln.Addr().String())
	go1(func() { e.proxy.ServeOutbound(ctx, oln, "Kubernetes//Pod/default/sleep") })
	pln, err := net.Listen("tcp", netip.AddrPortFrom(serverIP, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	e.plain15006 = netip.MustParseAddrPort(pln.Addr().String())
	go1(func() { e.proxy.ServePlaintext(ctx, pln, "Kubernetes//Pod/default/httpbin") })
	return e
}

func serveEcho(ctx context.Context, ln net.Listener, seen chan<- netip.AddrPort) {
	context.AfterFunc(ctx, func() { ln.Close() })
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		select {
		case seen <- netip.MustParseAddrPort(c.RemoteAddr().String()):
		default:
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}

func (e *env) setOrigDst(d netip.AddrPort) {
	e.odMu.Lock()
	e.origDst = d
	e.odMu.Unlock()
}

// roundTrip connects from the client pod's source IP to addr, writes a
// line and reads it back.
func roundTrip(addr netip.AddrPort, src netip.Addr) error {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("hello through the mesh\n")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("echo mismatch")
	}
	return nil
}

func (e *env) lastSeen(t *testing.T) netip.AddrPort {
	t.Helper()
	select {
	case a := <-e.seen:
		return a
	case <-time.After(5 * time.Second):
		t.Fatal("app saw no connection")
		return netip.AddrPort{}
	}
}

func (e *env) applyPolicies(t *testing.T, auths ...*security.Authorization) {
	t.Helper()
	if err := e.store.ApplyAuthorizations(auths, nil); err != nil {
		t.Fatal(err)
	}
}

func TestOutbound_DirectHBONEKeepsSourceIP(t *testing.T) {
	for _, tr := range []Tunnel{TunnelH2, TunnelQUIC, TunnelAuto} {
		t.Run(tr.String(), func(t *testing.T) {
			e := newEnv(t, tr)
			e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
			if err := roundTrip(e.outbound, clientIP); err != nil {
				t.Fatalf("round trip: %v\n%s", err, e.logs)
			}
			if got := e.lastSeen(t).Addr(); got != clientIP {
				t.Fatalf("app saw source %s, want %s", got, clientIP)
			}
			want := "transport=h2"
			if tr != TunnelH2 {
				want = "transport=h3"
			}
			waitLog(t, e.logs, "connection complete")
			if !strings.Contains(e.logs.String(), want) || !strings.Contains(e.logs.String(), "dst.identity=spiffe://cluster.local/ns/default/sa/httpbin") {
				t.Fatalf("access log lacks %s / identity:\n%s", want, e.logs)
			}
		})
	}
}

func waitLog(t *testing.T, l *logBuf, s string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(l.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("log never said %q:\n%s", s, l)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOutbound_AutoFallsBackToH2AndRemembers(t *testing.T) {
	e := newEnvQ(t, TunnelAuto, false)
	tcpOnly := netip.AddrPortFrom(serverIP, e.hbonePort)
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	start := time.Now()
	if err := roundTrip(e.outbound, clientIP); err != nil {
		t.Fatalf("round trip: %v\n%s", err, e.logs)
	}
	if !e.proxy.preferH2(tcpOnly) {
		t.Fatal("fallback not remembered")
	}
	if fb := e.proxy.Fallbacks(); len(fb) != 1 || fb[0].Endpoint != tcpOnly.String() || time.Until(fb[0].Until) < time.Minute {
		t.Fatalf("Fallbacks() = %+v, want %s for the fallback TTL", fb, tcpOnly)
	}
	first := time.Since(start)
	start = time.Now()
	if err := roundTrip(e.outbound, clientIP); err != nil {
		t.Fatalf("second round trip: %v", err)
	}
	if second := time.Since(start); second > first/2 && second > 100*time.Millisecond {
		t.Fatalf("second connection (%v) did not skip the QUIC attempt (first %v)", second, first)
	}
	if !strings.Contains(e.logs.String(), "QUIC to endpoint failed; using HTTP/2") {
		t.Fatalf("no fallback log:\n%s", e.logs)
	}
}

func TestOutbound_PassthroughForNonMeshDestinations(t *testing.T) {
	e := newEnv(t, TunnelH2)
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(plainIP, e.appPort), // known workload, not enrolled
	} {
		e.setOrigDst(dst)
		if err := roundTrip(e.outbound, clientIP); err != nil {
			t.Fatalf("to %s: %v\n%s", dst, err, e.logs)
		}
		e.lastSeen(t)
		waitLog(t, e.logs, "route=passthrough")
	}
}

func TestOutbound_RefusesLoopToCapturePort(t *testing.T) {
	e := newEnv(t, TunnelH2)
	e.setOrigDst(e.outbound)
	if err := roundTrip(e.outbound, clientIP); err == nil {
		t.Fatal("connection to the capture port itself was served")
	}
}

func presence() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}

func TestInbound_Policy(t *testing.T) {
	allowOnlyProd := &security.Authorization{Name: "allow-prod", Namespace: "default", Scope: security.Scope_NAMESPACE,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Namespaces: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "prod"}}}}}}}}}}
	e := newEnv(t, TunnelH2)
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	e.applyPolicies(t, allowOnlyProd)
	if err := roundTrip(e.outbound, clientIP); err == nil {
		t.Fatal("connection denied by policy was served")
	}
	waitLog(t, e.logs, "connection denied by policy")
	for _, want := range []string{"src.identity=spiffe://cluster.local/ns/default/sa/sleep", "dst.workload=default/httpbin",
		"policy=\"\"", "reason=\"no ALLOW policy matched\"", "upstream refused"} {
		if !strings.Contains(e.logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, e.logs)
		}
	}
	// The client sees 401 when it dials itself.
	_, err := e.dial(t, "sleep", clientIP, netip.AddrPortFrom(serverIP, e.appPort))
	if !errors.Is(err, hbone.ErrDenied) {
		t.Fatalf("dial err = %v, want 401", err)
	}
}

// dial opens a tunnel to the server pod as workload name from src.
func (e *env) dial(t *testing.T, name string, src netip.Addr, target netip.AddrPort) (hbone.Conn, error) {
	t.Helper()
	cl, err := hbone.NewClient(hbone.ClientConfig{Bundle: e.ca.Bundle()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return cl.Dial(ctx, hbone.DialRequest{Endpoint: netip.AddrPortFrom(serverIP, e.hbonePort), Target: target,
		Source: e.svids[name], SourceAddr: src, PeerIDs: []spiffeid.ID{e.ids["httpbin"]}})
}

func TestInbound_Refusals(t *testing.T) {
	wp := &workload.GatewayAddress{Destination: &workload.GatewayAddress_Address{Address: &workload.NetworkAddress{Address: wpIP.AsSlice()}}, HboneMtlsPort: 15008}
	tests := []struct {
		name   string
		opts   []func(*workload.Workload)
		as     string
		src    netip.Addr
		target func(e *env) netip.AddrPort
		want   error
	}{
		{"allowed", nil, "sleep", clientIP, func(e *env) netip.AddrPort { return netip.AddrPortFrom(serverIP, e.appPort) }, nil},
		{"target is another pod", nil, "sleep", clientIP, func(e *env) netip.AddrPort { return netip.AddrPortFrom(plainIP, e.appPort) }, hbone.ErrBadRequest},
		{"app not listening", nil, "sleep", clientIP, func(e *env) netip.AddrPort { return netip.AddrPortFrom(serverIP, 1) }, hbone.ErrUpstream},
		{"bypassing the waypoint", []func(*workload.Workload){func(w *workload.Workload) { w.Waypoint = wp }}, "sleep", clientIP,
			func(e *env) netip.AddrPort { return netip.AddrPortFrom(serverIP, e.appPort) }, hbone.ErrDenied},
		{"from its waypoint", []func(*workload.Workload){func(w *workload.Workload) { w.Waypoint = wp }}, "waypoint", wpIP,
			func(e *env) netip.AddrPort { return netip.AddrPortFrom(serverIP, e.appPort) }, nil},
		{"waypoint identity from another IP", []func(*workload.Workload){func(w *workload.Workload) { w.Waypoint = wp }}, "waypoint", clientIP,
			func(e *env) netip.AddrPort { return netip.AddrPortFrom(serverIP, e.appPort) }, hbone.ErrDenied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, TunnelH2, tt.opts...)
			c, err := e.dial(t, tt.as, tt.src, tt.target(e))
			if tt.want == nil {
				if err != nil {
					t.Fatalf("dial: %v\n%s", err, e.logs)
				}
				c.Close()
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v\n%s", err, tt.want, e.logs)
			}
		})
	}
}

func TestInbound_RefusesOtherTrustDomain(t *testing.T) {
	e := newEnv(t, TunnelH2)
	other, err := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("evil.example"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	evilID, _ := identity.NewID("evil.example", "default", "sleep")
	svid, _ := other.NewSVID(evilID, time.Hour)
	// The attacker trusts both roots, so only the server's check can stop it.
	cl, err := hbone.NewClient(hbone.ClientConfig{Bundle: e.ca.Bundle()})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = cl.Dial(ctx, hbone.DialRequest{Endpoint: netip.AddrPortFrom(serverIP, e.hbonePort),
		Target: netip.AddrPortFrom(serverIP, e.appPort), Source: svid, SourceAddr: clientIP, PeerIDs: []spiffeid.ID{e.ids["httpbin"]}})
	if err == nil {
		t.Fatal("peer from another trust domain was served")
	}
	var se *hbone.StatusError
	if errors.As(err, &se) {
		t.Fatalf("got an HTTP answer (%v); want the handshake refused", err)
	}
	// Others are still served.
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	if err := roundTrip(e.outbound, clientIP); err != nil {
		t.Fatalf("after the refusal: %v", err)
	}
}

func TestPlaintext_PermissiveAllowsStrictRefuses(t *testing.T) {
	strict := &security.Authorization{Name: "istio_converted_static_strict", Namespace: "istio-system",
		Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{NotPrincipals: []*security.StringMatch{presence()}}}}}}}}
	t.Run("permissive", func(t *testing.T) {
		e := newEnv(t, TunnelH2)
		e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
		if err := roundTrip(e.plain15006, plainIP); err != nil {
			t.Fatalf("plaintext under PERMISSIVE: %v\n%s", err, e.logs)
		}
		if got := e.lastSeen(t).Addr(); got != plainIP {
			t.Fatalf("app saw %s, want %s", got, plainIP)
		}
	})
	t.Run("strict", func(t *testing.T) {
		e := newEnv(t, TunnelH2, func(w *workload.Workload) {
			w.AuthorizationPolicies = []string{"istio-system/istio_converted_static_strict"}
		})
		e.applyPolicies(t, strict)
		e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
		if err := roundTrip(e.plain15006, plainIP); err == nil {
			t.Fatal("plaintext under STRICT was served")
		}
		waitLog(t, e.logs, "policy=istio-system/istio_converted_static_strict")
		if !strings.Contains(e.logs.String(), "src.identity=none") {
			t.Fatalf("deny log lacks the missing identity:\n%s", e.logs)
		}
		// mTLS still works under STRICT.
		if err := roundTrip(e.outbound, clientIP); err != nil {
			t.Fatalf("mTLS under STRICT: %v\n%s", err, e.logs)
		}
	})
}

// A pod's first connections can come before istiod-lite pushed its own
// Workload: ztunnel knows the pod (ZDS handed it over) and its address
// (the source of what its capture listener accepted), so the tunnel starts
// from the pod with its identity anyway.
func TestOutbound_SourcePodNotYetInTheState(t *testing.T) {
	e := newEnv(t, TunnelH2)
	if err := e.store.ApplyAddresses(nil, []string{"Kubernetes//Pod/default/sleep"}); err != nil {
		t.Fatal(err)
	}
	if e.store.WorkloadByIP("", clientIP) != nil {
		t.Fatal("the client's Workload is still known")
	}
	e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
	if err := roundTrip(e.outbound, clientIP); err != nil {
		t.Fatalf("round trip from a pod whose Workload has not arrived: %v\n%s", err, e.logs)
	}
	// The destination checked the tunnel's certificate: the client pod's
	// (its access log line comes when the relay ends).
	deadline := time.Now().Add(2 * time.Second)
	for !strings.Contains(e.logs.String(), "src.identity="+e.ids["sleep"].String()) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(e.logs.String(), "src.identity="+e.ids["sleep"].String()) {
		t.Errorf("the inbound side did not see the client pod's identity:\n%s", e.logs)
	}
}

// lateSource is a pod's certificate source whose first certificate comes
// when ready is closed, as the certificate manager's does while the CA is
// slow.
type lateSource struct {
	svid  *x509svid.SVID
	ready chan struct{}
}

func (s *lateSource) GetX509SVID() (*x509svid.SVID, error) {
	select {
	case <-s.ready:
		return s.svid, nil
	default:
		return nil, errors.New("no certificate yet")
	}
}

func (s *lateSource) WaitX509SVID(ctx context.Context) (*x509svid.SVID, error) {
	select {
	case <-s.ready:
		return s.svid, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// A pod served before its certificate came (a new ztunnel taking pods
// over while istiod-lite is slow) gets its connections late, not refused,
// on both ends; past CertWait, or with CertWait 0, they fail closed.
func TestCertWait_LateCertificateDelaysInsteadOfRefusing(t *testing.T) {
	for _, side := range []string{"sleep", "httpbin"} {
		for _, tc := range []struct {
			name     string
			certWait time.Duration
			arrives  time.Duration // 0: never
			ok       bool
		}{
			{"arrives within CertWait", 3 * time.Second, 300 * time.Millisecond, true},
			{"never arrives", 500 * time.Millisecond, 0, false},
			{"no CertWait", 0, 300 * time.Millisecond, false},
		} {
			t.Run(side+"/"+tc.name, func(t *testing.T) {
				e := newEnvCfg(t, TunnelH2, false, func(c *Config) { c.CertWait = tc.certWait })
				src := &lateSource{svid: e.svids[side], ready: make(chan struct{})}
				e.proxy.AddPod(&Pod{UID: "Kubernetes//Pod/default/" + side, SVID: src, Net: hostNet{}})
				if tc.arrives > 0 {
					time.AfterFunc(tc.arrives, func() { close(src.ready) })
				}
				e.setOrigDst(netip.AddrPortFrom(serverIP, e.appPort))
				start := time.Now()
				err := roundTrip(e.outbound, clientIP)
				took := time.Since(start)
				if tc.ok {
					if err != nil {
						t.Fatalf("round trip with a certificate %v late: %v\n%s", tc.arrives, err, e.logs)
					}
					if took < tc.arrives {
						t.Errorf("round trip took %v, before the certificate existed (%v)", took, tc.arrives)
					}
					return
				}
				if err == nil {
					t.Fatalf("round trip succeeded without a certificate (CertWait %v)", tc.certWait)
				}
				if took > tc.certWait+2*time.Second {
					t.Errorf("refusal took %v, CertWait is %v", took, tc.certWait)
				}
			})
		}
	}
}
