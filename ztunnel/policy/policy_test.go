package policy

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/meshlite/meshlite/proto/security"
)

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}
func prefix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: s}}
}
func suffix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: s}}
}
func presence() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}
func cidr(s string) *security.Address {
	p := netip.MustParsePrefix(s)
	return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
}

// one builds a policy with one group of one clause of one match.
func one(action security.Action, m *security.Match) *security.Authorization {
	return &security.Authorization{Name: "p", Namespace: "ns", Action: action,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{m}}}}}}
}

func mustCompile(t *testing.T, a *security.Authorization) *Policy {
	t.Helper()
	p, err := Compile(a)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return p
}

var (
	sleepID   = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/sleep")
	otherTDID = spiffeid.RequireFromString("spiffe://other.td/ns/default/sa/sleep")
	prodID    = spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/api")
	oddID     = spiffeid.RequireFromString("spiffe://cluster.local/custom/path")
	srcIP     = netip.MustParseAddr("10.0.1.5")
	dst       = netip.MustParseAddrPort("10.0.2.7:8080")
)

func conn(id spiffeid.ID) Conn { return NewConn(srcIP, dst, id) }

func TestMatch_Fields(t *testing.T) {
	none := spiffeid.ID{}
	tests := []struct {
		name string
		m    *security.Match
		id   spiffeid.ID
		c    *Conn // overrides id when set
		want bool
	}{
		{"principal exact", &security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}}, sleepID, nil, true},
		{"principal exact other sa", &security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}}, prodID, nil, false},
		{"principal exact is trust-domain aware", &security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}}, otherTDID, nil, false},
		{"principal with scheme never matches", &security.Match{Principals: []*security.StringMatch{exact("spiffe://cluster.local/ns/default/sa/sleep")}}, sleepID, nil, false},
		{"principal prefix", &security.Match{Principals: []*security.StringMatch{prefix("cluster.local/ns/default/")}}, sleepID, nil, true},
		{"principal prefix miss", &security.Match{Principals: []*security.StringMatch{prefix("cluster.local/ns/prod/")}}, sleepID, nil, false},
		{"principal suffix", &security.Match{Principals: []*security.StringMatch{suffix("/sa/sleep")}}, otherTDID, nil, true},
		{"principal suffix miss", &security.Match{Principals: []*security.StringMatch{suffix("/sa/api")}}, sleepID, nil, false},
		{"principal presence with identity", &security.Match{Principals: []*security.StringMatch{presence()}}, sleepID, nil, true},
		{"principal presence without identity", &security.Match{Principals: []*security.StringMatch{presence()}}, none, nil, false},
		{"principal any of", &security.Match{Principals: []*security.StringMatch{exact("x"), suffix("sa/api")}}, prodID, nil, true},
		{"not principal presence without identity", &security.Match{NotPrincipals: []*security.StringMatch{presence()}}, none, nil, true},
		{"not principal presence with identity", &security.Match{NotPrincipals: []*security.StringMatch{presence()}}, sleepID, nil, false},
		{"not principal exact other", &security.Match{NotPrincipals: []*security.StringMatch{exact("cluster.local/ns/prod/sa/api")}}, sleepID, nil, true},
		{"not principal exact same", &security.Match{NotPrincipals: []*security.StringMatch{exact("cluster.local/ns/prod/sa/api")}}, prodID, nil, false},
		{"namespace exact", &security.Match{Namespaces: []*security.StringMatch{exact("default")}}, sleepID, nil, true},
		{"namespace exact miss", &security.Match{Namespaces: []*security.StringMatch{exact("default")}}, prodID, nil, false},
		{"namespace prefix", &security.Match{Namespaces: []*security.StringMatch{prefix("pro")}}, prodID, nil, true},
		{"namespace without identity", &security.Match{Namespaces: []*security.StringMatch{presence()}}, none, nil, false},
		{"namespace of a non-workload id", &security.Match{Namespaces: []*security.StringMatch{presence()}}, oddID, nil, false},
		{"not namespace", &security.Match{NotNamespaces: []*security.StringMatch{exact("prod")}}, sleepID, nil, true},
		{"not namespace hit", &security.Match{NotNamespaces: []*security.StringMatch{exact("prod")}}, prodID, nil, false},
		{"service account", &security.Match{ServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "default", ServiceAccount: "sleep"}}}, sleepID, nil, true},
		{"service account other ns", &security.Match{ServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "prod", ServiceAccount: "sleep"}}}, sleepID, nil, false},
		{"service account without identity", &security.Match{ServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "", ServiceAccount: ""}}}, none, nil, false},
		{"not service account without identity", &security.Match{NotServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "default", ServiceAccount: "sleep"}}}, none, nil, true},
		{"not service account hit", &security.Match{NotServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "default", ServiceAccount: "sleep"}}}, sleepID, nil, false},
		{"source ip cidr", &security.Match{SourceIps: []*security.Address{cidr("10.0.1.0/24")}}, none, nil, true},
		{"source ip host", &security.Match{SourceIps: []*security.Address{cidr("10.0.1.5/32")}}, none, nil, true},
		{"source ip miss", &security.Match{SourceIps: []*security.Address{cidr("10.0.9.0/24")}}, none, nil, false},
		{"source ip v6 vs v4", &security.Match{SourceIps: []*security.Address{cidr("::/0")}}, none, nil, false},
		{"source ip v4-mapped source unmapped", &security.Match{SourceIps: []*security.Address{cidr("10.0.1.0/24")}}, none,
			&Conn{Src: netip.MustParseAddr("::ffff:10.0.1.5").Unmap(), Dst: dst}, true},
		{"not source ip", &security.Match{NotSourceIps: []*security.Address{cidr("10.0.1.0/24")}}, none, nil, false},
		{"not source ip miss", &security.Match{NotSourceIps: []*security.Address{cidr("10.9.0.0/16")}}, none, nil, true},
		{"destination ip", &security.Match{DestinationIps: []*security.Address{cidr("10.0.2.7/32")}}, none, nil, true},
		{"destination ip miss", &security.Match{DestinationIps: []*security.Address{cidr("10.0.3.0/24")}}, none, nil, false},
		{"not destination ip", &security.Match{NotDestinationIps: []*security.Address{cidr("10.0.0.0/8")}}, none, nil, false},
		{"destination port", &security.Match{DestinationPorts: []uint32{9090, 8080}}, none, nil, true},
		{"destination port miss", &security.Match{DestinationPorts: []uint32{9090}}, none, nil, false},
		{"not destination port", &security.Match{NotDestinationPorts: []uint32{8080}}, none, nil, false},
		{"not destination port miss", &security.Match{NotDestinationPorts: []uint32{9090}}, none, nil, true},
		{"all fields must match", &security.Match{Namespaces: []*security.StringMatch{exact("default")}, DestinationPorts: []uint32{9090}}, sleepID, nil, false},
		{"all fields match", &security.Match{Namespaces: []*security.StringMatch{exact("default")}, DestinationPorts: []uint32{8080},
			SourceIps: []*security.Address{cidr("10.0.0.0/8")}, Principals: []*security.StringMatch{suffix("sleep")}}, sleepID, nil, true},
		{"positive and negative together", &security.Match{Namespaces: []*security.StringMatch{prefix("")}, NotNamespaces: []*security.StringMatch{exact("default")}}, sleepID, nil, false},
		{"empty match matches nothing", &security.Match{}, sleepID, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustCompile(t, one(security.Action_ALLOW, tt.m))
			c := conn(tt.id)
			if tt.c != nil {
				c = *tt.c
			}
			rule, got := p.Match(&c)
			if got != tt.want {
				t.Fatalf("Match = %v, want %v", got, tt.want)
			}
			if got && rule != 0 || !got && rule != -1 {
				t.Fatalf("rule = %d", rule)
			}
		})
	}
}

