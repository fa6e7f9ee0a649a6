package model

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
)

func grant(ns, name, fromKind, fromNS string, toName string) *gatewayv1beta1.ReferenceGrant {
	g := &gatewayv1beta1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gatewayv1beta1.ReferenceGrantSpec{
			From: []gatewayv1beta1.ReferenceGrantFrom{{Group: gatewayv1.GroupName, Kind: gatewayv1.Kind(fromKind), Namespace: gatewayv1.Namespace(fromNS)}},
			To:   []gatewayv1beta1.ReferenceGrantTo{{Group: "", Kind: "Service"}},
		}}
	if toName != "" {
		n := gatewayv1.ObjectName(toName)
		g.Spec.To[0].Name = &n
	}
	return g
}

func TestBackendGranted(t *testing.T) {
	for _, tc := range []struct {
		name   string
		grants []*gatewayv1beta1.ReferenceGrant
		kind   string
		want   bool
	}{
		{"same namespace needs no grant", nil, "HTTPRoute", true},
		{"other namespace without a grant", nil, "HTTPRoute", false},
		{"grant for the route's kind and namespace, all Services", []*gatewayv1beta1.ReferenceGrant{grant("db", "g", "HTTPRoute", "shop", "")}, "HTTPRoute", true},
		{"grant naming this Service", []*gatewayv1beta1.ReferenceGrant{grant("db", "g", "HTTPRoute", "shop", "pg")}, "HTTPRoute", true},
		{"grant naming another Service", []*gatewayv1beta1.ReferenceGrant{grant("db", "g", "HTTPRoute", "shop", "redis")}, "HTTPRoute", false},
		{"grant for another kind", []*gatewayv1beta1.ReferenceGrant{grant("db", "g", "GRPCRoute", "shop", "")}, "HTTPRoute", false},
		{"grant for GRPCRoutes", []*gatewayv1beta1.ReferenceGrant{grant("db", "g", "GRPCRoute", "shop", "")}, "GRPCRoute", true},
		{"grant for another namespace", []*gatewayv1beta1.ReferenceGrant{grant("db", "g", "HTTPRoute", "other", "")}, "HTTPRoute", false},
		{"grant living in another namespace", []*gatewayv1beta1.ReferenceGrant{grant("shop", "g", "HTTPRoute", "shop", "")}, "HTTPRoute", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svcNS := "db"
			if tc.name == "same namespace needs no grant" {
				svcNS = "shop"
			}
			if got := BackendGranted(tc.grants, tc.kind, "shop", svcNS, "pg"); got != tc.want {
				t.Errorf("BackendGranted = %v, want %v", got, tc.want)
			}
		})
	}
	g := grant("db", "g", "HTTPRoute", "shop", "")
	g.Spec.To[0].Kind = "Secret"
	if BackendGranted([]*gatewayv1beta1.ReferenceGrant{g}, "HTTPRoute", "shop", "db", "pg") {
		t.Error("a grant to Secrets lets routes use Services")
	}
}

// A backendRef to a Service of another namespace is routed to only while
// a ReferenceGrant there allows it (Gateway API); without one the rule
// keeps that backend marked invalid, so the waypoint answers its share of
// the requests with 500 instead of sending them to the other backends.
func TestServiceConfig_CrossNamespaceBackendNeedsReferenceGrant(t *testing.T) {
	dbNS := gatewayv1.Namespace("db")
	kindSvc := gatewayv1.Kind("Service")
	route := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "to-db"},
		Spec: gatewayv1.HTTPRouteSpec{
			CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Kind: &kindSvc, Name: "web"}}},
			Rules: []gatewayv1.HTTPRouteRule{{BackendRefs: []gatewayv1.HTTPBackendRef{
				{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Name: "local"}}},
				{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Namespace: &dbNS, Name: "pg"}}},
			}}},
		}}
	web := service("shop", "web", "10.96.0.1", map[string]string{"app": "web"}, port(80, intstr.FromInt32(8080)))
	objs := []any{
		ns("shop", map[string]string{"istio.io/use-waypoint": "waypoint"}), ns("db", nil),
		waypointGW("shop", "waypoint", "", "waypoint.shop.svc.cluster.local"),
		web, service("shop", "local", "10.96.0.2", nil), service("db", "pg", "10.96.0.3", nil), route,
	}
	// backends lists "<ns>/<name>" and, for an invalid one, "!" and whether
	// its hostname is empty.
	backends := func(b *Builder) []string {
		t.Helper()
		info := b.ServiceConfig(web)
		if info.Config == nil || len(info.Config.GetHttpRoutes()) != 1 {
			t.Fatalf("web: %v", info.Config)
		}
		var out []string
		for _, be := range info.Config.GetHttpRoutes()[0].GetRules()[0].GetBackendRefs() {
			s := be.GetNamespace() + "/" + be.GetName()
			if be.GetInvalid() != "" {
				s += "!"
				if be.GetHostname() != "" {
					s += "(with hostname)"
				}
			}
			out = append(out, s)
		}
		return out
	}
	b := world(t, Config{}, objs...)
	if got := backends(b); strings.Join(got, ",") != "shop/local,db/pg!" {
		t.Errorf("without a grant: backends %v, want shop/local and db/pg marked invalid without a hostname", got)
	}
	info := b.ServiceConfig(web)
	if len(info.Warnings) != 1 || !strings.Contains(info.Warnings[0], "ReferenceGrant") {
		t.Errorf("warnings %v", info.Warnings)
	}
	b = world(t, Config{}, append(objs, grant("db", "shop-routes", "HTTPRoute", "shop", "pg"))...)
	if got := backends(b); strings.Join(got, ",") != "shop/local,db/pg" {
		t.Errorf("with a grant: backends %v, want shop/local and db/pg", got)
	}
	if info := b.ServiceConfig(web); len(info.Warnings) != 0 {
		t.Errorf("with a grant: warnings %v", info.Warnings)
	}
}
