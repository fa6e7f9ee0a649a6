package authz

import (
	"net/http"
	"net/netip"
	"testing"

	"github.com/meshlite/meshlite/proto/l7"
)

const client = "cluster.local/ns/default/sa/client"

func httpAttrs(method, path string) *Attributes {
	return &Attributes{Principal: client, Namespace: "default", SourceIP: netip.MustParseAddr("10.0.0.5"),
		DestPort: 80, HTTP: true, Method: method, Path: path, Host: "svc.default.svc.cluster.local", Header: http.Header{"X-Team": {"blue"}}}
}

func TestEvaluate_IstioOrder(t *testing.T) {
	denyAdmin := &l7.AuthorizationPolicy{Name: "deny-admin", Namespace: "default", Action: l7.AuthorizationPolicy_DENY,
		Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin*"}}}}}}
	allowGet := &l7.AuthorizationPolicy{Name: "allow-get", Namespace: "default", Action: l7.AuthorizationPolicy_ALLOW,
		Rules: []*l7.AuthorizationRule{
			{From: []*l7.Source{{Principals: []string{"cluster.local/ns/other/sa/x"}}}},
			{From: []*l7.Source{{Namespaces: []string{"default"}}}, To: []*l7.Operation{{Methods: []string{"GET", "HEAD"}}}},
		}}
	audit := &l7.AuthorizationPolicy{Name: "audit-all", Namespace: "default", Action: l7.AuthorizationPolicy_AUDIT,
		Rules: []*l7.AuthorizationRule{{}}}
	e, errs := Compile([]*l7.AuthorizationPolicy{allowGet, denyAdmin, audit})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	cases := []struct {
		a       *Attributes
		allowed bool
		policy  string
		rule    int
	}{
		{httpAttrs("GET", "/admin/users"), false, "default/deny-admin", 0},
		{httpAttrs("GET", "/"), true, "default/allow-get", 1},
		{httpAttrs("POST", "/"), false, "", -1},
	}
	for _, c := range cases {
		d := e.Evaluate(c.a)
		if d.Allowed != c.allowed || d.Policy != c.policy || d.Rule != c.rule {
			t.Errorf("%s %s: %+v, want allowed=%v policy=%s rule=%d", c.a.Method, c.a.Path, d, c.allowed, c.policy, c.rule)
		}
		if len(d.Audit) != 1 {
			t.Errorf("audit policy not reported: %+v", d)
		}
	}
}

func TestEvaluate_NoPoliciesAllowsAndEmptyAllowDeniesAll(t *testing.T) {
	var none *Engine
	if !none.Evaluate(httpAttrs("GET", "/")).Allowed {
		t.Error("no policy must allow")
	}
	e, _ := Compile([]*l7.AuthorizationPolicy{{Name: "allow-nothing", Action: l7.AuthorizationPolicy_ALLOW}})
	if e.Evaluate(httpAttrs("GET", "/")).Allowed {
		t.Error("ALLOW with no rules must deny everything")
	}
}

func TestEvaluate_NotFieldsHeadersAndIPs(t *testing.T) {
	p := &l7.AuthorizationPolicy{Name: "p", Action: l7.AuthorizationPolicy_DENY, Rules: []*l7.AuthorizationRule{{
		From: []*l7.Source{{NotPrincipals: []string{"*/sa/admin"}, IpBlocks: []string{"10.0.0.0/24"}}},
		To:   []*l7.Operation{{NotMethods: []string{"GET"}}},
		When: []*l7.Condition{{Key: "request.headers[x-team]", Values: []string{"blue"}}},
	}}}
	e, _ := Compile([]*l7.AuthorizationPolicy{p})
	if d := e.Evaluate(httpAttrs("POST", "/")); d.Allowed {
		t.Error("POST from client with x-team blue must be denied")
	}
	if d := e.Evaluate(httpAttrs("GET", "/")); !d.Allowed {
		t.Error("GET is excluded by notMethods")
	}
	a := httpAttrs("POST", "/")
	a.Header = http.Header{"X-Team": {"red"}}
	if !e.Evaluate(a).Allowed {
		t.Error("x-team red must not match the condition")
	}
	a = httpAttrs("POST", "/")
	a.SourceIP = netip.MustParseAddr("10.1.0.5")
	if !e.Evaluate(a).Allowed {
		t.Error("source outside ipBlocks must not match")
	}
	a = httpAttrs("POST", "/")
	a.Principal = "cluster.local/ns/default/sa/admin"
	if !e.Evaluate(a).Allowed {
		t.Error("notPrincipals suffix match must exclude admin")
	}
}

func TestEvaluate_TCPFailsClosed(t *testing.T) {
	allowPath := &l7.AuthorizationPolicy{Name: "allow-path", Action: l7.AuthorizationPolicy_ALLOW,
		Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/public"}}}}}}
	denyPath := &l7.AuthorizationPolicy{Name: "deny-path", Action: l7.AuthorizationPolicy_DENY,
		Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin"}, Ports: []uint32{80}}}}}}
	tcp := &Attributes{Principal: client, Namespace: "default", DestPort: 80}
	e, _ := Compile([]*l7.AuthorizationPolicy{allowPath})
	if e.Evaluate(tcp).Allowed {
		t.Error("an ALLOW rule on paths must not allow plain TCP")
	}
	e, _ = Compile([]*l7.AuthorizationPolicy{denyPath})
	if d := e.Evaluate(tcp); d.Allowed || d.Policy != "/deny-path" {
		t.Errorf("a DENY rule on paths must deny plain TCP to its port: %+v", d)
	}
	tcp.DestPort = 81
	if !e.Evaluate(tcp).Allowed {
		t.Error("DENY on port 80 must not deny port 81")
	}
}

func TestEvaluate_DryRunAndUnknownKeys(t *testing.T) {
	dry := &l7.AuthorizationPolicy{Name: "dry", Action: l7.AuthorizationPolicy_DENY, DryRun: true, Rules: []*l7.AuthorizationRule{{}}}
	e, _ := Compile([]*l7.AuthorizationPolicy{dry})
	d := e.Evaluate(httpAttrs("GET", "/"))
	if !d.Allowed || len(d.DryRun) != 1 {
		t.Errorf("dry-run deny must allow and report: %+v", d)
	}
	unk := &l7.AuthorizationPolicy{Name: "unk", Action: l7.AuthorizationPolicy_ALLOW, Rules: []*l7.AuthorizationRule{{When: []*l7.Condition{{Key: "experimental.foo", Values: []string{"x"}}}}}}
	e, errs := Compile([]*l7.AuthorizationPolicy{unk})
	if len(errs) != 1 || e.Evaluate(httpAttrs("GET", "/")).Allowed {
		t.Errorf("unknown key must be reported and fail closed: %v", errs)
	}
}
