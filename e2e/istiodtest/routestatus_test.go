package istiodtest

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/e2e/sandbox"
)

// TestIstiodLite_WritesRouteStatus deploys istiod-lite from the chart (its
// least-privilege RBAC included) and checks the status it writes on a GAMMA
// HTTPRoute, as `kubectl get httproute -o yaml` shows it to an Istio
// ambient user: Accepted and ResolvedWaypoints for the Service parent bound
// to a waypoint, ResolvedRefs following a backend Service that appears
// later and a cross-namespace backend that a ReferenceGrant then allows,
// transition times that hold while a condition holds, and no rewrite when
// nothing changed.
func TestIstiodLite_WritesRouteStatus(t *testing.T) {
	sb := sandbox.Start(t)
	deployIstiod(t, sb)
	kc := sb.Client()
	gc, err := gatewayclient.NewForConfig(sb.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	suffix := randomSuffix()
	shop, db := "routestatus-shop-"+suffix, "routestatus-db-"+suffix
	for _, ns := range []string{shop, db} {
		if _, err := kc.CoreV1().Namespaces().Create(ctxT(t, 10*time.Second), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := kc.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				t.Errorf("delete namespace %s: %v", ns, err)
			}
		})
	}
	ctx := ctxT(t, 3*time.Minute)

	// A waypoint for shop's Services, and a Service bound to it.
	if _, err := gc.GatewayV1().Gateways(shop).Create(ctx, &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Labels: map[string]string{"istio.io/waypoint-for": "service"}},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mkSvc := func(ns, name string, labels map[string]string) {
		t.Helper()
		if _, err := kc.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
			metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mkSvc(shop, "web", map[string]string{"istio.io/use-waypoint": "waypoint"})
	mkSvc(shop, "web-v1", nil)

	port := gatewayv1.PortNumber(80)
	core, kindSvc := gatewayv1.Group(""), gatewayv1.Kind("Service")
	backend := func(ns, name string) gatewayv1.HTTPBackendRef {
		ref := gatewayv1.BackendObjectReference{Name: gatewayv1.ObjectName(name), Port: &port}
		if ns != "" {
			n := gatewayv1.Namespace(ns)
			ref.Namespace = &n
		}
		return gatewayv1.HTTPBackendRef{BackendRef: gatewayv1.BackendRef{BackendObjectReference: ref}}
	}
	route := func(name string, backends ...gatewayv1.HTTPBackendRef) {
		t.Helper()
		if _, err := gc.GatewayV1().HTTPRoutes(shop).Create(ctx, &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: gatewayv1.HTTPRouteSpec{
				CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Group: &core, Kind: &kindSvc, Name: "web"}}},
				Rules:           []gatewayv1.HTTPRouteRule{{BackendRefs: backends}},
			}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// expect waits for route name's entry for parent web to show the
	// conditions (type -> "Status/Reason") and returns the route.
	expect := func(what, name string, want map[string]string) *gatewayv1.HTTPRoute {
		t.Helper()
		var rt *gatewayv1.HTTPRoute
		var last error
		start := time.Now()
		err := sb.WaitFor(ctx, 30*time.Second, what, func(ctx context.Context) (bool, error) {
			r, err := gc.GatewayV1().HTTPRoutes(shop).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			rt, last = r, checkParent(r, "web", want)
			// The waypoint is found once its controller has published
			// its address; only then does the route reach it.
			if c := cond(parentConds(r, "web"), "ResolvedWaypoints"); last == nil && c.Message != "All waypoints resolved" {
				last = fmt.Errorf("ResolvedWaypoints message %q", c.Message)
			}
			return last == nil, nil
		})
		if err != nil {
			t.Fatalf("%v; last seen: %v", err, last)
		}
		t.Logf("%s: after %s", what, time.Since(start).Round(time.Millisecond))
		return rt
	}
	ok := map[string]string{"Accepted": "True/Accepted", "ResolvedRefs": "True/ResolvedRefs", "ResolvedWaypoints": "True/ResolvedWaypoints"}
	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for a, b := range ok {
			m[a] = b
		}
		m[k] = v
		return m
	}

	t.Run("BoundParentAndExistingBackendAreAccepted", func(t *testing.T) {
		route("canary", backend("", "web-v1"))
		rt := expect("canary accepted and resolved", "canary", ok)
		for _, c := range parentConds(rt, "web") {
			if c.ObservedGeneration != rt.Generation {
				t.Errorf("%s observedGeneration %d, route generation %d", c.Type, c.ObservedGeneration, rt.Generation)
			}
		}
	})

	t.Run("MissingBackendIsNotFoundUntilItIsCreated", func(t *testing.T) {
		route("to-v2", backend("", "web-v2"))
		before := expect("to-v2 with web-v2 missing", "to-v2", with("ResolvedRefs", "False/BackendNotFound"))
		// Nothing changes: no rewrite.
		time.Sleep(2 * time.Second)
		if again, err := gc.GatewayV1().HTTPRoutes(shop).Get(ctx, "to-v2", metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		} else if again.ResourceVersion != before.ResourceVersion {
			t.Errorf("status rewritten without a change: resourceVersion %s -> %s", before.ResourceVersion, again.ResourceVersion)
		}
		mkSvc(shop, "web-v2", nil)
		after := expect("to-v2 resolved once web-v2 exists", "to-v2", ok)
		b, a := cond(parentConds(before, "web"), "Accepted"), cond(parentConds(after, "web"), "Accepted")
		if b == nil || a == nil || !a.LastTransitionTime.Equal(&b.LastTransitionTime) {
			t.Errorf("Accepted held but its lastTransitionTime moved: %v -> %v", b, a)
		}
	})

	t.Run("CrossNamespaceBackendNeedsAReferenceGrant", func(t *testing.T) {
		mkSvc(db, "pg", nil)
		route("to-db", backend(db, "pg"))
		expect("to-db refused without a grant", "to-db", with("ResolvedRefs", "False/RefNotPermitted"))
		if _, err := gc.GatewayV1beta1().ReferenceGrants(db).Create(ctx, &gatewayv1beta1.ReferenceGrant{
			ObjectMeta: metav1.ObjectMeta{Name: "shop-routes"},
			Spec: gatewayv1beta1.ReferenceGrantSpec{
				From: []gatewayv1beta1.ReferenceGrantFrom{{Group: gatewayv1.GroupName, Kind: "HTTPRoute", Namespace: gatewayv1.Namespace(shop)}},
				To:   []gatewayv1beta1.ReferenceGrantTo{{Kind: "Service", Name: ptrTo(gatewayv1.ObjectName("pg"))}},
			}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		expect("to-db resolved once granted", "to-db", ok)
	})

	t.Run("MissingParentIsNotAccepted", func(t *testing.T) {
		if _, err := gc.GatewayV1().HTTPRoutes(shop).Create(ctx, &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: "orphan"},
			Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
				{Group: &core, Kind: &kindSvc, Name: "nope"}}}}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		err := sb.WaitFor(ctx, 30*time.Second, "orphan not accepted", func(ctx context.Context) (bool, error) {
			r, err := gc.GatewayV1().HTTPRoutes(shop).Get(ctx, "orphan", metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			return checkParent(r, "nope", map[string]string{"Accepted": "False/NoMatchingParent", "ResolvedRefs": "True/ResolvedRefs",
				"ResolvedWaypoints": "True/ResolvedWaypoints"}) == nil, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func parentConds(rt *gatewayv1.HTTPRoute, parent string) []metav1.Condition {
	for _, p := range rt.Status.Parents {
		if p.ControllerName == "istio.io/gateway-controller" && string(p.ParentRef.Name) == parent {
			return p.Conditions
		}
	}
	return nil
}

func cond(conds []metav1.Condition, typ string) *metav1.Condition {
	for i := range conds {
		if conds[i].Type == typ {
			return &conds[i]
		}
	}
	return nil
}

// checkParent compares rt's conditions for parent with want (type ->
// "Status/Reason").
func checkParent(rt *gatewayv1.HTTPRoute, parent string, want map[string]string) error {
	conds := parentConds(rt, parent)
	if conds == nil {
		return fmt.Errorf("no istio.io/gateway-controller entry for parent %s in %+v", parent, rt.Status.Parents)
	}
	if len(conds) != len(want) {
		return fmt.Errorf("conditions %+v, want %v", conds, want)
	}
	for typ, w := range want {
		c := cond(conds, typ)
		if c == nil || string(c.Status)+"/"+c.Reason != w {
			return fmt.Errorf("%s = %+v, want %s", typ, c, w)
		}
	}
	return nil
}
