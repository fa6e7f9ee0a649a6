package routestatus

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	"github.com/meshlite/meshlite/istiod-lite/model"
)

var (
	kindService = gatewayv1.Kind("Service")
	coreGroup   = gatewayv1.Group("")
	t0          = metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	t1          = metav1.NewTime(t0.Add(time.Minute))
)

func svc(ns, name string, labels map[string]string) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.1"}}
}

func namespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

// waypoint is a waypoint Gateway as the waypoints controller leaves it
// (with its address in the status).
func waypoint(ns, name string) *gatewayv1.Gateway {
	ht := gatewayv1.HostnameAddressType
	return &gatewayv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
		Status: gatewayv1.GatewayStatus{Addresses: []gatewayv1.GatewayStatusAddress{{Type: &ht, Value: name + "." + ns + ".svc.cluster.local"}}}}
}

func refGrant(ns, fromKind, fromNS string) *gatewayv1beta1.ReferenceGrant {
	return &gatewayv1beta1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow-" + fromNS},
		Spec: gatewayv1beta1.ReferenceGrantSpec{
			From: []gatewayv1beta1.ReferenceGrantFrom{{Group: gatewayv1.GroupName, Kind: gatewayv1.Kind(fromKind), Namespace: gatewayv1.Namespace(fromNS)}},
			To:   []gatewayv1beta1.ReferenceGrantTo{{Kind: "Service"}},
		}}
}

func store(objs ...any) *model.Store {
	s := model.NewStore()
	for _, o := range objs {
		switch o := o.(type) {
		case *corev1.Namespace:
			s.SetNamespace(o)
		case *corev1.Service:
			s.SetService(o)
		case *gatewayv1.Gateway:
			s.SetGateway(o)
		case *gatewayv1beta1.ReferenceGrant:
			s.SetReferenceGrant(o)
		default:
			panic("store: unsupported object")
		}
	}
	return s
}

type backend struct{ ns, name, kind string }

func httpRoute(ns, name string, gen int64, parents []gatewayv1.ParentReference, backends ...backend) *gatewayv1.HTTPRoute {
	rt := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Generation: gen},
		Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: parents}}}
	var refs []gatewayv1.HTTPBackendRef
	for _, b := range backends {
		ref := gatewayv1.BackendObjectReference{Name: gatewayv1.ObjectName(b.name)}
		if b.ns != "" {
			n := gatewayv1.Namespace(b.ns)
			ref.Namespace = &n
		}
		if b.kind != "" {
			k := gatewayv1.Kind(b.kind)
			ref.Kind = &k
		}
		refs = append(refs, gatewayv1.HTTPBackendRef{BackendRef: gatewayv1.BackendRef{BackendObjectReference: ref}})
	}
	rt.Spec.Rules = []gatewayv1.HTTPRouteRule{{BackendRefs: refs}}
	return rt
}

func serviceParent(name string) gatewayv1.ParentReference {
	return gatewayv1.ParentReference{Group: &coreGroup, Kind: &kindService, Name: gatewayv1.ObjectName(name)}
}

// conds renders our entries as "parent: Type=Status/Reason ...".
func conds(st gatewayv1.RouteStatus) []string {
	var out []string
	for _, p := range st.Parents {
		if p.ControllerName != ControllerName {
			continue
		}
		s := string(p.ParentRef.Name) + ":"
		for _, c := range p.Conditions {
			s += " " + c.Type + "=" + string(c.Status) + "/" + c.Reason
		}
		out = append(out, s)
	}
	return out
}

func find(t *testing.T, st gatewayv1.RouteStatus, parent, typ string) metav1.Condition {
	t.Helper()
	for _, p := range st.Parents {
		if p.ControllerName == ControllerName && string(p.ParentRef.Name) == parent {
			for _, c := range p.Conditions {
				if c.Type == typ {
					return c
				}
			}
		}
	}
	t.Fatalf("no condition %s for parent %s in %v", typ, parent, conds(st))
	return metav1.Condition{}
}