func TestMatch_Structure(t *testing.T) {
	port := func(p uint32) *security.Match { return &security.Match{DestinationPorts: []uint32{p}} }
	hit, miss := port(8080), port(1)
	tests := []struct {
		name     string
		groups   []*security.Group
		want     bool
		wantRule int
	}{
		{"no groups matches nothing", nil, false, -1},
		{"group without clauses matches all", []*security.Group{{}}, true, 0},
		{"clause without matches constrains nothing", []*security.Group{{Rules: []*security.Rules{{}, {Matches: []*security.Match{hit}}}}}, true, 0},
		{"clause with only an empty match fails", []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{}}}}}}, false, -1},
		{"any match in a clause", []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{miss, hit}}}}}, true, 0},
		{"all clauses of a group", []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{hit}}, {Matches: []*security.Match{miss}}}}}, false, -1},
		{"any group, index of the first that matches", []*security.Group{
			{Rules: []*security.Rules{{Matches: []*security.Match{miss}}}},
			{Rules: []*security.Rules{{Matches: []*security.Match{hit}}}},
			{Rules: []*security.Rules{{Matches: []*security.Match{hit}}}},
		}, true, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustCompile(t, &security.Authorization{Name: "p", Namespace: "ns", Groups: tt.groups})
			c := conn(sleepID)
			rule, got := p.Match(&c)
			if got != tt.want || rule != tt.wantRule {
				t.Fatalf("Match = %v rule %d, want %v rule %d", got, rule, tt.want, tt.wantRule)
			}
		})
	}
}

