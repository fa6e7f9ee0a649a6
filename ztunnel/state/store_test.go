package state

import (
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/policy"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

type wlOpt func(*workload.Workload)

func hbone(w *workload.Workload)     { w.TunnelProtocol = workload.TunnelProtocol_HBONE }
func unhealthy(w *workload.Workload) { w.Status = workload.WorkloadStatus_UNHEALTHY }
func inService(key string, ports ...uint32) wlOpt {
	return func(w *workload.Workload) {
		if w.Services == nil {
			w.Services = map[string]*workload.PortList{}
		}
		pl := &workload.PortList{}
		for i := 0; i+1 < len(ports); i += 2 {
			pl.Ports = append(pl.Ports, &workload.Port{ServicePort: ports[i], TargetPort: ports[i+1]})
		}
		w.Services[key] = pl
	}
}
func zone(region, z string) wlOpt {
	return func(w *workload.Workload) { w.Locality = &workload.Locality{Region: region, Zone: z} }
}
func wpHost(ns, host string) *workload.GatewayAddress {
	return &workload.GatewayAddress{Destination: &workload.GatewayAddress_Hostname{Hostname: &workload.NamespacedHostname{Namespace: ns, Hostname: host}}, HboneMtlsPort: 15008}
}
func withWaypoint(g *workload.GatewayAddress) wlOpt {
	return func(w *workload.Workload) { w.Waypoint = g }
}
func listing(keys ...string) wlOpt {
	return func(w *workload.Workload) { w.AuthorizationPolicies = keys }
}

func wl(ns, name, addr string, opts ...wlOpt) *workload.Workload {
	w := &workload.Workload{Uid: "Kubernetes//Pod/" + ns + "/" + name, Name: name, Namespace: ns, ServiceAccount: name}
	if addr != "" {
		w.Addresses = [][]byte{ip(addr)}
	}
	for _, o := range opts {
		o(w)
	}
	return w
}

func svc(ns, name, vip string, ports ...uint32) *workload.Service {
	s := &workload.Service{Name: name, Namespace: ns, Hostname: name + "." + ns + ".svc.cluster.local"}
	if vip != "" {
		s.Addresses = []*workload.NetworkAddress{{Address: ip(vip)}}
	}
	for i := 0; i+1 < len(ports); i += 2 {
		s.Ports = append(s.Ports, &workload.Port{ServicePort: ports[i], TargetPort: ports[i+1]})
	}
	return s
}

func wlAddr(w *workload.Workload) NamedAddress {
	return NamedAddress{Name: w.Uid, Address: &workload.Address{Type: &workload.Address_Workload{Workload: w}}}
}
func svcAddr(s *workload.Service) NamedAddress {
	return NamedAddress{Name: ServiceKey(s), Address: &workload.Address{Type: &workload.Address_Service{Service: s}}}
}

func mustApply(t testing.TB, s *Store, addrs ...NamedAddress) {
	t.Helper()
	if err := s.ApplyAddresses(addrs, nil); err != nil {
		t.Fatalf("apply: %v", err)
	}
}

const echoKey = "default/echo.default.svc.cluster.local"

func TestApply_IndexesLookupsAndRemovals(t *testing.T) {
	s := New(nil)
	a := wl("default", "a", "10.0.1.1", hbone, inService(echoKey, 80, 8080))
	b := wl("default", "b", "10.0.1.2", hbone, inService(echoKey, 80, 8080))
	echo := svc("default", "echo", "10.96.0.10", 80, 8080)
	mustApply(t, s, wlAddr(a), wlAddr(b), svcAddr(echo))

	if got := s.Workload(a.Uid); got != a {
		t.Fatalf("by uid: %v", got)
	}
	if got := s.WorkloadByIP("", netip.MustParseAddr("10.0.1.2")); got != b {
		t.Fatalf("by ip: %v", got)
	}
	if got := s.WorkloadByIP("", netip.MustParseAddr("::ffff:10.0.1.2")); got != b {
		t.Fatalf("by v4-mapped ip: %v", got)
	}
	if got := s.WorkloadByIP("other-net", netip.MustParseAddr("10.0.1.2")); got != nil {
		t.Fatalf("ip found in another network: %v", got)
	}
	if got := s.Service(echoKey); got != echo {
		t.Fatalf("by key: %v", got)
	}
	if got := s.ServiceByVIP("", netip.MustParseAddr("10.96.0.10"), "x"); got != echo {
		t.Fatalf("by vip: %v", got)
	}
	if n := len(s.Endpoints(echoKey)); n != 2 {
		t.Fatalf("endpoints = %d", n)
	}

	// b moves to a new IP: the old one is no longer indexed.
	b2 := wl("default", "b", "10.0.1.3", hbone, inService(echoKey, 80, 8080))
	mustApply(t, s, wlAddr(b2))
	if s.WorkloadByIP("", netip.MustParseAddr("10.0.1.2")) != nil || s.WorkloadByIP("", netip.MustParseAddr("10.0.1.3")) != b2 {
		t.Fatal("address index not updated")
	}
	if eps := s.Endpoints(echoKey); len(eps) != 2 || eps[1] != b2 {
		t.Fatalf("endpoints after update = %v", eps)
	}

	// Removal by resource name, both kinds, and of an unknown name.
	if err := s.ApplyAddresses(nil, []string{a.Uid, echoKey, "no/such"}); err != nil {
		t.Fatal(err)
	}
	if s.Workload(a.Uid) != nil || s.WorkloadByIP("", netip.MustParseAddr("10.0.1.1")) != nil {
		t.Fatal("workload a still present")
	}
	if s.Service(echoKey) != nil || s.ServiceByVIP("", netip.MustParseAddr("10.96.0.10"), "") != nil {
		t.Fatal("service still present")
	}
	if eps := s.Endpoints(echoKey); len(eps) != 1 || eps[0] != b2 {
		t.Fatalf("endpoints after removal = %v", eps)
	}
}

func TestApply_HostNetworkWorkloadNotIndexedByIP(t *testing.T) {
	s := New(nil)
	w := wl("kube-system", "node-agent", "192.168.0.2")
	w.NetworkMode = workload.NetworkMode_HOST_NETWORK
	mustApply(t, s, wlAddr(w))
	if s.WorkloadByIP("", netip.MustParseAddr("192.168.0.2")) != nil {
		t.Fatal("host-network workload found by the node's IP")
	}
	if s.Workload(w.Uid) == nil {
		t.Fatal("host-network workload not stored")
	}
}

func TestApply_RejectsBadPushWhole(t *testing.T) {
	tests := []struct {
		name string
		bad  NamedAddress
		want string
	}{
		{"workload without uid", NamedAddress{Name: "x", Address: &workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{}}}}, "without uid"},
		{"bad workload address", wlAddr(&workload.Workload{Uid: "u", Addresses: [][]byte{{1, 2, 3}}}), "3 bytes"},
		{"service without hostname", svcAddr(&workload.Service{Namespace: "ns"}), "without hostname"},
		{"bad VIP", svcAddr(&workload.Service{Namespace: "ns", Hostname: "h", Addresses: []*workload.NetworkAddress{{Address: []byte{1}}}}), "1 bytes"},
		{"empty address", NamedAddress{Name: "x", Address: &workload.Address{}}, "neither"},
		{"waypoint without destination", wlAddr(&workload.Workload{Uid: "u", Waypoint: &workload.GatewayAddress{}}), "without destination"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(nil)
			good := wl("default", "good", "10.0.0.1")
			err := s.ApplyAddresses([]NamedAddress{wlAddr(good), tt.bad}, []string{"anything"})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
			if s.Workload(good.Uid) != nil || s.Version() != 0 {
				t.Fatal("part of a rejected push was applied")
			}
		})
	}
}

