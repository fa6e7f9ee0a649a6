package model

import (
	"testing"

	"google.golang.org/protobuf/types/known/emptypb"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/meshlite/meshlite/proto/security"
)

func decodeYAML(t *testing.T, y string) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	j, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	if err := u.UnmarshalJSON(j); err != nil {
		t.Fatal(err)
	}
	return u
}

func apFromYAML(t *testing.T, y string) *AuthorizationPolicy {
	t.Helper()
	p, err := DecodeAuthorizationPolicy(decodeYAML(t, y))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var presence = &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}

func TestAuthorization_FromAuthorizationPolicy(t *testing.T) {
	for _, tc := range []struct {
		name     string
		yaml     string
		want     *security.Authorization
		warnings int
	}{
		{"allow nothing (no rules)", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}`, &security.Authorization{Name: "deny-all", Namespace: "shop", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW}, 0},
		{"allow all (one empty rule), root namespace is GLOBAL", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: istio-system}
spec: {rules: [{}]}`, &security.Authorization{Name: "allow-all", Namespace: "istio-system", Scope: security.Scope_GLOBAL,
			Action: security.Action_ALLOW, Groups: []*security.Group{{Rules: []*security.Rules{}}}}, 0},
		{"sources, ports and conditions", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/front", "*"]
        notNamespaces: ["dev*", "*-test"]
        ipBlocks: ["10.0.0.0/8", "192.168.1.7", "garbage"]
        notIpBlocks: ["fd00::/64"]
    - source: {namespaces: [ops]}
    to:
    - operation: {ports: ["8080", "99999", "x"], notPorts: ["9090"]}
    when:
    - key: source.ip
      values: ["10.1.2.3"]
    - key: destination.port
      notValues: ["22"]
    - key: source.principal
      values: ["cluster.local/ns/a/sa/b"]
`, &security.Authorization{Name: "web", Namespace: "shop", Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
			Groups: []*security.Group{{Rules: []*security.Rules{
				{Matches: []*security.Match{{DestinationPorts: []uint32{8080}, NotDestinationPorts: []uint32{9090}}}},
				{Matches: []*security.Match{
					{
						Principals: []*security.StringMatch{exact("cluster.local/ns/shop/sa/front"), presence},
						NotNamespaces: []*security.StringMatch{
							{MatchType: &security.StringMatch_Prefix{Prefix: "dev"}},
							{MatchType: &security.StringMatch_Suffix{Suffix: "-test"}},
						},
						SourceIps:    []*security.Address{{Address: ip("10.0.0.0"), Length: 8}, {Address: ip("192.168.1.7"), Length: 32}},
						NotSourceIps: []*security.Address{{Address: ip("fd00::"), Length: 64}},
					},
					{Namespaces: []*security.StringMatch{exact("ops")}},
				}},
				{Matches: []*security.Match{{SourceIps: []*security.Address{{Address: ip("10.1.2.3"), Length: 32}}}}},
				{Matches: []*security.Match{{NotDestinationPorts: []uint32{22}}}},
				{Matches: []*security.Match{{Principals: []*security.StringMatch{exact("cluster.local/ns/a/sa/b")}}}},
			}}}}, 0},
		{"service accounts default to the policy namespace", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sa, namespace: shop}
spec:
  rules:
  - from:
    - source: {serviceAccounts: ["front", "ops/admin"]}
`, &security.Authorization{Name: "sa", Namespace: "shop", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{ServiceAccounts: []*security.ServiceAccountMatch{
				{Namespace: "shop", ServiceAccount: "front"}, {Namespace: "ops", ServiceAccount: "admin"}}}}}}}}}, 0},
		{"ALLOW rule with HTTP fields is dropped, others kept", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: [GET], ports: ["80"]}}]
  - from: [{source: {requestPrincipals: ["*"]}}]
  - when: [{key: "request.headers[x]", values: ["y"]}]
  - to: [{operation: {ports: ["81"]}}]
