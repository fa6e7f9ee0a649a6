package model

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/proto/l7"
)

var update = flag.Bool("update", false, "rewrite golden files")

// loadFixture decodes a multi-document YAML fixture into the objects the
// Store holds.
func loadFixture(t *testing.T, path string) []any {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []any
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if len(u.Object) == 0 {
			continue
		}
		typed := func(v any) any {
			b, _ := json.Marshal(u.Object)
			if err := json.Unmarshal(b, v); err != nil {
				t.Fatalf("%s %s: %v", u.GetKind(), u.GetName(), err)
			}
			return v
		}
		switch u.GetKind() {
		case "Namespace":
			out = append(out, typed(&corev1.Namespace{}))
		case "Service":
			out = append(out, typed(&corev1.Service{}))
		case "Gateway":
			out = append(out, typed(&gatewayv1.Gateway{}))
		case "HTTPRoute":
			out = append(out, typed(&gatewayv1.HTTPRoute{}))
		case "GRPCRoute":
			out = append(out, typed(&gatewayv1.GRPCRoute{}))
		case "AuthorizationPolicy":
			p, err := DecodeAuthorizationPolicy(&u)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, p)
		case "TrafficPolicy":
			p, err := policyv1alpha1.Decode(&u)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, p)
		default:
			t.Fatalf("%s: unsupported kind %s", path, u.GetKind())
		}
	}
	return out
}

