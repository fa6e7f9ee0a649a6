package proxy

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
)

// invalidRef is a backendRef istiod-lite could not resolve. It names a
// Service the waypoint can reach (hostname set, endpoints up), so a test
// sees it if the waypoint ever routes to it anyway.
func invalidRef(svc string, weight uint32) *l7.BackendRef {
	r := ref(svc, weight)
	r.Invalid = "backendRef default/" + svc + ": not permitted, no ReferenceGrant in default allows HTTPRoutes of namespace front"
	return r
}

// requestsWith sums istio_requests_total over the series with this
// response code and response flags.
func requestsWith(t *testing.T, m *mesh, code, flags string) float64 {
	t.Helper()
	mfs, err := m.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, s := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["response_code"] == code && labels["response_flags"] == flags {
				n += s.GetCounter().GetValue()
			}
		}
	}
	return n
}

// Gateway API: the share of the requests that would go to an unresolved
// backendRef is answered 500 (flag NC, as Envoy's "no cluster found"), not
// redistributed to the valid backends, and the unresolved one is never
// dialed even when the waypoint could reach it.
func TestWaypoint_UnresolvedBackendShareIsAnswered500(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("echo-v1", "")
	m.addService("forbidden", "")
	m.addEndpoint("echo-v1", true, named("v1"))
	forbidden := m.addEndpoint("forbidden", true, named("forbidden"))
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "split", Rules: []*l7.HTTPRouteRule{
		{BackendRefs: []*l7.BackendRef{ref("echo-v1", 50), invalidRef("forbidden", 50)}},
	}}}})
	c := m.client(false)
	const n = 400
	got := map[int]int{}
	for i := 0; i < n; i++ {
		code, body, _ := get(t, c, "/")
		switch {
		case code == 200 && body == "v1":
		case code == 500 && body == "backend not resolved\n":
		default:
			t.Fatalf("request %d: %d %q, want 200 from v1 or the waypoint's 500", i, code, body)
		}
		got[code]++
	}
	// Binomial(400, .5): sd 10; 4 sd either side.
	if math.Abs(float64(got[500])-n/2) > 40 {
		t.Errorf("%d of %d answered 500, want ~%d (the invalid backend's share)", got[500], n, n/2)
	}
	t.Logf("over %d requests: %v", n, got)
	if h := forbidden.hits.Load(); h != 0 || forbidden.tunnels.Load() != 0 {
		t.Errorf("the unresolved backend was reached %d times", h)
	}
	if v := requestsWith(t, m, "500", "NC"); v != float64(got[500]) {
		t.Errorf("istio_requests_total{response_code=500,response_flags=NC} = %v, want %d", v, got[500])
	}
	if v := requestsWith(t, m, "200", "-"); v != float64(got[200]) {
		t.Errorf("istio_requests_total{response_code=200} = %v, want %d", v, got[200])
	}
	if !strings.Contains(m.logs.String(), "status=500 flags=NC") {
		t.Errorf("no access log line with status 500 and flag NC")
	}
	if !strings.Contains(m.logs.String(), "reason=\"backendRef default/forbidden: not permitted") {
		t.Errorf("no debug line with the reason")
	}
}

// A rule whose backends are all unresolved answers every request 500 (and
// gRPC calls get a gRPC status), whatever their weights.
func TestWaypoint_AllBackendsUnresolvedAnswers500(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("forbidden", "")
	forbidden := m.addEndpoint("forbidden", true, grpcBackend("forbidden"))
	m.bind("echo", &l7.ServiceConfig{
		HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{
			{BackendRefs: []*l7.BackendRef{invalidRef("forbidden", 3), invalidRef("forbidden", 0),
				{Namespace: "default", Name: "gone", Port: 80, Weight: 1, Invalid: "backendRef default/gone: Service not found"}}},
		}}},
		GrpcRoutes: []*l7.GRPCRoute{{Namespace: "default", Name: "g", Rules: []*l7.GRPCRouteRule{
			{BackendRefs: []*l7.BackendRef{invalidRef("forbidden", 1)}},
		}}},
	})
	for _, h2 := range []bool{false, true} {
		c := m.client(h2)
		for i := 0; i < 20; i++ {
			if code, body, _ := get(t, c, "/"); code != 500 || body != "backend not resolved\n" {
				t.Fatalf("h2=%v request %d: %d %q, want 500", h2, i, code, body)
			}
		}
	}
	// gRPC's mapping of HTTP 500 is UNKNOWN (2).
	if code, st, _ := grpcCall(t, m.client(true), "/helloworld.Greeter/SayHello"); code != 200 || st != "2" {
		t.Errorf("gRPC call to an unresolved backend: %d grpc-status=%q, want 200 with UNKNOWN (2)", code, st)
	}
	if forbidden.hits.Load() != 0 {
		t.Errorf("the unresolved backend was reached")
	}
	if v := requestsWith(t, m, "500", "NC"); v != 40 {
		t.Errorf("istio_requests_total{500,NC} = %v, want 40", v)
	}
}

// A resolved backendRef to a Service that exists but has no endpoints is
// not an invalid reference: 503 "no healthy upstream" (flag UH), as
// before. So is one the waypoint has not heard of yet.
func TestWaypoint_ValidBackendWithoutEndpointsAnswers503(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("empty", "")
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/empty"}}}, BackendRefs: []*l7.BackendRef{ref("empty", 1)}},
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/unknown"}}}, BackendRefs: []*l7.BackendRef{ref("not-yet-pushed", 1)}},
	}}}})
	c := m.client(false)
	for _, path := range []string{"/empty", "/unknown"} {
		if code, body, _ := get(t, c, path); code != 503 || body != "no healthy upstream\n" {
			t.Errorf("%s: %d %q, want 503 no healthy upstream", path, code, body)
		}
	}
	if v := requestsWith(t, m, "503", "UH"); v != 2 {
		t.Errorf("istio_requests_total{503,UH} = %v, want 2", v)
	}
}

// An unresolved mirror backend mirrors nothing; the request itself and a
// valid mirror next to it are served.
func TestWaypoint_UnresolvedMirrorBackendIsNotMirrored(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("shadow", "")
	m.addService("forbidden", "")
	m.addEndpoint("echo", true, named("echo"))
	shadow := m.addEndpoint("shadow", true, named("shadow"))
	forbidden := m.addEndpoint("forbidden", true, named("forbidden"))
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{{
		Filters: []*l7.HTTPRouteFilter{
			{Kind: &l7.HTTPRouteFilter_RequestMirror{RequestMirror: &l7.RequestMirror{Backend: invalidRef("forbidden", 1)}}},
			{Kind: &l7.HTTPRouteFilter_RequestMirror{RequestMirror: &l7.RequestMirror{Backend: ref("shadow", 1)}}},
		},
		BackendRefs: []*l7.BackendRef{ref("echo", 1)},
	}}}}})
	if code, body, _ := get(t, m.client(false), "/"); code != 200 || body != "echo" {
		t.Fatalf("%d %q", code, body)
	}
	waitFor(t, func() bool { return shadow.hits.Load() == 1 }, "the valid mirror")
	// Both mirrors of a request start together; give a wrong one time to land.
	time.Sleep(100 * time.Millisecond)
	if forbidden.hits.Load() != 0 || forbidden.tunnels.Load() != 0 {
		t.Errorf("the unresolved mirror backend was mirrored to")
	}
}