`, &security.Authorization{Name: "l7", Namespace: "shop", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{DestinationPorts: []uint32{81}}}}}}}}, 3},
		{"DENY rule with HTTP fields is kept without them", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7deny, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: ["80"]}}]
`, &security.Authorization{Name: "l7deny", Namespace: "shop", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{DestinationPorts: []uint32{80}}}}}}}}, 1},
		{"targetRefs are for waypoints", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: wp, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{}]
`, nil, 0},
		{"CUSTOM is not ztunnel's", `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec: {action: CUSTOM, provider: {name: x}, rules: [{}]}
`, nil, 1},
	} {
		b := world(t, Config{})
		got := b.Authorization(apFromYAML(t, tc.yaml))
		assertProto(t, tc.name, got.Authorization, tc.want)
		if len(got.Warnings) != tc.warnings {
			t.Errorf("%s: warnings %v, want %d", tc.name, got.Warnings, tc.warnings)
		}
	}
}

func TestDecodeAuthorizationPolicy_RejectsBadSpec(t *testing.T) {
	for _, y := range []string{
		"kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: x, namespace: ns1}\nspec: [1, 2]",
		"kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: x, namespace: ns1}\nspec: {action: NOPE}",
		"kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: x, namespace: ns1}\nspec: {rules: {a: b}}",
	} {
		if _, err := DecodeAuthorizationPolicy(decodeYAML(t, y)); err == nil {
			t.Errorf("decoding %q: no error", y)
		}
	}
}

func TestPeerAuthentication_StrictModes(t *testing.T) {
	strictKey := "istio-system/istio_converted_static_strict"
	wl := map[string]string{"app": "web"}
	for _, tc := range []struct {
		name string
		pas  []*PeerAuthentication
		want []string
	}{
		{"none", nil, nil},
		{"mesh STRICT", []*PeerAuthentication{peerAuth("istio-system", "default", 0, nil, "STRICT", nil)}, []string{strictKey}},
		{"mesh STRICT, namespace PERMISSIVE", []*PeerAuthentication{
			peerAuth("istio-system", "default", 0, nil, "STRICT", nil), peerAuth("a", "ns", 0, nil, "PERMISSIVE", nil)}, nil},
		{"mesh STRICT, namespace UNSET inherits", []*PeerAuthentication{
			peerAuth("istio-system", "default", 0, nil, "STRICT", nil), peerAuth("a", "ns", 0, nil, "", nil)}, []string{strictKey}},
		{"namespace STRICT, workload PERMISSIVE", []*PeerAuthentication{
			peerAuth("a", "ns", 0, nil, "STRICT", nil), peerAuth("a", "web", 0, wl, "PERMISSIVE", nil)}, nil},
		{"workload STRICT", []*PeerAuthentication{peerAuth("a", "web", 0, wl, "STRICT", nil)}, []string{strictKey}},
		{"workload selector not matching", []*PeerAuthentication{peerAuth("a", "db", 0, map[string]string{"app": "db"}, "STRICT", nil)}, nil},
		{"oldest namespace policy wins", []*PeerAuthentication{
			peerAuth("a", "newer", 5, nil, "PERMISSIVE", nil), peerAuth("a", "older", 1, nil, "STRICT", nil)}, []string{strictKey}},
		{"workload STRICT with a PERMISSIVE port", []*PeerAuthentication{
			peerAuth("a", "web", 0, wl, "STRICT", map[uint32]string{8080: "PERMISSIVE"})}, []string{"a/converted_peer_authentication_web"}},
		{"workload PERMISSIVE with a STRICT port", []*PeerAuthentication{
			peerAuth("a", "web", 0, wl, "PERMISSIVE", map[uint32]string{9090: "STRICT"})}, []string{"a/converted_peer_authentication_web"}},
		{"other namespace's policy", []*PeerAuthentication{peerAuth("b", "ns", 0, nil, "STRICT", nil)}, nil},
	} {
		objs := []any{ns("a", nil)}
		for _, p := range tc.pas {
			objs = append(objs, p)
		}
		b := world(t, Config{}, objs...)
		got := b.peerAuthenticationKeys("a", wl)
		if len(got) != len(tc.want) || (len(got) > 0 && got[0] != tc.want[0]) {
			t.Errorf("%s: keys %v, want %v", tc.name, got, tc.want)
		}
		if b.HasStaticStrict() != (len(tc.pas) > 0) {
			t.Errorf("%s: HasStaticStrict = %v with %d policies", tc.name, b.HasStaticStrict(), len(tc.pas))
		}
	}
}

func TestPeerAuthorization_PortLevelConversions(t *testing.T) {
	wl := map[string]string{"app": "web"}
	noID := func(ports ...uint32) *security.Match {
		return &security.Match{NotPrincipals: []*security.StringMatch{presence}, DestinationPorts: ports}
	}
	for _, tc := range []struct {
		name   string
		others []*PeerAuthentication
		pa     *PeerAuthentication
		want   *security.Authorization
	}{
		{"STRICT with a PERMISSIVE port: deny no-identity except on that port", nil,
			peerAuth("a", "web", 0, wl, "STRICT", map[uint32]string{8080: "PERMISSIVE"}),
			&security.Authorization{Name: "converted_peer_authentication_web", Namespace: "a", Scope: security.Scope_WORKLOAD_SELECTOR,
				Action: security.Action_DENY, Groups: []*security.Group{{Rules: []*security.Rules{
					{Matches: []*security.Match{noID()}},
					{Matches: []*security.Match{{NotDestinationPorts: []uint32{8080}}}},
				}}}}},
		{"PERMISSIVE with STRICT ports: one group per port", nil,
			peerAuth("a", "web", 0, wl, "PERMISSIVE", map[uint32]string{9090: "STRICT", 9091: "STRICT"}),
			&security.Authorization{Name: "converted_peer_authentication_web", Namespace: "a", Scope: security.Scope_WORKLOAD_SELECTOR,
				Action: security.Action_DENY, Groups: []*security.Group{
					{Rules: []*security.Rules{{Matches: []*security.Match{noID(9090)}}}},
					{Rules: []*security.Rules{{Matches: []*security.Match{noID(9091)}}}},
				}}},
		{"UNSET under a STRICT namespace with a PERMISSIVE port merges the strictness",
			[]*PeerAuthentication{peerAuth("a", "ns", 0, nil, "STRICT", nil)},
			peerAuth("a", "web", 1, wl, "", map[uint32]string{8080: "PERMISSIVE"}),
			&security.Authorization{Name: "converted_peer_authentication_web", Namespace: "a", Scope: security.Scope_WORKLOAD_SELECTOR,
				Action: security.Action_DENY, Groups: []*security.Group{{Rules: []*security.Rules{
					{Matches: []*security.Match{{NotDestinationPorts: []uint32{8080}}}},
					{Matches: []*security.Match{noID()}},
				}}}}},
		{"plain STRICT needs no derived policy", nil, peerAuth("a", "web", 0, wl, "STRICT", map[uint32]string{8080: "STRICT"}), nil},
		{"namespace-wide policy needs none", nil, peerAuth("a", "ns", 0, nil, "STRICT", map[uint32]string{8080: "PERMISSIVE"}), nil},
		{"root namespace needs none", nil, peerAuth("istio-system", "web", 0, wl, "STRICT", map[uint32]string{8080: "PERMISSIVE"}), nil},
		{"UNSET with a PERMISSIVE port and nothing strict above needs none", nil,
			peerAuth("a", "web", 0, wl, "", map[uint32]string{8080: "PERMISSIVE"}), nil},
	} {
		objs := []any{tc.pa}
		for _, p := range tc.others {
			objs = append(objs, p)
		}
		b := world(t, Config{}, objs...)
		assertProto(t, tc.name, b.PeerAuthorization(tc.pa), tc.want)
	}
	b := world(t, Config{})
	assertProto(t, "static strict", b.StaticStrictPolicy(), &security.Authorization{
		Name: "istio_converted_static_strict", Namespace: "istio-system", Scope: security.Scope_WORKLOAD_SELECTOR,
		Action: security.Action_DENY, Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{noID()}}}}},
	})
}
