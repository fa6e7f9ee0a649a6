package route

import (
	"net/http"
	"net/url"
	"testing"

	"github.com/meshlite/meshlite/proto/l7"
)

func httpRoute(name string, rules ...*l7.HTTPRouteRule) *l7.HTTPRoute {
	return &l7.HTTPRoute{Namespace: "default", Name: name, Rules: rules}
}

func rule(name string, matches ...*l7.HTTPRouteMatch) *l7.HTTPRouteRule {
	return &l7.HTTPRouteRule{Name: name, Matches: matches}
}

func prefix(p string) *l7.HTTPRouteMatch {
	return &l7.HTTPRouteMatch{Path: &l7.PathMatch{Type: l7.PathMatch_PATH_PREFIX, Value: p}}
}

func exact(p string) *l7.HTTPRouteMatch {
	return &l7.HTTPRouteMatch{Path: &l7.PathMatch{Type: l7.PathMatch_EXACT, Value: p}}
}

func req(method, target string, hdr ...string) *Request {
	u, _ := url.Parse(target)
	h := http.Header{}
	for i := 0; i+1 < len(hdr); i += 2 {
		h.Add(hdr[i], hdr[i+1])
	}
	return &Request{Method: method, Path: u.Path, Query: u.Query(), Header: h, Port: 80}
}

func TestMatch_GatewayAPIPrecedence(t *testing.T) {
	sc := &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{
		httpRoute("a",
			rule("catchall", prefix("/")),
			rule("v1", prefix("/v1")),
			rule("v1-exact", exact("/v1/items")),
			rule("header", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Value: "/v1"}, Headers: []*l7.HeaderMatch{{Name: "x-canary", Value: "yes"}}}),
			rule("method", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Value: "/v1"}, Method: "post"}),
			rule("query", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Value: "/v1"}, QueryParams: []*l7.QueryParamMatch{{Name: "debug", Value: "1"}}}),
			rule("regex", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Type: l7.PathMatch_REGULAR_EXPRESSION, Value: "/r/[0-9]+"}}),
			rule("header-re", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Value: "/h"}, Headers: []*l7.HeaderMatch{{Type: l7.HeaderMatch_REGULAR_EXPRESSION, Name: "X-User", Value: "ja.*"}}}),
		),
	}}
	tab, errs := Compile(sc)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	cases := []struct {
		r    *Request
		want string
	}{
		{req("GET", "/"), "catchall"},
		{req("GET", "/v1"), "v1"},
		{req("GET", "/v1/"), "v1"},
		{req("GET", "/v1/other"), "v1"},
		{req("GET", "/v10"), "catchall"}, // element-wise prefix
		{req("GET", "/v1/items"), "v1-exact"},
		{req("GET", "/v1/x", "x-canary", "yes"), "method-less header beats plain prefix"},
		{req("POST", "/v1/x"), "method"},
		{req("POST", "/v1/x", "x-canary", "yes"), "method"}, // method outranks headers
		{req("GET", "/v1/x?debug=1"), "query"},
		{req("GET", "/v1/x?debug=2"), "v1"},
		{req("GET", "/r/123"), "regex"},
		{req("GET", "/r/12a"), "catchall"}, // anchored regex
		{req("GET", "/h", "x-user", "jane"), "header-re"},
		{req("GET", "/h", "x-user", "bob"), "catchall"},
	}
	cases[6].want = "header"
	for _, c := range cases {
		m, ok := tab.Match(c.r)
		if !ok {
			t.Errorf("%s %s: no match, want %s", c.r.Method, c.r.Path, c.want)
			continue
		}
		if m.Rule.Name != c.want {
			t.Errorf("%s %s %v: matched %s, want %s", c.r.Method, c.r.Path, c.r.Header, m.Rule.Name, c.want)
		}
	}
}