func TestHTTPRouteStatus(t *testing.T) {
	bound := map[string]string{"istio.io/use-waypoint": "waypoint"}
	base := []any{namespace("shop", nil), namespace("db", nil), waypoint("shop", "waypoint"),
		svc("shop", "web", bound), svc("shop", "web-v2", nil), svc("db", "pg", nil)}
	for _, tc := range []struct {
		name     string
		extra    []any
		route    *gatewayv1.HTTPRoute
		want     []string
		messages map[string]string // condition type -> message substring
	}{
		{
			name:  "bound parent and existing backend",
			route: httpRoute("shop", "r", 3, []gatewayv1.ParentReference{serviceParent("web")}, backend{name: "web-v2"}),
			want:  []string{"web: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"Accepted": "Route was valid", "ResolvedRefs": "All references resolved",
				"ResolvedWaypoints": "All waypoints resolved"},
		},
		{
			name:     "parent Service missing",
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("nope")}, backend{name: "web-v2"}),
			want:     []string{"nope: Accepted=False/NoMatchingParent ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"Accepted": `parent service: "nope" not found`, "ResolvedWaypoints": "parent not found"},
		},
		{
			name:     "backend Service missing",
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")}, backend{name: "web-v2"}, backend{name: "ghost"}),
			want:     []string{"web: Accepted=True/Accepted ResolvedRefs=False/BackendNotFound ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"ResolvedRefs": "backend(ghost.shop.svc.cluster.local) not found"},
		},
		{
			name:     "cross-namespace backend without a ReferenceGrant",
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")}, backend{ns: "db", name: "pg"}),
			want:     []string{"web: Accepted=True/Accepted ResolvedRefs=False/RefNotPermitted ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"ResolvedRefs": "db/pg not accessible to a HTTPRoute in namespace \"shop\""},
		},
		{
			name:  "cross-namespace backend with a ReferenceGrant",
			extra: []any{refGrant("db", "HTTPRoute", "shop")},
			route: httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")}, backend{ns: "db", name: "pg"}),
			want:  []string{"web: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
		},
		{
			name:  "a grant for GRPCRoutes does not let HTTPRoutes in",
			extra: []any{refGrant("db", "GRPCRoute", "shop")},
			route: httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")}, backend{ns: "db", name: "pg"}),
			want:  []string{"web: Accepted=True/Accepted ResolvedRefs=False/RefNotPermitted ResolvedWaypoints=True/ResolvedWaypoints"},
		},
		{
			name: "a refused reference does not tell whether the Service exists",
			route: httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")},
				backend{ns: "db", name: "absent"}),
			want: []string{"web: Accepted=True/Accepted ResolvedRefs=False/RefNotPermitted ResolvedWaypoints=True/ResolvedWaypoints"},
		},
		{
			name:     "backend of another kind",
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")}, backend{name: "x", kind: "ServiceImport"}),
			want:     []string{"web: Accepted=True/Accepted ResolvedRefs=False/InvalidKind ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"ResolvedRefs": `kind "ServiceImport"`},
		},
		{
			name:     "parent without a waypoint label (Istio's message)",
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web-v2")}, backend{name: "web"}),
			want:     []string{"web-v2: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"ResolvedWaypoints": "istio.io/use-waypoint label missing from parent and parent namespace; in ambient mode, route will not be respected"},
		},
		{
			name:     "bound through its namespace",
			extra:    []any{namespace("shop", bound)},
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web-v2")}, backend{name: "web"}),
			want:     []string{"web-v2: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"ResolvedWaypoints": "All waypoints resolved"},
		},
		{
			name:     "label naming a waypoint that does not exist",
			extra:    []any{svc("shop", "web-v2", map[string]string{"istio.io/use-waypoint": "missing"})},
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web-v2")}),
			want:     []string{"web-v2: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"ResolvedWaypoints": "waypoint shop/missing"},
		},
		{
			name:     "consumer route: parent in another namespace",
			extra:    []any{svc("db", "pg", bound)},
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{{Kind: &kindService, Namespace: ptr(gatewayv1.Namespace("db")), Name: "pg"}}),
			want:     []string{"pg: Accepted=False/UnsupportedValue ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"Accepted": "producer routes", "ResolvedWaypoints": "not checked"},
		},
		{
			// The same answer for a Service that does not exist: the status
			// must not tell the route's author what another namespace holds.
			name:     "consumer route: parent in another namespace that does not exist",
			route:    httpRoute("shop", "r", 1, []gatewayv1.ParentReference{{Kind: &kindService, Namespace: ptr(gatewayv1.Namespace("db")), Name: "ghost"}}),
			want:     []string{"ghost: Accepted=False/UnsupportedValue ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
			messages: map[string]string{"Accepted": "producer routes", "ResolvedWaypoints": "not checked"},
		},
		{
			name: "one entry per distinct Service parent; Gateway parents are left out",
			route: httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web"), {Name: "ingress"},
				{Kind: &kindService, Name: "web"}, serviceParent("web-v2")}),
			want: []string{"web: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints",
				"web-v2: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs ResolvedWaypoints=True/ResolvedWaypoints"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := store(append(append([]any{}, base...), tc.extra...)...)
			st := HTTPRouteStatus(model.Config{}, c, tc.route, t0)
			if got := conds(st); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("status\n got %q\nwant %q", got, tc.want)
			}
			for _, p := range st.Parents {
				for _, cd := range p.Conditions {
					if cd.ObservedGeneration != tc.route.Generation || !cd.LastTransitionTime.Equal(&t0) {
						t.Errorf("%s: observedGeneration %d time %v, want %d and %v", cd.Type, cd.ObservedGeneration, cd.LastTransitionTime, tc.route.Generation, t0)
					}
				}
			}
			for typ, msg := range tc.messages {
				if c := find(t, st, string(st.Parents[0].ParentRef.Name), typ); !strings.Contains(c.Message, msg) {
					t.Errorf("%s message %q, want it to contain %q", typ, c.Message, msg)
				}
			}
		})
	}
}

// A GRPCRoute gets Accepted and ResolvedRefs; Istio reports
// ResolvedWaypoints on HTTPRoutes only.
func TestGRPCRouteStatus(t *testing.T) {
	c := store(namespace("shop", nil), namespace("db", nil), svc("shop", "web", nil), svc("db", "pg", nil))
	dbNS := gatewayv1.Namespace("db")
	rt := &gatewayv1.GRPCRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "g", Generation: 2},
		Spec: gatewayv1.GRPCRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{serviceParent("web")}},
			Rules: []gatewayv1.GRPCRouteRule{{BackendRefs: []gatewayv1.GRPCBackendRef{{BackendRef: gatewayv1.BackendRef{
				BackendObjectReference: gatewayv1.BackendObjectReference{Namespace: &dbNS, Name: "pg"}}}}}}}}
	if got := conds(GRPCRouteStatus(model.Config{}, c, rt, t0)); len(got) != 1 || got[0] != "web: Accepted=True/Accepted ResolvedRefs=False/RefNotPermitted" {
		t.Errorf("without a grant: %q", got)
	}
	c.SetReferenceGrant(refGrant("db", "HTTPRoute", "shop"))
	if got := conds(GRPCRouteStatus(model.Config{}, c, rt, t0)); got[0] != "web: Accepted=True/Accepted ResolvedRefs=False/RefNotPermitted" {
		t.Errorf("with a grant for HTTPRoutes only: %q", got)
	}
	c.SetReferenceGrant(refGrant("db", "GRPCRoute", "shop"))
	if got := conds(GRPCRouteStatus(model.Config{}, c, rt, t0)); got[0] != "web: Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs" {
		t.Errorf("with a grant for GRPCRoutes: %q", got)
	}
}