func TestCompile_RejectsMalformed(t *testing.T) {
	tests := []struct {
		name string
		a    *security.Authorization
		want string
	}{
		{"nil", nil, "nil"},
		{"no name", &security.Authorization{Namespace: "ns"}, "without a name"},
		{"unknown scope", &security.Authorization{Name: "p", Scope: 7}, "unknown scope"},
		{"unknown action", &security.Authorization{Name: "p", Action: 9}, "unknown action"},
		{"empty string match", one(security.Action_ALLOW, &security.Match{Principals: []*security.StringMatch{{}}}), "principals"},
		{"3-byte address", one(security.Action_DENY, &security.Match{SourceIps: []*security.Address{{Address: []byte{1, 2, 3}}}}), "source_ips"},
		{"prefix too long", one(security.Action_DENY, &security.Match{NotDestinationIps: []*security.Address{{Address: []byte{1, 2, 3, 4}, Length: 33}}}), "not_destination_ips"},
		{"port too big", one(security.Action_ALLOW, &security.Match{DestinationPorts: []uint32{65536}}), "destination_ports"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(tt.a)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestNewConn(t *testing.T) {
	c := NewConn(netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddrPort("[::ffff:10.0.0.2]:80"), sleepID)
	if c.Principal != "cluster.local/ns/default/sa/sleep" || c.Namespace != "default" || c.ServiceAccount != "sleep" {
		t.Fatalf("conn = %+v", c)
	}
	if c.Src != netip.MustParseAddr("10.0.0.1") || c.Dst != netip.MustParseAddrPort("10.0.0.2:80") {
		t.Fatalf("addresses not unmapped: %+v", c)
	}
	c = NewConn(srcIP, dst, oddID)
	if c.Principal != "cluster.local/custom/path" || c.Namespace != "" || c.ServiceAccount != "" {
		t.Fatalf("odd id conn = %+v", c)
	}
	c = NewConn(srcIP, dst, spiffeid.RequireFromString("spiffe://td/ns/a/sa/b/c"))
	if c.Namespace != "" {
		t.Fatalf("nested path gave namespace %q", c.Namespace)
	}
}

func pol(name string, action security.Action, dry bool, m *security.Match) *security.Authorization {
	a := one(action, m)
	a.Name, a.DryRun = name, dry
	return a
}

// staticStrict is the policy istiod-lite publishes for PeerAuthentication STRICT.
func staticStrict() *security.Authorization {
	return &security.Authorization{Name: "istio_converted_static_strict", Namespace: "istio-system",
		Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{NotPrincipals: []*security.StringMatch{presence()}}}}}}}}
}