func TestMatch_TiesKeepConfiguredOrderAndPorts(t *testing.T) {
	sc := &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{
		{Namespace: "default", Name: "older", Ports: []uint32{8080}, Rules: []*l7.HTTPRouteRule{rule("older", prefix("/"))}},
		httpRoute("newer", rule("newer", prefix("/"))),
	}}
	tab, _ := Compile(sc)
	r := req("GET", "/x")
	r.Port = 8080
	if m, _ := tab.Match(r); m.Rule.RouteName != "older" {
		t.Errorf("port 8080: got %s, want the older route", m.Rule.RouteName)
	}
	r.Port = 80
	if m, _ := tab.Match(r); m.Rule.RouteName != "newer" {
		t.Errorf("port 80: got %s, want newer (older is bound to 8080)", m.Rule.RouteName)
	}
	if !tab.Routed(80) || !tab.Routed(1) {
		t.Error("a route without ports routes every port")
	}
}

func TestMatch_NoRoutesMeansUnrouted(t *testing.T) {
	tab, _ := Compile(&l7.ServiceConfig{})
	if tab.Routed(80) {
		t.Error("no routes: port must be unrouted")
	}
	if _, ok := tab.Match(req("GET", "/")); ok {
		t.Error("no routes matched something")
	}
	sc := &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Name: "r", Ports: []uint32{9080}, Rules: []*l7.HTTPRouteRule{rule("x", exact("/a"))}}}}
	tab, _ = Compile(sc)
	if !tab.Routed(9080) || tab.Routed(80) {
		t.Error("routed ports wrong")
	}
}

func TestCompile_BadRegexSkipsOnlyThatMatch(t *testing.T) {
	sc := &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{httpRoute("r",
		rule("bad", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Type: l7.PathMatch_REGULAR_EXPRESSION, Value: "(["}}),
		rule("rel", &l7.HTTPRouteMatch{Path: &l7.PathMatch{Type: l7.PathMatch_EXACT, Value: "nope"}}),
		rule("good", prefix("/")),
	)}}
	tab, errs := Compile(sc)
	if len(errs) != 2 {
		t.Fatalf("errors = %v, want 2", errs)
	}
	if m, ok := tab.Match(req("GET", "/x")); !ok || m.Rule.Name != "good" {
		t.Errorf("good rule lost: %v %v", m.Rule, ok)
	}
}

func TestMatch_GRPCRoutes(t *testing.T) {
	sc := &l7.ServiceConfig{
		GrpcRoutes: []*l7.GRPCRoute{{Namespace: "default", Name: "g", Rules: []*l7.GRPCRouteRule{
			{Name: "say", Matches: []*l7.GRPCRouteMatch{{Method: &l7.GRPCMethodMatch{Service: "helloworld.Greeter", Method: "SayHello"}}}},
			{Name: "svc", Matches: []*l7.GRPCRouteMatch{{Method: &l7.GRPCMethodMatch{Service: "helloworld.Greeter"}}}},
			{Name: "re", Matches: []*l7.GRPCRouteMatch{{Method: &l7.GRPCMethodMatch{Type: l7.GRPCMethodMatch_REGULAR_EXPRESSION, Service: "echo\\..*"}}}},
		}}},
		HttpRoutes: []*l7.HTTPRoute{httpRoute("h", rule("http", prefix("/")))},
	}
	tab, errs := Compile(sc)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	for path, want := range map[string]string{
		"/helloworld.Greeter/SayHello":   "say",
		"/helloworld.Greeter/SayBye":     "svc",
		"/echo.Echo/Ping":                "re",
		"/other.Svc/M":                   "http",
		"/helloworld.Greeter/SayHello/x": "http",
	} {
		r := req("POST", path)
		r.GRPC = true
		m, ok := tab.Match(r)
		if !ok || m.Rule.Name != want {
			t.Errorf("%s: got %v, want %s", path, m.Rule, want)
		}
	}
	r := req("POST", "/helloworld.Greeter/SayHello")
	if m, _ := tab.Match(r); m.Rule.Name != "http" {
		t.Errorf("non-gRPC request matched a GRPCRoute: %s", m.Rule.Name)
	}
}

