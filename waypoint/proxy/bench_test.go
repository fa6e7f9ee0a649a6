package proxy

import (
	"fmt"
	"io"
	"net/http"
	"runtime"
	"testing"

	"github.com/meshlite/meshlite/proto/l7"
)

// BenchmarkWaypoint measures requests through the whole engine on loopback:
// client HBONE -> waypoint (route match, authz, rate-limit bookkeeping) ->
// HBONE -> fake ztunnel -> app, with parallel clients.
//
// The c50 variants keep 50 requests in flight (the bench's wrk load);
// tunnels/op counts the upstream HBONE tunnels the endpoint's ztunnel
// accepted per request (near 0 when upstream connections are reused).
//
//	go test ./waypoint/proxy -run '^$' -bench Waypoint -benchtime 3s
func BenchmarkWaypoint(b *testing.B) {
	for _, tc := range []struct {
		h2       bool
		inFlight int
	}{{false, 0}, {true, 0}, {false, 50}} {
		h2 := tc.h2
		name := "http1"
		if h2 {
			name = "h2c"
		}
		if tc.inFlight > 0 {
			name = fmt.Sprintf("%s-c%d", name, tc.inFlight)
		}
		b.Run(name, func(b *testing.B) {
			m := newMesh(b)
			m.addService("echo", vip)
			ep := m.addEndpoint("echo", true, named("ok"))
			m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{
				{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/api"}}}, BackendRefs: []*l7.BackendRef{ref("echo", 1)}},
			}}}, AuthorizationPolicies: []*l7.AuthorizationPolicy{{Name: "deny-admin", Action: l7.AuthorizationPolicy_DENY,
				Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin*"}}}}}}}})
			c := m.client(h2)
			b.ReportAllocs()
			if tc.inFlight > 0 {
				b.SetParallelism((tc.inFlight + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			}
			before := ep.tunnels.Load()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := c.Get("http://echo" + domain + "/api/x")
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						b.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			})
			b.ReportMetric(float64(ep.tunnels.Load()-before)/float64(b.N), "tunnels/op")
		})
	}
}