func TestEvaluate(t *testing.T) {
	allowSleep := pol("allow-sleep", security.Action_ALLOW, false, &security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}})
	allowProd := pol("allow-prod", security.Action_ALLOW, false, &security.Match{Namespaces: []*security.StringMatch{exact("prod")}})
	deny8080 := pol("deny-8080", security.Action_DENY, false, &security.Match{DestinationPorts: []uint32{8080}})
	denyProd := pol("deny-prod", security.Action_DENY, false, &security.Match{Namespaces: []*security.StringMatch{exact("prod")}})
	dryDeny := pol("dry-deny", security.Action_DENY, true, &security.Match{DestinationPorts: []uint32{8080}})
	dryAllowNone := pol("dry-allow", security.Action_ALLOW, true, &security.Match{DestinationPorts: []uint32{1}})
	emptyAllow := &security.Authorization{Name: "allow-nothing", Namespace: "ns"}

	tests := []struct {
		name    string
		pols    []*security.Authorization
		missing []string
		id      spiffeid.ID
		want    Decision
	}{
		{"no policies allow", nil, nil, sleepID, Decision{Allow: true, Rule: -1, Reason: ReasonNoAllowPolicies}},
		{"allow matches", []*security.Authorization{allowProd, allowSleep}, nil, sleepID, Decision{Allow: true, Policy: "ns/allow-sleep", Rule: 0, Reason: ReasonAllowMatched}},
		{"allow present, none matches", []*security.Authorization{allowSleep}, nil, prodID, Decision{Rule: -1, Reason: ReasonNoAllowMatched}},
		{"allow without rules denies all", []*security.Authorization{emptyAllow}, nil, sleepID, Decision{Rule: -1, Reason: ReasonNoAllowMatched}},
		{"deny before allow", []*security.Authorization{allowSleep, deny8080}, nil, sleepID, Decision{Policy: "ns/deny-8080", Rule: 0, Reason: ReasonDenyMatched}},
		{"deny not matching, allow decides", []*security.Authorization{denyProd, allowSleep}, nil, sleepID, Decision{Allow: true, Policy: "ns/allow-sleep", Rule: 0, Reason: ReasonAllowMatched}},
		{"deny only, not matching", []*security.Authorization{denyProd}, nil, sleepID, Decision{Allow: true, Rule: -1, Reason: ReasonNoAllowPolicies}},
		{"dry-run deny not enforced", []*security.Authorization{dryDeny}, nil, sleepID, Decision{Allow: true, Rule: -1, Reason: ReasonNoAllowPolicies}},
		{"dry-run allow does not make allow required", []*security.Authorization{dryAllowNone}, nil, sleepID, Decision{Allow: true, Rule: -1, Reason: ReasonNoAllowPolicies}},
		{"strict denies plaintext", []*security.Authorization{staticStrict()}, nil, spiffeid.ID{}, Decision{Policy: "istio-system/istio_converted_static_strict", Rule: 0, Reason: ReasonDenyMatched}},
		{"strict allows mTLS", []*security.Authorization{staticStrict()}, nil, sleepID, Decision{Allow: true, Rule: -1, Reason: ReasonNoAllowPolicies}},
		{"missing listed policy fails closed", []*security.Authorization{allowSleep}, []string{"ns/gone"}, sleepID, Decision{Policy: "ns/gone", Rule: -1, Reason: ReasonMissingPolicy}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ps []*Policy
			for _, a := range tt.pols {
				ps = append(ps, mustCompile(t, a))
			}
			c := conn(tt.id)
			got := Evaluate(slog.New(slog.DiscardHandler), &c, ps, tt.missing)
			if got != tt.want {
				t.Fatalf("Evaluate = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestEvaluate_LogsDryRunAndDenials(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	p := mustCompile(t, pol("dry-deny", security.Action_DENY, true, &security.Match{DestinationPorts: []uint32{8080}}))
	deny := mustCompile(t, pol("deny-all", security.Action_DENY, false, &security.Match{NotPrincipals: []*security.StringMatch{exact("nobody")}}))
	c := conn(sleepID)
	d := Evaluate(log, &c, []*Policy{p, deny}, nil)
	Log(log, &c, "default/httpbin-1", d)
	out := buf.String()
	for _, want := range []string{
		"dry-run policy matched", "policy=ns/dry-deny",
		"connection denied by policy", "src.identity=spiffe://cluster.local/ns/default/sa/sleep", "src.ip=10.0.1.5",
		"dst.workload=default/httpbin-1", "dst=10.0.2.7:8080", "policy=ns/deny-all", "rule=0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func BenchmarkEvaluate(b *testing.B) {
	ps := []*Policy{}
	for _, a := range []*security.Authorization{
		staticStrict(),
		pol("deny-prod", security.Action_DENY, false, &security.Match{Namespaces: []*security.StringMatch{exact("prod")}}),
		pol("allow-sleep", security.Action_ALLOW, false, &security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}, DestinationPorts: []uint32{8080}}),
	} {
		p, err := Compile(a)
		if err != nil {
			b.Fatal(err)
		}
		ps = append(ps, p)
	}
	c := conn(sleepID)
	log := slog.New(slog.DiscardHandler)
	b.ReportAllocs()
	for b.Loop() {
		if d := Evaluate(log, &c, ps, nil); !d.Allow {
			b.Fatal("denied")
		}
	}
}