func TestRewritePath(t *testing.T) {
	full := &l7.PathModifier{Type: l7.PathModifier_REPLACE_FULL_PATH, Value: "/new"}
	pre := func(v string) *l7.PathModifier {
		return &l7.PathModifier{Type: l7.PathModifier_REPLACE_PREFIX_MATCH, Value: v}
	}
	cases := []struct {
		path, prefix string
		pm           *l7.PathModifier
		want         string
	}{
		{"/a/b", "/a", nil, "/a/b"},
		{"/a/b", "/a", full, "/new"},
		{"/foo/bar", "/foo", pre("/xyz"), "/xyz/bar"},
		{"/foo/bar", "/foo", pre("/xyz/"), "/xyz/bar"},
		{"/foo", "/foo", pre("/xyz"), "/xyz"},
		{"/foo/", "/foo", pre("/xyz"), "/xyz"},
		{"/foo/bar", "/foo", pre("/"), "/bar"},
		{"/foo", "/foo", pre("/"), "/"},
		{"/foo/bar", "/", pre("/api"), "/api/foo/bar"},
		{"/other", "/foo", pre("/x"), "/other"},
	}
	for _, c := range cases {
		if got := RewritePath(c.path, c.pm, c.prefix); got != c.want {
			t.Errorf("RewritePath(%q, %v, %q) = %q, want %q", c.path, c.pm, c.prefix, got, c.want)
		}
	}
}

func TestRedirect(t *testing.T) {
	cases := []struct {
		rr   *l7.RequestRedirect
		host string
		want string
		code int
	}{
		{&l7.RequestRedirect{Scheme: "https"}, "svc:8080", "https://svc/p?q=1", 302},
		{&l7.RequestRedirect{Hostname: "other", StatusCode: 301}, "svc:8080", "http://other:8080/p?q=1", 301},
		{&l7.RequestRedirect{Port: 80}, "svc:8080", "http://svc/p?q=1", 302},
		{&l7.RequestRedirect{Path: &l7.PathModifier{Value: "/x"}, StatusCode: 307}, "svc", "http://svc/x?q=1", 302},
	}
	for _, c := range cases {
		loc, code := Redirect(c.rr, "http", c.host, "/p", "q=1", "")
		if loc != c.want || code != c.code {
			t.Errorf("Redirect(%v) = %s %d, want %s %d", c.rr, loc, code, c.want, c.code)
		}
	}
}

func TestApplyHeaders(t *testing.T) {
	h := http.Header{"X-A": {"old"}, "X-Del": {"1"}, "X-Add": {"first"}}
	ApplyHeaders(h, &l7.HeaderModifier{
		Set:    []*l7.Header{{Name: "x-a", Value: "new"}, {Name: "bad name", Value: "v"}, {Name: "x-crlf", Value: "a\r\nb"}},
		Add:    []*l7.Header{{Name: "x-add", Value: "second"}},
		Remove: []string{"x-del"},
	})
	if h.Get("X-A") != "new" || len(h.Values("X-Add")) != 2 || h.Get("X-Del") != "" {
		t.Errorf("headers = %v", h)
	}
	if _, ok := h["Bad Name"]; ok || h.Get("X-Crlf") != "" {
		t.Errorf("invalid header let through: %v", h)
	}
}

func TestPickBackend_FollowsWeights(t *testing.T) {
	a := &l7.BackendRef{Name: "a", Weight: 90}
	b := &l7.BackendRef{Name: "b", Weight: 10}
	z := &l7.BackendRef{Name: "z", Weight: 0}
	counts := map[string]int{}
	for i := 0; i < 1000; i++ {
		counts[PickBackend([]*l7.BackendRef{a, z, b}, float64(i)/1000).GetName()]++
	}
	if counts["a"] != 900 || counts["b"] != 100 || counts["z"] != 0 {
		t.Errorf("counts = %v, want a=900 b=100", counts)
	}
	if PickBackend([]*l7.BackendRef{z}, 0.5) != nil || PickBackend(nil, 0) != nil {
		t.Error("no positive weight must pick nothing")
	}
	if PickBackend([]*l7.BackendRef{a}, 1.0) != a {
		t.Error("r=1.0 must stay in range")
	}
}