// TestServiceConfig_Golden translates testdata/l7/shop.yaml and compares
// every Service's L7 configuration with shop.golden.json (-update rewrites
// it); TestServiceConfig_Shop asserts the behaviour the golden file shows.
func TestServiceConfig_Golden(t *testing.T) {
	objs := loadFixture(t, filepath.Join("testdata", "l7", "shop.yaml"))
	b := world(t, Config{}, objs...)
	got := map[string]json.RawMessage{}
	for _, svc := range b.Store().Services("") {
		info := b.ServiceConfig(svc)
		if info.Config == nil {
			got[svc.Namespace+"/"+svc.Name] = json.RawMessage("null")
			continue
		}
		j, err := protojson.Marshal(info.Config)
		if err != nil {
			t.Fatal(err)
		}
		got[svc.Namespace+"/"+svc.Name] = j
	}
	raw, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, raw, "", "  "); err != nil {
		t.Fatal(err)
	}
	pretty.WriteByte('\n')
	golden := filepath.Join("testdata", "l7", "shop.golden.json")
	if *update {
		if err := os.WriteFile(golden, pretty.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if !bytes.Equal(pretty.Bytes(), want) {
		t.Errorf("L7 configuration differs from %s (run with -update after checking):\n%s", golden, pretty.String())
	}
}

func TestServiceConfig_Shop(t *testing.T) {
	b := world(t, Config{}, loadFixture(t, filepath.Join("testdata", "l7", "shop.yaml"))...)
	get := func(name string) ServiceConfigInfo {
		t.Helper()
		svc := b.Store().Service("shop", name)
		if svc == nil {
			t.Fatalf("no service %s", name)
		}
		return b.ServiceConfig(svc)
	}
	for _, n := range []string{"waypoint", "legacy"} {
		if c := get(n).Config; c != nil {
			t.Errorf("%s got an L7 configuration: %v", n, c)
		}
	}
	info := get("reviews")
	sc := info.Config
	if sc == nil || info.WaypointKey != "shop/waypoint" || sc.GetWaypoint() != "shop/waypoint" ||
		sc.GetHostname() != "reviews.shop.svc.cluster.local" || len(sc.GetAddresses()) != 1 || sc.GetAddresses()[0] != "10.96.1.2" {
		t.Fatalf("reviews: %v", sc)
	}
	protos := map[uint32]l7.Protocol{}
	for _, p := range sc.GetPorts() {
		protos[p.GetPort()] = p.GetProtocol()
	}
	if protos[9080] != l7.Protocol_HTTP || protos[9090] != l7.Protocol_GRPC || protos[9100] != l7.Protocol_HTTP2 {
		t.Errorf("port protocols %v", protos)
	}

	// Only the producer route; its rules split per match and ordered by
	// precedence: the exact /reviews/featured first, then longer prefixes.
	if len(sc.GetHttpRoutes()) != 1 {
		t.Fatalf("routes %v", sc.GetHttpRoutes())
	}
	rt := sc.GetHttpRoutes()[0]
	if rt.GetName() != "reviews-canary" || len(rt.GetPorts()) != 1 || rt.GetPorts()[0] != 9080 {
		t.Errorf("route %s ports %v", rt.GetName(), rt.GetPorts())
	}
	var order []string
	for _, r := range rt.GetRules() {
		m := r.GetMatches()[0]
		order = append(order, r.GetName()+":"+m.GetPath().GetType().String()+":"+m.GetPath().GetValue())
	}
	wantOrder := []string{"canary:EXACT:/reviews/featured", "canary:PATH_PREFIX:/reviews", "rule-2:PATH_PREFIX:/old",
		"rule-3:PATH_PREFIX:/v1", "rule-1:PATH_PREFIX:/"}
	if strings.Join(order, " ") != strings.Join(wantOrder, " ") {
		t.Errorf("rule order\n got %v\nwant %v", order, wantOrder)
	}
	canary := rt.GetRules()[0]
	if be := canary.GetBackendRefs(); len(be) != 2 || be[0].GetWeight() != 90 || be[1].GetWeight() != 10 ||
		be[1].GetHostname() != "reviews-v2.shop.svc.cluster.local" || be[1].GetPort() != 9080 {
		t.Errorf("canary backends %v", be)
	}
	if r := canary.GetRetry(); r.GetAttempts() != 3 || len(r.GetCodes()) != 2 || r.GetBackoff().AsDuration() != 100*time.Millisecond || !r.GetRetryOnConnectFailure() {
		t.Errorf("retry %v", r)
	}
	if to := canary.GetTimeouts(); to.GetRequest().AsDuration() != 2*time.Second || to.GetBackendRequest().AsDuration() != 500*time.Millisecond {
		t.Errorf("timeouts %v", to)
	}
	if m := canary.GetMatches()[0]; m.GetMethod() != "GET" {
		t.Errorf("method %q", m.GetMethod())
	}
	hdr := rt.GetRules()[4]
	if m := hdr.GetMatches()[0]; len(m.GetHeaders()) != 1 || len(m.GetQueryParams()) != 1 ||
		m.GetQueryParams()[0].GetType() != l7.QueryParamMatch_REGULAR_EXPRESSION {
		t.Errorf("header rule match %v", m)
	}
	if f := hdr.GetFilters(); len(f) != 2 || f[1].GetRequestMirror().GetPercent() != 25 {
		t.Errorf("header rule filters %v", f)
	}
	if be := hdr.GetBackendRefs(); len(be) != 1 || be[0].GetWeight() != 1 || be[0].GetFilters()[0].GetResponseHeaderModifier() == nil {
		t.Errorf("header rule backends %v", be)
	}
	if rd := rt.GetRules()[2].GetFilters()[0].GetRequestRedirect(); rd.GetStatusCode() != 301 || rd.GetPath().GetType() != l7.PathModifier_REPLACE_PREFIX_MATCH {
		t.Errorf("redirect %v", rd)
	}
	// The unsupported filter is left out; the backend of an unsupported
	// kind is kept, marked invalid, so its half of the requests gets 500;
	// both with warnings.
	v1 := rt.GetRules()[3]
	if len(v1.GetFilters()) != 1 || v1.GetFilters()[0].GetUrlRewrite().GetHostname() != "internal.shop" || len(v1.GetBackendRefs()) != 2 {
		t.Errorf("rewrite rule %v", v1)
	} else if be := v1.GetBackendRefs(); be[0].GetInvalid() != "" || be[1].GetName() != "s3" || be[1].GetWeight() != 1 ||
		be[1].GetHostname() != "" || !strings.Contains(be[1].GetInvalid(), "only Services") {
		t.Errorf("rewrite rule backends %v", be)
	}
	if len(info.Warnings) < 3 {
		t.Errorf("warnings %v", info.Warnings)
	}
	// The route's own resilience: the faults.
	if f := rt.GetResilience().GetFault(); f.GetDelay().GetFixedDelay().AsDuration() != 250*time.Millisecond || f.GetAbort().GetHttpStatus() != 503 {
		t.Errorf("route faults %v", rt.GetResilience())
	}

	if g := sc.GetGrpcRoutes(); len(g) != 1 || g[0].GetRules()[0].GetMatches()[0].GetMethod().GetService() != "shop.Reviews" || g[0].GetPorts()[0] != 9090 {
		t.Errorf("grpc routes %v", g)
	}

	// Policies: the Service's DENY, the Gateway's ALLOW (dry run; the JWT
	// rule dropped), the GatewayClass AUDIT from the root namespace; not
	// the selector policy (ztunnel's) nor the CUSTOM one.
	var names []string
	for _, p := range sc.GetAuthorizationPolicies() {
		names = append(names, p.GetNamespace()+"/"+p.GetName()+":"+p.GetAction().String())
	}
	if strings.Join(names, " ") != "istio-system/mesh-audit:AUDIT shop/allow-front:ALLOW shop/deny-admin:DENY" {
		t.Errorf("policies %v", names)
	}
	allow := sc.GetAuthorizationPolicies()[1]
	if !allow.GetDryRun() || len(allow.GetRules()) != 1 {
		t.Errorf("allow-front %v", allow)
	}
	from := allow.GetRules()[0].GetFrom()[0]
	if len(from.GetPrincipals()) != 2 || from.GetPrincipals()[1] != "*/ns/shop/sa/cron" {
		t.Errorf("principals %v", from.GetPrincipals())
	}
	deny := sc.GetAuthorizationPolicies()[2]
	if op := deny.GetRules()[0].GetTo()[0]; op.GetPaths()[0] != "/admin*" || len(op.GetMethods()) != 2 {
		t.Errorf("deny-admin %v", deny)
	}

	// Resilience: per part, the oldest policy setting it wins.
	res := sc.GetResilience()
	if res.GetName() != "reviews-limits" || res.GetRateLimit().GetRequestsPerSecond() != 10 || res.GetRateLimit().GetBurst() != 20 ||
		!res.GetRateLimit().GetPerSourceIdentity() || res.GetCircuitBreaker().GetMaxConnections() != 5 ||
		res.GetOutlierDetection().GetConsecutive_5Xx() != 3 || res.GetOutlierDetection().GetInterval().AsDuration() != 5*time.Second {
		t.Errorf("resilience %v", res)
	}

	// reviews-v2: no routes, the Gateway's and the class's policies.
	v2 := get("reviews-v2").Config
	if v2 == nil || len(v2.GetHttpRoutes()) != 0 || len(v2.GetAuthorizationPolicies()) != 2 || v2.GetResilience() != nil {
		t.Errorf("reviews-v2: %v", v2)
	}
}

// A Service bound to a waypoint for workloads only, or to a Gateway
// without an address yet, has no L7 configuration.
func TestServiceConfig_OnlyForServiceWaypointsWithAnAddress(t *testing.T) {
	svc := service("a", "web", "10.96.0.9", map[string]string{"app": "web"}, port(80, intstr.FromInt32(8080)))
	svc.Labels = map[string]string{"istio.io/use-waypoint": "wp"}
	for name, gw := range map[string]*gatewayv1.Gateway{
		"workload waypoint": waypointGW("a", "wp", "workload", "wp.a.svc.cluster.local"),
		"no address yet":    waypointGW("a", "wp", "", ""),
	} {
		b := world(t, Config{}, ns("a", nil), gw, svc)
		if c := b.ServiceConfig(svc).Config; c != nil {
			t.Errorf("%s: got %v", name, c)
		}
	}
	b := world(t, Config{}, ns("a", nil), waypointGW("a", "wp", "all", "wp.a.svc.cluster.local"), svc)
	if c := b.ServiceConfig(svc); c.Config == nil || c.WaypointKey != "a/wp" {
		t.Errorf("waypoint for all: %+v", c)
	}
}

// Gateway API: a backendRef that cannot be resolved is not routed to, and
// the requests its weight would have drawn are answered 500, not given to
// the other backends. So it stays in the config with its weight, port and
// the reason, without a hostname; each one is also a warning. An invalid
// mirror backend just mirrors nothing.
func TestServiceConfig_UnresolvedBackendsKeepTheirShareMarkedInvalid(t *testing.T) {
	b := world(t, Config{}, loadFixture(t, filepath.Join("testdata", "l7", "unresolved.yaml"))...)
	info := b.ServiceConfig(b.Store().Service("shop", "web"))
	sc := info.Config
	if sc == nil || len(sc.GetHttpRoutes()) != 1 || len(sc.GetGrpcRoutes()) != 1 {
		t.Fatalf("config %v", sc)
	}
	type want struct {
		ns, name string
		port     uint32
		weight   uint32
		invalid  string // substring of the reason; "" for a valid backend
	}
	check := func(what string, got []*l7.BackendRef, wants []want) {
		t.Helper()
		if len(got) != len(wants) {
			t.Fatalf("%s: %d backends, want %d: %v", what, len(got), len(wants), got)
		}
		for i, w := range wants {
			g := got[i]
			if g.GetNamespace() != w.ns || g.GetName() != w.name || g.GetPort() != w.port || g.GetWeight() != w.weight {
				t.Errorf("%s backend %d: %v, want %s/%s port %d weight %d", what, i, g, w.ns, w.name, w.port, w.weight)
			}
			switch {
			case w.invalid == "":
				if g.GetInvalid() != "" || g.GetHostname() != w.name+"."+w.ns+".svc.cluster.local" {
					t.Errorf("%s backend %d should be valid with a hostname: %v", what, i, g)
				}
			case !strings.Contains(g.GetInvalid(), w.invalid):
				t.Errorf("%s backend %d: invalid %q, want it to say %q", what, i, g.GetInvalid(), w.invalid)
			case g.GetHostname() != "" || len(g.GetFilters()) != 0:
				t.Errorf("%s backend %d: an invalid backend has no hostname and no filters: %v", what, i, g)
			}
		}
	}
	rules := sc.GetHttpRoutes()[0].GetRules()
	if len(rules) != 2 {
		t.Fatalf("rules %v", rules)
	}
	split, mirror := rules[1], rules[0] // "/mirror" ranks before "/"
	check("split", split.GetBackendRefs(), []want{
		{"shop", "v1", 80, 50, ""},
		{"shop", "v2-missing", 80, 30, "shop/v2-missing: Service not found"},
		{"db", "pg", 5432, 10, "db/pg: not permitted, no ReferenceGrant in db allows HTTPRoutes of namespace shop"},
		// Refused before existence is checked: the config does not say
		// whether db/nowhere exists.
		{"db", "nowhere", 80, 5, "not permitted"},
		{"shop", "s3", 0, 4, "only Services are supported"},
		{"shop", "v3-missing", 80, 1, "Service not found"},
		{"shop", "v4-missing", 80, 0, "Service not found"},
	})
	if f := mirror.GetFilters(); len(f) != 1 || f[0].GetRequestMirror().GetBackend().GetName() != "v1" || f[0].GetRequestMirror().GetBackend().GetInvalid() != "" {
		t.Errorf("mirror rule filters %v, want only the mirror to shop/v1", f)
	}
	check("grpc", sc.GetGrpcRoutes()[0].GetRules()[0].GetBackendRefs(), []want{
		{"shop", "v1", 9090, 1, ""},
		{"shop", "grpc-missing", 9090, 3, "Service not found"},
	})
	// One warning per invalid backend (the split rule's, the gRPC one) and
	// one for the mirror left out.
	var n int
	for _, w := range info.Warnings {
		switch {
		case strings.HasPrefix(w, "HTTPRoute shop/split rule-0: backendRef "), strings.HasPrefix(w, "GRPCRoute shop/grpc rule-0: backendRef "):
			n++
		case strings.HasPrefix(w, "HTTPRoute shop/split rule-1: mirror: backendRef shop/shadow-missing: Service not found"):
			n++
		default:
			t.Errorf("unexpected warning %q", w)
		}
	}
	if n != 8 {
		t.Errorf("%d warnings, want 8: %q", n, info.Warnings)
	}
}

// A backend's validity depends on its Service existing, so the Services
// whose routes name it must be recomputed when it comes or goes:
// BackendParents finds them through backendRefs and mirrors of both route
// kinds, matching the namespace too.
func TestBackendParents_FindsTheRoutesParentsOfABackend(t *testing.T) {
	b := world(t, Config{}, loadFixture(t, filepath.Join("testdata", "l7", "unresolved.yaml"))...)
	web := []types.NamespacedName{{Namespace: "shop", Name: "web"}}
	for _, tc := range []struct {
		ns, name string
		want     []types.NamespacedName
	}{
		{"shop", "v2-missing", web},     // HTTPRoute backendRef
		{"shop", "shadow-missing", web}, // mirror
		{"shop", "grpc-missing", web},   // GRPCRoute backendRef
		{"db", "pg", web},               // cross-namespace
		{"db", "v1", nil},               // same name, other namespace
		{"shop", "web", nil},            // only a parent
	} {
		if got := BackendParents(b.Store(), tc.ns, tc.name); !slices.Equal(got, tc.want) {
			t.Errorf("BackendParents(%s/%s) = %v, want %v", tc.ns, tc.name, got, tc.want)
		}
	}
	// Once the missing Service exists, its parent's recomputed config
	// routes to it.
	b.Store().SetService(service("shop", "v2-missing", "10.96.0.9", nil, port(80, intstr.FromInt32(80))))
	be := b.ServiceConfig(b.Store().Service("shop", "web")).Config.GetHttpRoutes()[0].GetRules()[1].GetBackendRefs()[1]
	if be.GetInvalid() != "" || be.GetHostname() != "v2-missing.shop.svc.cluster.local" || be.GetWeight() != 30 {
		t.Errorf("after the Service was created: %v", be)
	}
}
