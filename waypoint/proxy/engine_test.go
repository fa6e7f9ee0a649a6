package proxy

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/proto/l7"
)

func TestWaypoint_ServesBoundServiceOverHBONEWithItsIdentity(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	ep := m.addEndpoint("echo", true, named("echo"))
	m.bind("echo", nil)
	for _, h2 := range []bool{false, true} {
		code, body, _ := get(t, m.client(h2), "/hello", "traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
		if code != 200 || body != "echo" {
			t.Fatalf("h2=%v: %d %q", h2, code, body)
		}
	}
	v, _ := m.ztunnelHdr.Load(ep.ip)
	req := v.(*hbone.Request)
	if req.PeerID != m.wpID || req.Target.String() != ep.ip.String()+":8080" || req.Forwarded.Addr().String() != clientIP {
		t.Errorf("upstream CONNECT: peer %s target %s forwarded %s; want the waypoint's identity, pod:8080, the client IP", req.PeerID, req.Target, req.Forwarded)
	}
	seen := ep.lastSeen.Load()
	tp := seen.Header.Get("Traceparent")
	if !strings.HasPrefix(tp, "00-4bf92f3577b34da6a3ce929d0e0e4736-") || strings.Contains(tp, "00f067aa0ba902b7") {
		t.Errorf("traceparent upstream %q: want the same trace with the waypoint's span", tp)
	}
	if seen.ProtoMajor != 2 {
		t.Errorf("an h2c request went upstream as HTTP/%d", seen.ProtoMajor)
	}
	n := testutil.ToFloat64(m.proxy.cfg.Metrics.RequestsCounter().WithLabelValues(
		"waypoint", "unknown", "default", "spiffe://cluster.local/ns/default/sa/client", "unknown",
		"echo", "default", "spiffe://cluster.local/ns/default/sa/echo", "echo",
		"echo"+domain, "echo", "default", "http", "200", "", "-", "mutual_tls"))
	if n != 2 {
		t.Errorf("istio_requests_total = %v, want 2", n)
	}
	if !strings.Contains(m.logs.String(), `msg=access method=GET authority=echo.default.svc.cluster.local path=/hello`) {
		t.Errorf("no access log line")
	}
}

func TestWaypoint_WeightedSplit90To10(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("echo-v1", "")
	m.addService("echo-v2", "")
	m.addEndpoint("echo-v1", true, named("v1"))
	m.addEndpoint("echo-v2", true, named("v2"))
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "split", Rules: []*l7.HTTPRouteRule{
		{BackendRefs: []*l7.BackendRef{ref("echo-v1", 90), ref("echo-v2", 10)}},
	}}}})
	c := m.client(false)
	counts := map[string]int{}
	const n = 1000
	for i := 0; i < n; i++ {
		code, body, _ := get(t, c, "/")
		if code != 200 {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
		counts[body]++
	}
	// 3 standard deviations of a binomial(1000, 0.1) is ~28.
	if math.Abs(float64(counts["v2"])-100) > 30 || counts["v1"]+counts["v2"] != n {
		t.Errorf("split %v, want ~900/100", counts)
	}
	t.Logf("split over %d requests: %v", n, counts)
}

func TestWaypoint_HeaderMatchRouting(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("echo-v1", "")
	m.addService("echo-v2", "")
	m.addEndpoint("echo-v1", true, named("v1"))
	m.addEndpoint("echo-v2", false, named("v2")) // no HBONE: plain TCP upstream
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "canary", Rules: []*l7.HTTPRouteRule{
		{Matches: []*l7.HTTPRouteMatch{{Headers: []*l7.HeaderMatch{{Name: "x-canary", Value: "true"}}}}, BackendRefs: []*l7.BackendRef{ref("echo-v2", 1)}},
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/"}}}, BackendRefs: []*l7.BackendRef{ref("echo-v1", 1)}},
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Type: l7.PathMatch_EXACT, Value: "/old"}}},
			Filters: []*l7.HTTPRouteFilter{{Kind: &l7.HTTPRouteFilter_RequestRedirect{RequestRedirect: &l7.RequestRedirect{Path: &l7.PathModifier{Value: "/new"}, StatusCode: 301}}}}},
	}}}})
	c := m.client(false)
	for i := 0; i < 20; i++ {
		if _, body, _ := get(t, c, "/", "x-canary", "true"); body != "v2" {
			t.Fatalf("x-canary: true went to %q", body)
		}
		if _, body, _ := get(t, c, "/"); body != "v1" {
			t.Fatalf("no header went to %q", body)
		}
	}
	code, _, h := get(t, c, "/old?x=1")
	if code != 301 || h.Get("Location") != "http://echo.default.svc.cluster.local/new?x=1" {
		t.Errorf("redirect: %d %q", code, h.Get("Location"))
	}
}

