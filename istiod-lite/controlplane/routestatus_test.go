package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/l7"
)

// routeConds reads route ns/name's conditions for its Service parent
// parent, under istio.io/gateway-controller.
func routeConds(ctx context.Context, ns, name, parent string) (*gatewayv1.HTTPRoute, []metav1.Condition, error) {
	rt, err := env.gc.GatewayV1().HTTPRoutes(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, nil, err
	}
	for _, p := range rt.Status.Parents {
		if p.ControllerName == "istio.io/gateway-controller" && string(p.ParentRef.Name) == parent {
			return rt, p.Conditions, nil
		}
	}
	return rt, nil, fmt.Errorf("no status entry for parent %s: %+v", parent, rt.Status.Parents)
}

func wantCond(conds []metav1.Condition, typ string, status metav1.ConditionStatus, reason string) error {
	c := condition(conds, typ)
	if c == nil || c.Status != status || c.Reason != reason {
		return fmt.Errorf("%s = %+v, want %s/%s", typ, c, status, reason)
	}
	return nil
}

// The leader writes HTTPRoute status for Service parents, follows the
// backends and ReferenceGrants it depends on, and does not rewrite a status
// that did not change; the waypoint gets the cross-namespace backend only
// once it is granted.
func TestRouteStatus_FollowsBackendsAndGrants(t *testing.T) {
	istiodT()
	ns, other := "rs-shop", "rs-db"
	namespace(t, ns, map[string]string{"istio.io/use-waypoint": "waypoint"})
	namespace(t, other, nil)
	ctx := ctxT(t, 60*time.Second)
	if _, err := env.gc.GatewayV1().Gateways(ns).Create(ctx, &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint"},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mkSvc := func(ns, name string) {
		t.Helper()
		if _, err := env.kc.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
			metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mkSvc(ns, "web")
	port := gatewayv1.PortNumber(80)
	core, kindSvc, dbNS := gatewayv1.Group(""), gatewayv1.Kind("Service"), gatewayv1.Namespace(other)
	be := func(ns *gatewayv1.Namespace, name string) gatewayv1.HTTPBackendRef {
		return gatewayv1.HTTPBackendRef{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{
			Namespace: ns, Name: gatewayv1.ObjectName(name), Port: &port}}}
	}
	if _, err := env.gc.GatewayV1().HTTPRoutes(ns).Create(ctx, &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: "r"},
		Spec: gatewayv1.HTTPRouteSpec{
			CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Group: &core, Kind: &kindSvc, Name: "web"}}},
			Rules:           []gatewayv1.HTTPRouteRule{{BackendRefs: []gatewayv1.HTTPBackendRef{be(nil, "web-v2"), be(&dbNS, "pg")}}},
		}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	step := func(what string, wantRefs metav1.ConditionStatus, reason string) *gatewayv1.HTTPRoute {
		t.Helper()
		var rt *gatewayv1.HTTPRoute
		poll(t, 10*time.Second, what, func(ctx context.Context) error {
			r, conds, err := routeConds(ctx, ns, "r", "web")
			if err != nil {
				return err
			}
			rt = r
			if err := wantCond(conds, "Accepted", metav1.ConditionTrue, "Accepted"); err != nil {
				return err
			}
			if err := wantCond(conds, "ResolvedWaypoints", metav1.ConditionTrue, "ResolvedWaypoints"); err != nil {
				return err
			}
			if c := condition(conds, "ResolvedWaypoints"); c.Message != "All waypoints resolved" {
				return fmt.Errorf("ResolvedWaypoints message %q", c.Message)
			}
			return wantCond(conds, "ResolvedRefs", wantRefs, reason)
		})
		return rt
	}
	rec := newL7Rec()
	xdsClient(t, waypointToken(t, ns, "waypoint"), waypointNode(ns, "waypoint", "waypoint"), rec, ixds.Subscription{TypeURL: l7.TypeURL})
	web := ns + "/web." + ns + ".svc.cluster.local"
	// backends lists the rule's backendRefs, an unresolved one (kept for
	// its share of 500s) marked "!".
	backends := func(want string) func(m map[string]*l7.ServiceConfig) bool {
		return func(m map[string]*l7.ServiceConfig) bool {
			rts := m[web].GetHttpRoutes()
			if len(rts) != 1 || len(rts[0].GetRules()) != 1 {
				return false
			}
			var got []string
			for _, b := range rts[0].GetRules()[0].GetBackendRefs() {
				s := b.GetNamespace() + "/" + b.GetName()
				if b.GetInvalid() != "" {
					s += "!"
				}
				got = append(got, s)
			}
			return strings.Join(got, ",") == want
		}
	}
	rec.waitFor(t, "the waypoint routes to neither (web-v2 missing, pg not granted)", 10*time.Second,
		backends(ns+"/web-v2!,"+other+"/pg!"))
	step("web-v2 missing", metav1.ConditionFalse, "BackendNotFound")
	mkSvc(ns, "web-v2")
	step("web-v2 created; pg refused", metav1.ConditionFalse, "RefNotPermitted")
	rec.waitFor(t, "the waypoint routes to web-v2, not to pg (not granted)", 10*time.Second, backends(ns+"/web-v2,"+other+"/pg!"))
	mkSvc(other, "pg")
	if _, err := env.gc.GatewayV1beta1().ReferenceGrants(other).Create(ctx, &gatewayv1beta1.ReferenceGrant{
		ObjectMeta: metav1.ObjectMeta{Name: "shop-routes"},
		Spec: gatewayv1beta1.ReferenceGrantSpec{
			From: []gatewayv1beta1.ReferenceGrantFrom{{Group: gatewayv1.GroupName, Kind: "HTTPRoute", Namespace: gatewayv1.Namespace(ns)}},
			To:   []gatewayv1beta1.ReferenceGrantTo{{Kind: "Service"}},
		}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rt := step("granted", metav1.ConditionTrue, "ResolvedRefs")
	rec.waitFor(t, "the waypoint routes to pg once granted", 10*time.Second, backends(ns+"/web-v2,"+other+"/pg"))

	// Nothing changes: the status is not written again.
	time.Sleep(time.Second)
	again, err := env.gc.GatewayV1().HTTPRoutes(ns).Get(ctx, "r", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if again.ResourceVersion != rt.ResourceVersion {
		t.Errorf("the route was rewritten without a change: resourceVersion %s -> %s", rt.ResourceVersion, again.ResourceVersion)
	}
}
