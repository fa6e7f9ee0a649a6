package dns

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlite/meshlite/proto/workload"
)

// fakeState is a pure in-memory Lookup (the request path's unit tests).
type fakeState struct {
	svcs map[string]*workload.Service
	eps  map[string][]*workload.Workload
}

func (f *fakeState) Service(key string) *workload.Service      { return f.svcs[key] }
func (f *fakeState) Endpoints(key string) []*workload.Workload { return f.eps[key] }

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func testState() *fakeState {
	return &fakeState{
		svcs: map[string]*workload.Service{
			"app/echo.app.svc.cluster.local": {Name: "echo", Namespace: "app", Hostname: "echo.app.svc.cluster.local",
				Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.20")}, {Address: ip("fd00::20")},
					{Network: "other", Address: ip("10.200.0.1")}}},
			"app/db.app.svc.cluster.local": {Name: "db", Namespace: "app", Hostname: "db.app.svc.cluster.local"},
			"app/v4.app.svc.cluster.local": {Name: "v4", Namespace: "app", Hostname: "v4.app.svc.cluster.local",
				Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.21")}}},
		},
		eps: map[string][]*workload.Workload{
			"app/db.app.svc.cluster.local": {
				{Uid: "a", Addresses: [][]byte{ip("10.244.1.5")}, Status: workload.WorkloadStatus_HEALTHY},
				{Uid: "b", Addresses: [][]byte{ip("10.244.2.6")}, Status: workload.WorkloadStatus_UNHEALTHY},
				{Uid: "c", Addresses: [][]byte{ip("10.244.2.7")}, Status: workload.WorkloadStatus_HEALTHY},
			},
		},
	}
}