// Recomputing a route from its own written status gives the same status
// (no write loop); a condition keeps its transition time while its status
// holds and takes a new one when it flips; entries of other controllers are
// kept and our entries for parents no longer named are dropped.
func TestHTTPRouteStatus_StableAndKeepsOthers(t *testing.T) {
	c := store(namespace("shop", nil), svc("shop", "web", nil))
	rt := httpRoute("shop", "r", 1, []gatewayv1.ParentReference{serviceParent("web")}, backend{name: "ghost"})
	other := gatewayv1.RouteParentStatus{ParentRef: gatewayv1.ParentReference{Name: "ingress"}, ControllerName: "example.com/other",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted", LastTransitionTime: t0}}}
	stale := gatewayv1.RouteParentStatus{ParentRef: serviceParent("gone"), ControllerName: ControllerName,
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted", LastTransitionTime: t0}}}
	rt.Status.Parents = []gatewayv1.RouteParentStatus{other, stale}

	st := HTTPRouteStatus(model.Config{}, c, rt, t0)
	if len(st.Parents) != 2 || st.Parents[0].ControllerName != "example.com/other" || st.Parents[1].ParentRef.Name != "web" {
		t.Fatalf("parents %+v", st.Parents)
	}
	rt.Status.RouteStatus = st
	again := HTTPRouteStatus(model.Config{}, c, rt, t1)
	if !equalStatus(st, again) {
		t.Errorf("recomputed status differs:\n%+v\n%+v", st, again)
	}

	// The backend appears: ResolvedRefs flips (new time, new generation);
	// Accepted holds (old time, new generation).
	c.SetService(svc("shop", "ghost", nil))
	rt.Generation = 2
	flipped := HTTPRouteStatus(model.Config{}, c, rt, t1)
	rr := find(t, flipped, "web", "ResolvedRefs")
	if rr.Status != metav1.ConditionTrue || !rr.LastTransitionTime.Equal(&t1) || rr.ObservedGeneration != 2 {
		t.Errorf("ResolvedRefs %+v, want True since %v at generation 2", rr, t1)
	}
	acc := find(t, flipped, "web", "Accepted")
	if !acc.LastTransitionTime.Equal(&t0) || acc.ObservedGeneration != 2 {
		t.Errorf("Accepted %+v, want its time %v kept at generation 2", acc, t0)
	}
}

func equalStatus(a, b gatewayv1.RouteStatus) bool {
	if len(a.Parents) != len(b.Parents) {
		return false
	}
	for i := range a.Parents {
		pa, pb := a.Parents[i], b.Parents[i]
		if parentKey(pa.ParentRef, "shop") != parentKey(pb.ParentRef, "shop") || pa.ControllerName != pb.ControllerName || len(pa.Conditions) != len(pb.Conditions) {
			return false
		}
		for j := range pa.Conditions {
			ca, cb := pa.Conditions[j], pb.Conditions[j]
			if ca.Type != cb.Type || ca.Status != cb.Status || ca.Reason != cb.Reason || ca.Message != cb.Message ||
				ca.ObservedGeneration != cb.ObservedGeneration || !ca.LastTransitionTime.Equal(&cb.LastTransitionTime) {
				return false
			}
		}
	}
	return true
}

func ptr[T any](v T) *T { return &v }
