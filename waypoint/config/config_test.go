package config

import (
	"net/netip"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/proto/workload"
)

func anyRes(t *testing.T, name string, a *anypb.Any) *discovery.Resource {
	return &discovery.Resource{Name: name, Resource: a, Version: "1"}
}

func TestStore_ResolvesTargetsAndEndpoints(t *testing.T) {
	s := NewStore("cluster.local", nil)
	svc := &workload.Address{Type: &workload.Address_Service{Service: &workload.Service{
		Name: "echo", Namespace: "default", Hostname: "echo.default.svc.cluster.local",
		Addresses: []*workload.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.10").AsSlice()}},
		Ports:     []*workload.Port{{ServicePort: 80, TargetPort: 8080}},
	}}}
	pod := func(uid, ip string, hbone bool, status workload.WorkloadStatus) *workload.Address {
		tp := workload.TunnelProtocol_NONE
		if hbone {
			tp = workload.TunnelProtocol_HBONE
		}
		return &workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{
			Uid: uid, Name: uid, Namespace: "default", ServiceAccount: "echo", TunnelProtocol: tp, Status: status,
			Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()},
			Services:  map[string]*workload.PortList{"default/echo.default.svc.cluster.local": {Ports: []*workload.Port{{ServicePort: 80, TargetPort: 8080}}}},
		}}}
	}
	var rs []*discovery.Resource
	for name, a := range map[string]*workload.Address{
		"default/echo.default.svc.cluster.local": svc,
		"Kubernetes//Pod/default/a":              pod("Kubernetes//Pod/default/a", "10.0.1.5", true, workload.WorkloadStatus_HEALTHY),
		"Kubernetes//Pod/default/b":              pod("Kubernetes//Pod/default/b", "10.0.1.6", false, workload.WorkloadStatus_HEALTHY),
		"Kubernetes//Pod/default/c":              pod("Kubernetes//Pod/default/c", "10.0.1.7", true, workload.WorkloadStatus_UNHEALTHY),
	} {
		an, err := anypb.New(a)
		if err != nil {
			t.Fatal(err)
		}
		rs = append(rs, anyRes(t, name, an))
	}
	if err := s.Apply(xds.TypeAddress, rs, nil); err != nil {
		t.Fatal(err)
	}
	sc, _ := anypb.New(&l7.ServiceConfig{Namespace: "default", Name: "echo", Hostname: "echo.default.svc.cluster.local",
		Ports: []*l7.ServicePort{{Port: 80, TargetPort: 8080}}})
	if err := s.Apply(l7.TypeURL, []*discovery.Resource{anyRes(t, "default/echo.default.svc.cluster.local", sc)}, nil); err != nil {
		t.Fatal(err)
	}
	snap := s.Snapshot()
	got, port, _ := snap.Resolve(netip.MustParseAddrPort("10.96.0.10:80"))
	if got == nil || got.Key != "default/echo.default.svc.cluster.local" || port != 80 {
		t.Fatalf("VIP resolve: %v %d", got, port)
	}
	got, port, wl := snap.Resolve(netip.MustParseAddrPort("10.0.1.5:8080"))
	if got == nil || port != 80 || wl == nil {
		t.Fatalf("pod IP resolve: %v %d %v", got, port, wl)
	}
	eps := snap.Endpoints(got.Key, 80)
	if len(eps) != 2 {
		t.Fatalf("endpoints %v, want a and b (c is unhealthy)", eps)
	}
	if eps[0].Addr.String() != "10.0.1.5:8080" || !eps[0].HBONE || eps[0].Identity.String() != "spiffe://cluster.local/ns/default/sa/echo" {
		t.Errorf("endpoint a = %+v", eps[0])
	}
	if eps[1].HBONE {
		t.Errorf("endpoint b has no HBONE: %+v", eps[1])
	}
	// A bad resource is rejected whole and changes nothing.
	bad := &discovery.Resource{Name: "x", Resource: &anypb.Any{TypeUrl: l7.TypeURL, Value: []byte{0xff}}}
	if err := s.Apply(l7.TypeURL, []*discovery.Resource{bad}, []string{"default/echo.default.svc.cluster.local"}); err == nil {
		t.Fatal("garbage accepted")
	}
	if s.Snapshot().Service("default/echo.default.svc.cluster.local") == nil {
		t.Fatal("a rejected push removed a service")
	}
	if err := s.Apply(l7.TypeURL, nil, []string{"default/echo.default.svc.cluster.local"}); err != nil {
		t.Fatal(err)
	}
	if svc, _, _ := s.Snapshot().Resolve(netip.MustParseAddrPort("10.96.0.10:80")); svc != nil {
		t.Error("removed service still resolves")
	}
}