func newProxy(t *testing.T, ups ...netip.AddrPort) *Proxy {
	t.Helper()
	p, err := New(Config{State: testState(), DomainSuffix: "cluster.local", Upstreams: ups, Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func query(name string, qtype uint16) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

func answers(m *mdns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch v := rr.(type) {
		case *mdns.A:
			out = append(out, v.A.String())
		case *mdns.AAAA:
			out = append(out, v.AAAA.String())
		}
	}
	return out
}

func TestAnswer_MeshNames(t *testing.T) {
	p := newProxy(t) // no upstream: anything forwarded is SERVFAIL
	for _, tc := range []struct {
		name  string
		qtype uint16
		rcode int
		want  string // answers joined by ","
		auth  bool
	}{
		{"echo.app.svc.cluster.local.", mdns.TypeA, mdns.RcodeSuccess, "10.96.0.20", true},
		{"ECHO.App.svc.Cluster.Local.", mdns.TypeA, mdns.RcodeSuccess, "10.96.0.20", true},
		{"echo.app.svc.cluster.local.", mdns.TypeAAAA, mdns.RcodeSuccess, "fd00::20", true},
		{"v4.app.svc.cluster.local.", mdns.TypeAAAA, mdns.RcodeSuccess, "", true}, // NODATA
		{"db.app.svc.cluster.local.", mdns.TypeA, mdns.RcodeSuccess, "10.244.1.5,10.244.2.7", true},
		// Search suffixes appended to a qualified name: no such name anywhere.
		{"echo.app.svc.cluster.local.app.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, "", true},
		{"echo.app.svc.cluster.local.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, "", true},
		{"echo.app.svc.cluster.local.cluster.local.", mdns.TypeA, mdns.RcodeNameError, "", true},
		// Not ours to decide: forwarded (and here no upstream: SERVFAIL).
		{"nosuch.app.svc.cluster.local.", mdns.TypeA, mdns.RcodeServerFailure, "", false},
		{"pod-0.db.app.svc.cluster.local.", mdns.TypeA, mdns.RcodeServerFailure, "", false},
		{"_http._tcp.echo.app.svc.cluster.local.", mdns.TypeA, mdns.RcodeServerFailure, "", false},
		{"example.com.", mdns.TypeA, mdns.RcodeServerFailure, "", false},
		{"echo.app.svc.cluster.local.example.com.", mdns.TypeA, mdns.RcodeServerFailure, "", false},
		{"echo.app.svc.cluster.local.", mdns.TypeSRV, mdns.RcodeServerFailure, "", false},
	} {
		t.Run(tc.name+"/"+mdns.TypeToString[tc.qtype], func(t *testing.T) {
			req := query(tc.name, tc.qtype)
			resp := p.Answer(context.Background(), req, false, nil)
			if resp == nil {
				t.Fatal("no answer")
			}
			if resp.Rcode != tc.rcode || resp.Id != req.Id || !resp.Response {
				t.Fatalf("rcode %s id %d response %v, want %s id %d", mdns.RcodeToString[resp.Rcode], resp.Id, resp.Response,
					mdns.RcodeToString[tc.rcode], req.Id)
			}
			if got := strings.Join(answers(resp), ","); got != tc.want {
				t.Fatalf("answers %q, want %q", got, tc.want)
			}
			if resp.Authoritative != tc.auth {
				t.Fatalf("authoritative %v, want %v", resp.Authoritative, tc.auth)
			}
			if len(resp.Answer) > 0 && resp.Answer[0].Header().Name != tc.name {
				t.Fatalf("answer for %q, want the question's name %q", resp.Answer[0].Header().Name, tc.name)
			}
		})
	}
}

func TestAnswer_BadRequests(t *testing.T) {
	p := newProxy(t)
	two := query("echo.app.svc.cluster.local.", mdns.TypeA)
	two.Question = append(two.Question, two.Question[0])
	if r := p.Answer(context.Background(), two, false, nil); r.Rcode != mdns.RcodeFormatError {
		t.Fatalf("two questions: %s", mdns.RcodeToString[r.Rcode])
	}
	none := query("x.", mdns.TypeA)
	none.Question = nil
	if r := p.Answer(context.Background(), none, false, nil); r.Rcode != mdns.RcodeFormatError {
		t.Fatalf("no question: %s", mdns.RcodeToString[r.Rcode])
	}
	upd := query("echo.app.svc.cluster.local.", mdns.TypeA)
	upd.Opcode = mdns.OpcodeUpdate
	if r := p.Answer(context.Background(), upd, false, nil); r.Rcode != mdns.RcodeNotImplemented {
		t.Fatalf("update: %s", mdns.RcodeToString[r.Rcode])
	}
	ans := query("echo.app.svc.cluster.local.", mdns.TypeA)
	ans.Response = true
	if r := p.Answer(context.Background(), ans, false, nil); r != nil {
		t.Fatalf("answered a response: %v", r)
	}
}

// upstream runs a real DNS server on loopback answering every A query with
// 192.0.2.1 and counting queries.
func upstream(t *testing.T, network string) (netip.AddrPort, *atomic.Int32) {
	t.Helper()
	var n atomic.Int32
	h := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		n.Add(1)
		m := new(mdns.Msg)
		m.SetReply(r)
		if r.Question[0].Qtype == mdns.TypeA {
			m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeA,
				Class: mdns.ClassINET, Ttl: 5}, A: net.IPv4(192, 0, 2, 1)})
		}
		w.WriteMsg(m)
	})
	srv := &mdns.Server{Handler: h, Net: network}
	var addr string
	if network == "udp" {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv.PacketConn, addr = pc, pc.LocalAddr().String()
	} else {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv.Listener, addr = ln, ln.Addr().String()
	}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return netip.MustParseAddrPort(addr), &n
}

// deadUpstream is a UDP socket that never answers.
func deadUpstream(t *testing.T) netip.AddrPort {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// serve runs the proxy on real loopback sockets, as inpod hands them over.
func serve(t *testing.T, p *Proxy) (udp, tcp string) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { p.ServeUDP(ctx, pc, nil); done <- struct{}{} }()
	go func() { p.ServeTCP(ctx, ln, nil); done <- struct{}{} }()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
		pc.Close()
	})
	return pc.LocalAddr().String(), ln.Addr().String()
}

