package model

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Only core-group Service parents count, in the route's namespace unless
// one is named, each once.
func TestHTTPRouteServices_OnlyServiceParents(t *testing.T) {
	svc, gw := gatewayv1.Kind("Service"), gatewayv1.Kind("Gateway")
	empty, core, other := gatewayv1.Group(""), gatewayv1.Group("core"), gatewayv1.Group("example.com")
	nsB := gatewayv1.Namespace("b")
	rt := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "r"},
		Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
			{Kind: &svc, Name: "one"},
			{Group: &empty, Kind: &svc, Name: "one"},
			{Group: &core, Kind: &svc, Namespace: &nsB, Name: "two"},
			{Group: &other, Kind: &svc, Name: "not-core"},
			{Kind: &gw, Name: "a-gateway"},
			{Name: "default-kind-is-gateway"},
		}}}}
	got := HTTPRouteServices(rt)
	want := []types.NamespacedName{{Namespace: "a", Name: "one"}, {Namespace: "b", Name: "two"}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("HTTPRouteServices = %v, want %v", got, want)
	}

	s := NewStore()
	s.SetHTTPRoute(rt)
	if l := s.HTTPRoutesOf("b", "two"); len(l) != 1 || l[0] != rt {
		t.Fatalf("routes of b/two = %v", l)
	}
	if l := s.HTTPRoutesOf("a", "a-gateway"); len(l) != 0 {
		t.Fatalf("a Gateway parent indexed as a service: %v", l)
	}
	s.DeleteHTTPRoute("a", "r")
	if s.HTTPRoute("a", "r") != nil || len(s.HTTPRoutesOf("a", "one")) != 0 || len(s.HTTPRoutes("")) != 0 {
		t.Fatal("route still held after delete")
	}
}