func TestApply_DeltaResources(t *testing.T) {
	s := New(nil)
	w := wl("default", "a", "10.0.1.1")
	body, err := anypb.New(&workload.Address{Type: &workload.Address_Workload{Workload: w}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(xds.TypeAddress, []*discovery.Resource{{Name: w.Uid, Resource: body}}, nil); err != nil {
		t.Fatal(err)
	}
	if s.Workload(w.Uid) == nil {
		t.Fatal("workload not applied")
	}
	pol, _ := anypb.New(&security.Authorization{Name: "p", Namespace: "default", Scope: security.Scope_NAMESPACE})
	if err := s.Apply(xds.TypeAuthorization, []*discovery.Resource{{Name: "default/p", Resource: pol}}, nil); err != nil {
		t.Fatal(err)
	}
	if s.Policy("default/p") == nil {
		t.Fatal("policy not applied")
	}
	// An Authorization body under the Address type is refused.
	if err := s.Apply(xds.TypeAddress, []*discovery.Resource{{Name: "x", Resource: pol}}, nil); err == nil {
		t.Fatal("wrong body type accepted")
	}
	if err := s.Apply(xds.TypeAddress, []*discovery.Resource{{Name: "x", Resource: &anypb.Any{TypeUrl: xds.TypeAddress, Value: []byte{0xff, 0xff}}}}, nil); err == nil {
		t.Fatal("garbage accepted")
	}
	if err := s.Apply(xds.TypeAddress, []*discovery.Resource{{Name: "x"}}, nil); err == nil {
		t.Fatal("resource without body accepted")
	}
	if err := s.Apply("type.googleapis.com/other", nil, nil); err == nil {
		t.Fatal("unknown type accepted")
	}
	if err := s.Apply(xds.TypeAddress, nil, []string{w.Uid}); err != nil || s.Workload(w.Uid) != nil {
		t.Fatalf("removal: %v", err)
	}
}

func TestResolve(t *testing.T) {
	const wpKey = "default/waypoint.default.svc.cluster.local"
	src := wl("default", "client", "10.0.0.1", hbone)
	waypointPod := wl("default", "waypoint", "10.0.9.9", inService(wpKey, 15008, 15008))
	addrs := []NamedAddress{
		wlAddr(src),
		wlAddr(waypointPod),
		svcAddr(svc("default", "waypoint", "10.96.9.9", 15008, 15008)),
		wlAddr(wl("default", "enrolled", "10.0.1.1", hbone)),
		wlAddr(wl("default", "plain", "10.0.1.2")),
		wlAddr(wl("default", "behind-wp", "10.0.1.3", hbone, withWaypoint(wpHost("default", "waypoint.default.svc.cluster.local")))),
		wlAddr(wl("default", "behind-missing-wp", "10.0.1.4", hbone, withWaypoint(wpHost("default", "nope.default.svc.cluster.local")))),
		// Service "web": one healthy HBONE endpoint with its own port mapping.
		svcAddr(svc("default", "web", "10.96.0.1", 80, 8080, 81, 0)),
		wlAddr(wl("default", "web-1", "10.0.2.1", hbone, inService("default/web.default.svc.cluster.local", 80, 9090, 81, 9191))),
		wlAddr(wl("default", "web-2", "10.0.2.2", hbone, unhealthy, inService("default/web.default.svc.cluster.local", 80, 0))),
		// Service "legacy": endpoint not in the mesh.
		svcAddr(svc("default", "legacy", "10.96.0.2", 80, 8000)),
		wlAddr(wl("default", "legacy-1", "10.0.3.1", inService("default/legacy.default.svc.cluster.local", 80, 0))),
		// Service "down": only unhealthy endpoints.
		svcAddr(svc("default", "down", "10.96.0.3", 80, 80)),
		wlAddr(wl("default", "down-1", "10.0.4.1", hbone, unhealthy, inService("default/down.default.svc.cluster.local", 80, 0))),
		// Service "named": service target 0, only the endpoint mapping knows.
		svcAddr(svc("default", "named", "10.96.0.4", 80, 0)),
		wlAddr(wl("default", "named-1", "10.0.5.1", hbone, inService("default/named.default.svc.cluster.local"))),
		wlAddr(wl("default", "named-2", "10.0.5.2", hbone, inService("default/named.default.svc.cluster.local", 80, 7070))),
	}
	withWP := svc("default", "reviews", "10.96.0.5", 80, 8080)
	withWP.Waypoint = wpHost("default", "waypoint.default.svc.cluster.local")
	addrs = append(addrs, svcAddr(withWP))
	allowAll := svc("default", "all", "10.96.0.6", 80, 80)
	allowAll.LoadBalancing = &workload.LoadBalancing{HealthPolicy: workload.LoadBalancing_ALLOW_ALL}
	addrs = append(addrs, svcAddr(allowAll), wlAddr(wl("default", "all-1", "10.0.6.1", hbone, unhealthy, inService("default/all.default.svc.cluster.local", 80, 0))))
	pass := svc("default", "pass", "10.96.0.7", 80, 80)
	pass.LoadBalancing = &workload.LoadBalancing{Mode: workload.LoadBalancing_PASSTHROUGH}
	addrs = append(addrs, svcAddr(pass))
	wpByIP := svc("default", "wpip", "10.96.0.8", 80, 80)
	wpByIP.Waypoint = &workload.GatewayAddress{Destination: &workload.GatewayAddress_Address{Address: &workload.NetworkAddress{Address: ip("10.96.9.9")}}}
	addrs = append(addrs, svcAddr(wpByIP))

	s := New(nil)
	mustApply(t, s, addrs...)

	tests := []struct {
		name     string
		src      *workload.Workload
		dst      string
		kind     Kind
		addr     string // Upstream.Addr
		workload string // name of Upstream.Workload, "" for nil
		waypoint string // Upstream.Waypoint.HBONE
		err      error
	}{
		{"pod ip enrolled", src, "10.0.1.1:80", Direct, "10.0.1.1:80", "enrolled", "", nil},
		{"pod ip not enrolled", src, "10.0.1.2:80", Passthrough, "10.0.1.2:80", "plain", "", nil},
		{"unknown ip", src, "1.1.1.1:443", Passthrough, "1.1.1.1:443", "", "", nil},
		{"unknown source still resolves", nil, "10.0.1.1:80", Direct, "10.0.1.1:80", "enrolled", "", nil},
		{"pod ip with workload waypoint", src, "10.0.1.3:80", ViaWaypoint, "10.0.1.3:80", "", "10.0.9.9:15008", nil},
		{"waypoint itself skips its waypoint", waypointPod, "10.0.1.3:80", Direct, "10.0.1.3:80", "behind-wp", "", nil},
		{"unresolvable waypoint fails", src, "10.0.1.4:80", 0, "", "", "", ErrNoWaypoint},
		{"vip endpoint port mapping wins", src, "10.96.0.1:80", Direct, "10.0.2.1:9090", "web-1", "", nil},
		{"vip second port", src, "10.96.0.1:81", Direct, "10.0.2.1:9191", "web-1", "", nil},
		{"vip unknown port", src, "10.96.0.1:82", 0, "", "", "", ErrUnknownPort},
		{"vip endpoint not enrolled", src, "10.96.0.2:80", Passthrough, "10.0.3.1:8000", "legacy-1", "", nil},
		{"vip only unhealthy", src, "10.96.0.3:80", 0, "", "", "", ErrNoHealthyEndpoint},
		{"vip named port needs endpoint mapping", src, "10.96.0.4:80", Direct, "10.0.5.2:7070", "named-2", "", nil},
		{"vip allow-all health", src, "10.96.0.6:80", Direct, "10.0.6.1:80", "all-1", "", nil},
		{"vip passthrough mode", src, "10.96.0.7:80", Passthrough, "10.96.0.7:80", "", "", nil},
		{"vip with waypoint", src, "10.96.0.5:80", ViaWaypoint, "10.96.0.5:80", "", "10.0.9.9:15008", nil},
		{"vip with waypoint by address", src, "10.96.0.8:80", ViaWaypoint, "10.96.0.8:80", "", "10.0.9.9:15008", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up, err := s.Resolve(tt.src, "", netip.MustParseAddrPort(tt.dst))
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if up.Kind != tt.kind || up.Addr.String() != tt.addr {
				t.Fatalf("got %v %v, want %v %v", up.Kind, up.Addr, tt.kind, tt.addr)
			}
			if got := up.Workload.GetName(); got != tt.workload {
				t.Fatalf("workload %q, want %q", got, tt.workload)
			}
			gotWP := ""
			if up.Waypoint != nil {
				gotWP = up.Waypoint.HBONE.String()
			}
			if gotWP != tt.waypoint {
				t.Fatalf("waypoint %q, want %q", gotWP, tt.waypoint)
			}
		})
	}
}

func TestResolve_RoundRobinOverHealthyEndpoints(t *testing.T) {
	key := "default/echo.default.svc.cluster.local"
	s := New(nil)
	mustApply(t, s, svcAddr(svc("default", "echo", "10.96.0.10", 80, 8080)),
		wlAddr(wl("default", "e1", "10.0.0.1", hbone, inService(key))),
		wlAddr(wl("default", "e2", "10.0.0.2", hbone, inService(key))),
		wlAddr(wl("default", "e3", "10.0.0.3", hbone, unhealthy, inService(key))),
		wlAddr(wl("default", "e4", "10.0.0.4", hbone, inService(key))))
	counts := map[string]int{}
	var seq []string
	for range 9 {
		up, err := s.Resolve(nil, "", netip.MustParseAddrPort("10.96.0.10:80"))
		if err != nil {
			t.Fatal(err)
		}
		counts[up.Workload.GetName()]++
		seq = append(seq, up.Workload.GetName())
	}
	if counts["e1"] != 3 || counts["e2"] != 3 || counts["e4"] != 3 || counts["e3"] != 0 {
		t.Fatalf("picks %v (sequence %v)", counts, seq)
	}
	if seq[0] == seq[1] || seq[1] == seq[2] {
		t.Fatalf("not round robin: %v", seq)
	}
}

func TestResolve_Locality(t *testing.T) {
	key := "default/echo.default.svc.cluster.local"
	src := wl("default", "client", "10.0.0.100", zone("eu", "a"))
	mk := func(mode workload.LoadBalancing_Mode, eps ...*workload.Workload) *Store {
		s := New(nil)
		sv := svc("default", "echo", "10.96.0.10", 80, 8080)
		sv.LoadBalancing = &workload.LoadBalancing{Mode: mode,
			RoutingPreference: []workload.LoadBalancing_Scope{workload.LoadBalancing_REGION, workload.LoadBalancing_ZONE}}
		mustApply(t, s, svcAddr(sv), wlAddr(src))
		for _, e := range eps {
			mustApply(t, s, wlAddr(e))
		}
		return s
	}
	sameZone := wl("default", "same-zone", "10.0.0.1", hbone, zone("eu", "a"), inService(key))
	sameRegion := wl("default", "same-region", "10.0.0.2", hbone, zone("eu", "b"), inService(key))
	far := wl("default", "far", "10.0.0.3", hbone, zone("us", "a"), inService(key))
	sameZoneDown := wl("default", "same-zone", "10.0.0.1", hbone, unhealthy, zone("eu", "a"), inService(key))

	tests := []struct {
		name  string
		mode  workload.LoadBalancing_Mode
		eps   []*workload.Workload
		want  string
		fails bool
	}{
		{"failover prefers same zone", workload.LoadBalancing_FAILOVER, []*workload.Workload{far, sameRegion, sameZone}, "same-zone", false},
		{"failover to same region", workload.LoadBalancing_FAILOVER, []*workload.Workload{far, sameRegion, sameZoneDown}, "same-region", false},
		{"failover to anywhere", workload.LoadBalancing_FAILOVER, []*workload.Workload{far}, "far", false},
		{"strict keeps to full match", workload.LoadBalancing_STRICT, []*workload.Workload{far, sameRegion, sameZone}, "same-zone", false},
		{"strict with no full match fails", workload.LoadBalancing_STRICT, []*workload.Workload{far, sameRegion}, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mk(tt.mode, tt.eps...)
			for range 4 {
				up, err := s.Resolve(src, "", netip.MustParseAddrPort("10.96.0.10:80"))
				if tt.fails {
					if !errors.Is(err, ErrNoHealthyEndpoint) {
						t.Fatalf("err = %v", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if up.Workload.GetName() != tt.want {
					t.Fatalf("picked %s, want %s", up.Workload.GetName(), tt.want)
				}
			}
		})
	}
}

func TestIsWaypointOf(t *testing.T) {
	const wpKey = "default/waypoint.default.svc.cluster.local"
	s := New(nil)
	mustApply(t, s, svcAddr(svc("default", "waypoint", "10.96.9.9", 15008, 15008)),
		wlAddr(wl("default", "waypoint", "10.0.9.9", inService(wpKey, 15008, 15008))))
	g := wpHost("default", "waypoint.default.svc.cluster.local")
	wpID := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/waypoint")
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/sleep")
	tests := []struct {
		name string
		id   spiffeid.ID
		ip   string
		want bool
	}{
		{"waypoint identity and ip", wpID, "10.0.9.9", true},
		{"waypoint identity, other ip", wpID, "10.0.0.1", false},
		{"other identity, waypoint ip", other, "10.0.9.9", false},
		{"no identity", spiffeid.ID{}, "10.0.9.9", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := s.IsWaypointOf(g, "", tt.id, netip.MustParseAddr(tt.ip), "cluster.local"); got != tt.want {
				t.Fatalf("got %v", got)
			}
		})
	}
	gw, err := s.Waypoint(g, "")
	if err != nil || gw.HBONE.String() != "10.0.9.9:15008" {
		t.Fatalf("Waypoint = %v, %v", gw, err)
	}
}

func TestPolicies(t *testing.T) {
	s := New(nil)
	auths := []*security.Authorization{
		{Name: "mesh", Namespace: "istio-system", Scope: security.Scope_GLOBAL},
		{Name: "ns-wide", Namespace: "default", Scope: security.Scope_NAMESPACE},
		{Name: "other-ns", Namespace: "prod", Scope: security.Scope_NAMESPACE},
		{Name: "selected", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR},
		{Name: "not-selected", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR},
	}
	if err := s.ApplyAuthorizations(auths, nil); err != nil {
		t.Fatal(err)
	}
	keys := func(ps []*policy.Policy) string {
		var k []string
		for _, p := range ps {
			k = append(k, p.Key)
		}
		return strings.Join(k, ",")
	}
	w := wl("default", "a", "10.0.0.1", listing("default/selected", "istio-system/istio_converted_static_strict"))
	ps, missing := s.Policies(nil, w)
	if got := keys(ps); got != "default/ns-wide,istio-system/mesh,default/selected" {
		t.Fatalf("policies = %s", got)
	}
	if len(missing) != 1 || missing[0] != "istio-system/istio_converted_static_strict" {
		t.Fatalf("missing = %v", missing)
	}
	// Removing the namespace policy and scope changes take effect.
	if err := s.ApplyAuthorizations([]*security.Authorization{{Name: "mesh", Namespace: "istio-system", Scope: security.Scope_WORKLOAD_SELECTOR}}, []string{"default/ns-wide"}); err != nil {
		t.Fatal(err)
	}
	ps, _ = s.Policies(ps[:0], w)
	if got := keys(ps); got != "default/selected" {
		t.Fatalf("policies after update = %s", got)
	}
	// A bad policy rejects the push; the old one stays.
	bad := &security.Authorization{Name: "selected", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR, Action: 5}
	if err := s.ApplyAuthorizations([]*security.Authorization{bad}, []string{"default/selected"}); err == nil {
		t.Fatal("bad policy accepted")
	}
	if s.Policy("default/selected") == nil {
		t.Fatal("rejected push removed a policy")
	}
}

// TestApply_ReadersSeeWholePushes flips a service between two endpoint sets
// in single pushes (old endpoints removed, new added, service updated) while
// readers resolve; a reader must always find a healthy endpoint with the
// service's current port mapping.
func TestApply_ReadersSeeWholePushes(t *testing.T) {
	key := "default/echo.default.svc.cluster.local"
	s := New(nil)
	gen := func(i int) []NamedAddress {
		port := uint32(8000 + i%2)
		sv := svc("default", "echo", "10.96.0.10", 80, port)
		a := wl("default", "a", "10.0.0.1", hbone, inService(key))
		b := wl("default", "b", "10.0.0.2", hbone, inService(key))
		if i%2 == 1 {
			a.Status = workload.WorkloadStatus_UNHEALTHY
		} else {
			b.Status = workload.WorkloadStatus_UNHEALTHY
		}
		return []NamedAddress{svcAddr(sv), wlAddr(a), wlAddr(b)}
	}
	mustApply(t, s, gen(0)...)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				up, err := s.Resolve(nil, "", netip.MustParseAddrPort("10.96.0.10:80"))
				if err != nil {
					errs <- err.Error()
					return
				}
				// Generation even: a healthy, port 8000; odd: b, 8001.
				ok := (up.Workload.GetName() == "a" && up.Addr.Port() == 8000) || (up.Workload.GetName() == "b" && up.Addr.Port() == 8001)
				if !ok {
					errs <- "half-applied push seen: " + up.Workload.GetName() + " " + up.Addr.String()
					return
				}
			}
		}()
	}
	for i := 1; i < 2000; i++ {
		if err := s.ApplyAddresses(gen(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
}

func BenchmarkResolveVIP(b *testing.B) {
	key := "default/echo.default.svc.cluster.local"
	s := New(nil)
	mustApply(b, s, svcAddr(svc("default", "echo", "10.96.0.10", 80, 8080)))
	for i := range 50 {
		mustApply(b, s, wlAddr(wl("default", "e"+string(rune('a'+i)), netip.AddrFrom4([4]byte{10, 0, 1, byte(i)}).String(), hbone, inService(key))))
	}
	dst := netip.MustParseAddrPort("10.96.0.10:80")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Resolve(nil, "", dst); err != nil {
			b.Fatal(err)
		}
	}
}

func TestSnapshot_SortedWithPoliciesAsReceived(t *testing.T) {
	s := New(nil)
	mustApply(t, s, wlAddr(wl("default", "b", "10.0.0.2")), wlAddr(wl("default", "a", "10.0.0.1")), svcAddr(svc("default", "web", "10.96.0.1", 80)))
	deny := &security.Authorization{Name: "deny", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{DestinationPorts: []uint32{9090}}}}}}}}
	allow := &security.Authorization{Name: "allow", Namespace: "default", Scope: security.Scope_NAMESPACE}
	if err := s.ApplyAuthorizations([]*security.Authorization{deny, allow}, nil); err != nil {
		t.Fatal(err)
	}
	snap := s.Snapshot()
	if len(snap.Workloads) != 2 || snap.Workloads[0].GetName() != "a" || len(snap.Services) != 1 {
		t.Fatalf("snapshot %v", snap)
	}
	if len(snap.Policies) != 2 || len(snap.Authorizations) != 2 {
		t.Fatalf("policies %d, authorizations %d", len(snap.Policies), len(snap.Authorizations))
	}
	for i, p := range snap.Policies {
		if a := snap.Authorizations[i]; a.GetNamespace()+"/"+a.GetName() != p.Key {
			t.Errorf("authorization %d is %s/%s, policy %s", i, a.GetNamespace(), a.GetName(), p.Key)
		}
	}
	if got := snap.Authorizations[1].GetGroups()[0].GetRules()[0].GetMatches()[0].GetDestinationPorts(); len(got) != 1 || got[0] != 9090 {
		t.Errorf("deny rule as received: %v", got)
	}
	if err := s.ApplyAuthorizations(nil, []string{"default/deny"}); err != nil {
		t.Fatal(err)
	}
	if snap := s.Snapshot(); len(snap.Authorizations) != 1 || snap.Authorizations[0].GetName() != "allow" {
		t.Errorf("after removal: %v", snap.Authorizations)
	}
}