func TestProxy_ServesAndForwardsOverUDPAndTCP(t *testing.T) {
	upU, nU := upstream(t, "udp")
	upT, nT := upstream(t, "tcp")
	// The UDP and TCP upstream servers listen on different ports; give each
	// proxy the one its transport reaches.
	for _, tc := range []struct {
		net string
		up  netip.AddrPort
		n   *atomic.Int32
	}{{"udp", upU, nU}, {"tcp", upT, nT}} {
		t.Run(tc.net, func(t *testing.T) {
			p := newProxy(t, deadUpstream(t), tc.up) // the first never answers: the second is tried in time
			udp, tcp := serve(t, p)
			addr := udp
			if tc.net == "tcp" {
				addr = tcp
			}
			c := &mdns.Client{Net: tc.net, Timeout: 3 * time.Second}
			r, _, err := c.Exchange(query("echo.app.svc.cluster.local.", mdns.TypeA), addr)
			if err != nil || r.Rcode != mdns.RcodeSuccess || strings.Join(answers(r), ",") != "10.96.0.20" {
				t.Fatalf("mesh name: %v %v", r, err)
			}
			if tc.n.Load() != 0 {
				t.Fatal("a mesh name went upstream")
			}
			start := time.Now()
			r, _, err = c.Exchange(query("example.org.", mdns.TypeA), addr)
			if err != nil || r.Rcode != mdns.RcodeSuccess || strings.Join(answers(r), ",") != "192.0.2.1" {
				t.Fatalf("forwarded name: %v %v", r, err)
			}
			if tc.n.Load() != 1 {
				t.Fatalf("upstream saw %d queries, want 1", tc.n.Load())
			}
			if d := time.Since(start); d > time.Second {
				t.Fatalf("forward took %v", d)
			}
		})
	}
}

func TestProxy_DeadUpstreamIsPromptServfail(t *testing.T) {
	p := newProxy(t, deadUpstream(t), deadUpstream(t))
	udp, _ := serve(t, p)
	c := &mdns.Client{Net: "udp", Timeout: 5 * time.Second}
	start := time.Now()
	r, _, err := c.Exchange(query("example.org.", mdns.TypeA), udp)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	if r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("rcode %s, want SERVFAIL", mdns.RcodeToString[r.Rcode])
	}
	if d := time.Since(start); d < 400*time.Millisecond || d > 2*time.Second {
		t.Fatalf("SERVFAIL after %v, want about the 500ms timeout", d)
	}
	// Meanwhile mesh names are answered at once.
	r, _, err = c.Exchange(query("echo.app.svc.cluster.local.", mdns.TypeA), udp)
	if err != nil || r.Rcode != mdns.RcodeSuccess {
		t.Fatalf("mesh name: %v %v", r, err)
	}
}

func TestProxy_TruncatesLargeUDPAnswers(t *testing.T) {
	st := testState()
	var eps []*workload.Workload
	for i := range 200 {
		eps = append(eps, &workload.Workload{Uid: string(rune('a' + i)), Status: workload.WorkloadStatus_HEALTHY,
			Addresses: [][]byte{{10, 244, byte(i / 250), byte(i%250 + 1)}}})
	}
	st.eps["app/db.app.svc.cluster.local"] = eps
	p, err := New(Config{State: st, DomainSuffix: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	r := p.Answer(context.Background(), query("db.app.svc.cluster.local.", mdns.TypeA), false, nil)
	if !r.Truncated || r.Len() > mdns.MinMsgSize {
		t.Fatalf("UDP answer of %d bytes, truncated %v", r.Len(), r.Truncated)
	}
	r = p.Answer(context.Background(), query("db.app.svc.cluster.local.", mdns.TypeA), true, nil)
	if r.Truncated || len(r.Answer) != 200 {
		t.Fatalf("TCP answer: %d records, truncated %v", len(r.Answer), r.Truncated)
	}
}

func TestReadResolvConf(t *testing.T) {
	f := t.TempDir() + "/resolv.conf"
	if err := writeFile(f, "nameserver 10.0.0.10\nnameserver fd00::53\nsearch a.b\noptions ndots:5\n"); err != nil {
		t.Fatal(err)
	}
	ups, err := ReadResolvConf(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(ups) != 2 || ups[0].String() != "10.0.0.10:53" || ups[1].String() != "[fd00::53]:53" {
		t.Fatalf("upstreams %v", ups)
	}
	if _, err := ReadResolvConf(t.TempDir() + "/none"); err == nil {
		t.Fatal("missing file: no error")
	}
}
