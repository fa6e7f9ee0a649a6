package xds

import (
	"sort"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshlite/meshlite/istiod-lite/authn"
	"github.com/meshlite/meshlite/proto/l7"
)

func l7res(name, scope string, rps float64) *Resource {
	r, err := NewResource(l7.TypeURL, name, &l7.ServiceConfig{Name: name, Resilience: &l7.ResiliencePolicy{RateLimit: &l7.RateLimit{RequestsPerSecond: rps}}}, nil, nil)
	if err != nil {
		panic(err)
	}
	r.Scope = scope
	return r
}

func sortedNames(r *discovery.DeltaDiscoveryResponse) []string {
	n := names(r)
	sort.Strings(n)
	return n
}

// A scoped resource reaches only the clients of its scope: in the first
// response, in pushes, and as a removal when it moves to another scope.
func TestConn_ScopedResourcesGoOnlyToTheirWaypoint(t *testing.T) {
	c := NewCache(l7.TypeURL)
	c.Update(l7.TypeURL, []*Resource{l7res("ns/a", "ns/wp1", 1), l7res("ns/b", "ns/wp2", 1)}, nil)
	c.TakeChanges()
	wp1, fs1 := newTestConn(c)
	wp1.scope = "ns/wp1"
	zt, fsz := newTestConn(c)
	if err := wp1.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: l7.TypeURL}); err != nil {
		t.Fatal(err)
	}
	if err := zt.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: l7.TypeURL}); err != nil {
		t.Fatal(err)
	}
	if got := sortedNames(fs1.sent[0]); len(got) != 1 || got[0] != "ns/a" {
		t.Errorf("wp1's first response %v, want [ns/a]", got)
	}
	if got := names(fsz.sent[0]); len(got) != 0 {
		t.Errorf("an unscoped client got %v", got)
	}
	// On-demand lookups of another scope's name answer "removed".
	if err := wp1.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: l7.TypeURL, ResourceNamesSubscribe: []string{"ns/b"}}); err != nil {
		t.Fatal(err)
	}
	if r := fs1.sent[len(fs1.sent)-1]; len(r.Resources) != 0 || len(r.RemovedResources) != 1 {
		t.Errorf("lookup of another waypoint's resource: %v removed %v", names(r), r.RemovedResources)
	}

	// ns/a moves to wp2, ns/b to wp1: wp1 loses a and gets b.
	c.Update(l7.TypeURL, []*Resource{l7res("ns/a", "ns/wp2", 1), l7res("ns/b", "ns/wp1", 1)}, nil)
	ch, since := c.TakeChanges()
	wp1.enqueue(ch, since)
	zt.enqueue(ch, since)
	n1, nz := len(fs1.sent), len(fsz.sent)
	if err := wp1.push(); err != nil {
		t.Fatal(err)
	}
	if err := zt.push(); err != nil {
		t.Fatal(err)
	}
	if len(fs1.sent) != n1+1 {
		t.Fatalf("wp1 got %d pushes", len(fs1.sent)-n1)
	}
	r := fs1.sent[n1]
	if got := names(r); len(got) != 1 || got[0] != "ns/b" || len(r.RemovedResources) != 1 || r.RemovedResources[0] != "ns/a" {
		t.Errorf("wp1's push: %v removed %v, want ns/b and ns/a removed", got, r.RemovedResources)
	}
	if len(fsz.sent) != nz {
		t.Errorf("the unscoped client got a push: %v", names(fsz.sent[nz]))
	}
	// Same content, scope changed: still a change for the cache.
	if n := c.Update(l7.TypeURL, []*Resource{l7res("ns/b", "ns/wp2", 1)}, nil); n != 1 {
		t.Errorf("a scope change counted as %d changes", n)
	}
}

func TestCheckNode_WaypointScopeFromItsOwnServiceAccount(t *testing.T) {
	node := func(id string, md map[string]any) *corev3.Node {
		s, _ := structpb.NewStruct(md)
		return &corev3.Node{Id: id, Metadata: s}
	}
	caller := &authn.Caller{Namespace: "shop", ServiceAccount: "waypoint"}
	for _, tt := range []struct {
		name  string
		n     *corev3.Node
		scope string
		code  codes.Code
	}{
		{"ztunnel", node("ztunnel~1.2.3.4~z.istio-system~x", map[string]any{"NAMESPACE": "shop"}), "", codes.OK},
		{"its gateway", node("waypoint~1~p.shop~shop.svc.cluster.local", map[string]any{"NAMESPACE": "shop", "SERVICE_ACCOUNT": "waypoint", "GATEWAY_NAME": "waypoint"}), "shop/waypoint", codes.OK},
		{"another gateway", node("waypoint~1~p.shop~shop.svc.cluster.local", map[string]any{"GATEWAY_NAME": "other"}), "", codes.PermissionDenied},
		{"no gateway", node("waypoint~1~p.shop~shop.svc.cluster.local", map[string]any{"NAMESPACE": "shop"}), "", codes.InvalidArgument},
		{"namespace lie", node("waypoint~1", map[string]any{"NAMESPACE": "bank", "GATEWAY_NAME": "waypoint"}), "", codes.PermissionDenied},
		{"no id", node("", nil), "", codes.InvalidArgument},
	} {
		scope, err := checkNode(tt.n, caller)
		if status.Code(err) != tt.code || scope != tt.scope {
			t.Errorf("%s: scope %q err %v, want %q %v", tt.name, scope, err, tt.scope, tt.code)
		}
	}
}