func TestWaypoint_FiltersRewriteHeadersAndMirror(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("shadow", "")
	ep := m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Internal", "secret")
		fmt.Fprintf(w, "%s %s %s", r.URL.Path, r.Host, r.Header.Get("X-Added"))
	})
	shadow := m.addEndpoint("shadow", true, named("shadow"))
	mods := &l7.HeaderModifier{Set: []*l7.Header{{Name: "x-added", Value: "yes"}}, Remove: []string{"x-drop"}}
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{{
		Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/api"}}},
		Filters: []*l7.HTTPRouteFilter{
			{Kind: &l7.HTTPRouteFilter_RequestHeaderModifier{RequestHeaderModifier: mods}},
			{Kind: &l7.HTTPRouteFilter_ResponseHeaderModifier{ResponseHeaderModifier: &l7.HeaderModifier{Remove: []string{"x-internal"}, Add: []*l7.Header{{Name: "x-via", Value: "waypoint"}}}}},
			{Kind: &l7.HTTPRouteFilter_UrlRewrite{UrlRewrite: &l7.URLRewrite{Hostname: "rewritten", Path: &l7.PathModifier{Type: l7.PathModifier_REPLACE_PREFIX_MATCH, Value: "/v2"}}}},
			{Kind: &l7.HTTPRouteFilter_RequestMirror{RequestMirror: &l7.RequestMirror{Backend: ref("shadow", 1)}}},
		},
		BackendRefs: []*l7.BackendRef{ref("echo", 1)},
	}}}}})
	code, body, h := get(t, m.client(false), "/api/items", "x-drop", "1")
	if code != 200 || body != "/v2/items rewritten yes" {
		t.Errorf("rewrite/headers: %d %q", code, body)
	}
	if h.Get("X-Internal") != "" || h.Get("X-Via") != "waypoint" {
		t.Errorf("response headers %v", h)
	}
	if ep.lastSeen.Load().Header.Get("X-Drop") != "" {
		t.Error("removed header reached the backend")
	}
	waitFor(t, func() bool { return shadow.hits.Load() == 1 }, "mirror to reach the shadow backend")
	if got := shadow.lastSeen.Load().Host; got != "rewritten-shadow" {
		t.Errorf("mirror host %q", got)
	}
}

func TestWaypoint_PodIPTargetGoesToThatPodUnderServicePolicy(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("echo-v2", "")
	a := m.addEndpoint("echo", true, named("a"))
	m.addEndpoint("echo", true, named("b"))
	m.addEndpoint("echo-v2", true, named("v2"))
	m.bind("echo", &l7.ServiceConfig{
		HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "all-to-v2", Rules: []*l7.HTTPRouteRule{{BackendRefs: []*l7.BackendRef{ref("echo-v2", 1)}}}}},
		AuthorizationPolicies: []*l7.AuthorizationPolicy{{Name: "deny-admin", Namespace: "default", Action: l7.AuthorizationPolicy_DENY,
			Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin"}}}}}}},
	})
	c := m.clientTo(netip.AddrPortFrom(a.ip, 8080), false)
	for i := 0; i < 5; i++ {
		if code, body, _ := get(t, c, "/"); code != 200 || body != "a" {
			t.Fatalf("pod IP target: %d %q, want pod a itself (routes apply to Service traffic only)", code, body)
		}
	}
	if code, _, _ := get(t, c, "/admin"); code != 403 {
		t.Errorf("pod IP target bypassed the Service's DENY policy: %d", code)
	}
	if _, body, _ := get(t, m.client(false), "/"); body != "v2" {
		t.Errorf("VIP traffic not routed: %q", body)
	}
}

func TestWaypoint_HBONEOverQUICBothWays(t *testing.T) {
	m := newMesh(t, func(c *Config) { c.UpstreamTransport = hbone.H3 })
	m.addService("echo", vip)
	ep := m.addEndpoint("echo", true, named("echo"))
	m.bind("echo", nil)
	c := m.clientVia(hbone.H3, netip.MustParseAddrPort(vip+":80"), false)
	for i := 0; i < 3; i++ {
		if code, body, _ := get(t, c, "/"); code != 200 || body != "echo" {
			t.Fatalf("over QUIC: %d %q", code, body)
		}
	}
	v, _ := m.ztunnelHdr.Load(ep.ip)
	if req := v.(*hbone.Request); req.Transport != hbone.H3 || req.PeerID != m.wpID {
		t.Errorf("upstream tunnel %s from %s, want h3 from the waypoint", req.Transport, req.PeerID)
	}
}

// A peer may not speak for another address: Forwarded naming an IP other
// than the tunnel's source is ignored, and the tunnel's source is what goes
// upstream (and what L7 policy sees).
func TestWaypoint_IgnoresForwardedForAnotherAddress(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	ep := m.addEndpoint("echo", true, named("echo"))
	m.bind("echo", nil)
	spoofed := netip.MustParseAddrPort("127.77.0.99:40000")
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return m.tunnels.Dial(ctx, hbone.DialRequest{
			Endpoint:   netip.AddrPortFrom(netip.MustParseAddr(waypointIP), m.port),
			Target:     netip.MustParseAddrPort(vip + ":80"),
			Source:     staticSource{m.clientSVID},
			PeerIDs:    []spiffeid.ID{m.wpID},
			SourceAddr: netip.MustParseAddr(clientIP),
			Forwarded:  spoofed,
		})
	}
	tr := &http.Transport{DialContext: dial}
	defer tr.CloseIdleConnections()
	code, body, _ := get(t, &http.Client{Transport: tr, Timeout: 10 * time.Second}, "/who")
	if code != 200 || body != "echo" {
		t.Fatalf("%d %q", code, body)
	}
	v, _ := m.ztunnelHdr.Load(ep.ip)
	if got := v.(*hbone.Request).Forwarded.Addr().String(); got != clientIP {
		t.Errorf("upstream Forwarded names %s, want the tunnel's source %s (not the claimed %s)", got, clientIP, spoofed.Addr())
	}
	if !strings.Contains(m.logs.String(), "ignoring Forwarded") {
		t.Errorf("no log line about the ignored Forwarded")
	}
}
