package registry

import (
	"log/slog"
	"sort"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	"github.com/meshlite/meshlite/istiod-lite/model"
	"github.com/meshlite/meshlite/istiod-lite/xds"
	"github.com/meshlite/meshlite/proto/l7"
)

// publisher records what the registry publishes per batch.
type publisher struct {
	batches [][]string // "+name" / "-name"
	ready   bool
}

func (p *publisher) Update(typeURL string, set []*xds.Resource, remove []string) int {
	var b []string
	// L7 configurations are told apart, with the waypoint they go to.
	pfx := ""
	if typeURL == l7.TypeURL {
		pfx = "l7:"
	}
	for _, r := range set {
		if r.Scope != "" {
			b = append(b, "+"+pfx+r.Name+"@"+r.Scope)
		} else {
			b = append(b, "+"+pfx+r.Name)
		}
	}
	for _, n := range remove {
		b = append(b, "-"+pfx+n)
	}
	sort.Strings(b)
	p.batches = append(p.batches, b)
	return len(b)
}
func (p *publisher) MarkReady() { p.ready = true }

func testRegistry() (*Registry, *publisher) {
	p := &publisher{}
	r := &Registry{
		b: model.NewBuilder(model.Config{}, model.NewStore()), out: p, log: slog.New(slog.DiscardHandler),
		sliceUIDs: map[types.NamespacedName][]string{}, wpDeps: map[string]map[objRef]struct{}{},
		objWP: map[objRef]string{}, paKeys: map[string]bool{}, l7Keys: map[string]bool{},
		events:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "e"}, []string{"kind"}),
		recompute: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "h"}),
	}
	return r, p
}

func pod(ns, name, ip string, lbls map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbls},
		Spec:   corev1.PodSpec{NodeName: "n1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip}}
}

func last(p *publisher) []string {
	if len(p.batches) == 0 {
		return nil
	}
	return p.batches[len(p.batches)-1]
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestRegistry_RecomputesOnlyWhatAChangeAffects(t *testing.T) {
	r, p := testRegistry()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "a"}}
	p1 := pod("a", "p1", "10.0.0.1", map[string]string{"app": "web"})
	p2 := pod("a", "p2", "10.0.0.2", map[string]string{"app": "db"})
	other := pod("b", "p3", "10.0.0.3", map[string]string{"app": "web"})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", Selector: map[string]string{"app": "web"}}}
	r.process([]event{{kind: kindNamespace, cur: ns}, {kind: kindPod, cur: p1}, {kind: kindPod, cur: p2}, {kind: kindPod, cur: other},
		{kind: kindService, cur: svc}, {kind: kindSynced, cur: true}})
	if !p.ready {
		t.Fatal("not marked ready after the synced marker")
	}
	want := []string{"+Kubernetes//Pod/a/p1", "+Kubernetes//Pod/a/p2", "+Kubernetes//Pod/b/p3", "+a/web.a.svc.cluster.local"}
	if got := last(p); !equal(got, want) {
		t.Fatalf("initial batch %v, want %v", got, want)
	}
	step := func(what string, e event, want ...string) {
		t.Helper()
		n := len(p.batches)
		r.process([]event{e})
		var got []string
		for _, b := range p.batches[n:] {
			got = append(got, b...)
		}
		sort.Strings(want)
		if !equal(got, want) {
			t.Errorf("%s: recomputed %v, want %v", what, got, want)
		}
	}
	p1b := p1.DeepCopy()
	p1b.Labels["version"] = "v2"
	step("a pod's label", event{kind: kindPod, old: p1, cur: p1b}, "+Kubernetes//Pod/a/p1")
	nsb := ns.DeepCopy()
	nsb.Labels = map[string]string{"istio.io/dataplane-mode": "ambient"}
	step("a namespace's labels", event{kind: kindNamespace, old: ns, cur: nsb},
		"+Kubernetes//Pod/a/p1", "+Kubernetes//Pod/a/p2", "+a/web.a.svc.cluster.local")
	nsc := nsb.DeepCopy()
	nsc.Finalizers = []string{"x"}
	step("a namespace change that is not labels", event{kind: kindNamespace, old: nsb, cur: nsc})
	svcb := svc.DeepCopy()
	svcb.Spec.Selector = map[string]string{"app": "db"}
	step("a service's selector moves", event{kind: kindService, old: svc, cur: svcb},
		"+Kubernetes//Pod/a/p1", "+Kubernetes//Pod/a/p2", "+a/web.a.svc.cluster.local")
	step("a pod deleted", event{kind: kindPod, old: p2}, "-Kubernetes//Pod/a/p2")
	ap := &model.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "pol"}}
	step("a namespace-wide policy", event{kind: kindAuthz, cur: ap}, "+a/pol")

	// A Gateway change recomputes what is bound to it.
	svcc := svcb.DeepCopy()
	svcc.Labels = map[string]string{"istio.io/use-waypoint": "wp"}
	step("a service names a waypoint", event{kind: kindService, old: svcb, cur: svcc}, "+a/web.a.svc.cluster.local")
	ht := gatewayv1.HostnameAddressType
	gw := &gatewayv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "wp"},
		Spec:   gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint"},
		Status: gatewayv1.GatewayStatus{Addresses: []gatewayv1.GatewayStatusAddress{{Type: &ht, Value: "wp.a.svc.cluster.local"}}}}
	step("its waypoint appears", event{kind: kindGateway, cur: gw}, "+a/web.a.svc.cluster.local", "+l7:a/web.a.svc.cluster.local@a/wp")
	gwGone := gw.DeepCopy()
	gwGone.Status.Addresses = nil
	step("its waypoint loses its address", event{kind: kindGateway, old: gw, cur: gwGone}, "+a/web.a.svc.cluster.local", "-l7:a/web.a.svc.cluster.local")
	step("its waypoint is back", event{kind: kindGateway, old: gwGone, cur: gw}, "+a/web.a.svc.cluster.local", "+l7:a/web.a.svc.cluster.local@a/wp")
	gw2 := &gatewayv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "unrelated"}, Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint"}}
	step("an unrelated gateway", event{kind: kindGateway, cur: gw2})
}

// An HTTPRoute is cached and recomputes exactly the Services it attaches
// to (GAMMA parentRefs of kind Service, before and after a change); a route
// under a Gateway, and everything else, is left alone.
func TestRegistry_HTTPRouteRecomputesItsParentServices(t *testing.T) {
	r, p := testRegistry()
	svc := func(ns, name, ip string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: ip, Selector: map[string]string{"app": name}}}
	}
	r.process([]event{
		{kind: kindNamespace, cur: &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "a"}}},
		{kind: kindNamespace, cur: &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "b"}}},
		{kind: kindPod, cur: pod("a", "web-1", "10.0.0.1", map[string]string{"app": "web"})},
		{kind: kindService, cur: svc("a", "web", "10.96.0.1")},
		{kind: kindService, cur: svc("a", "api", "10.96.0.2")},
		{kind: kindService, cur: svc("b", "db", "10.96.0.3")},
		{kind: kindSynced, cur: true},
	})
	step := func(what string, e event, want ...string) {
		t.Helper()
		n := len(p.batches)
		r.process([]event{e})
		var got []string
		for _, b := range p.batches[n:] {
			got = append(got, b...)
		}
		sort.Strings(want)
		if !equal(got, want) {
			t.Errorf("%s: recomputed %v, want %v", what, got, want)
		}
	}
	kindSvc, kindGW := gatewayv1.Kind("Service"), gatewayv1.Kind("Gateway")
	core, nsB := gatewayv1.Group(""), gatewayv1.Namespace("b")
	route := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "to-web"},
		Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
			{Group: &core, Kind: &kindSvc, Name: "web"}}}}}
	step("a route attached to a service", event{kind: kindHTTPRoute, cur: route}, "+a/web.a.svc.cluster.local")
	if got := r.b.Store().HTTPRoutesOf("a", "web"); len(got) != 1 || got[0] != route {
		t.Fatalf("routes of a/web = %v", got)
	}

	moved := route.DeepCopy()
	moved.Spec.ParentRefs = []gatewayv1.ParentReference{{Kind: &kindSvc, Name: "api"}, {Kind: &kindSvc, Namespace: &nsB, Name: "db"}}
	step("the route moves to two other services", event{kind: kindHTTPRoute, old: route, cur: moved},
		"+a/web.a.svc.cluster.local", "+a/api.a.svc.cluster.local", "+b/db.b.svc.cluster.local")
	if len(r.b.Store().HTTPRoutesOf("a", "web")) != 0 || len(r.b.Store().HTTPRoutesOf("b", "db")) != 1 {
		t.Error("route index not moved with the parentRefs")
	}

	gwRoute := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "ingress"},
		Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
			{Kind: &kindGW, Name: "web"}}}}}
	step("a route under a Gateway", event{kind: kindHTTPRoute, cur: gwRoute})
	if r.b.Store().HTTPRoute("a", "ingress") == nil {
		t.Error("the Gateway route was not cached")
	}

	step("the service route deleted", event{kind: kindHTTPRoute, old: moved},
		"+a/api.a.svc.cluster.local", "+b/db.b.svc.cluster.local")
	if r.b.Store().HTTPRoute("a", "to-web") != nil || len(r.b.Store().HTTPRoutesOf("b", "db")) != 0 {
		t.Error("the deleted route is still cached")
	}
	// Into the real cache: the recomputed services are unchanged, so the
	// route reaches no ztunnel.
	c := xds.NewCache()
	r.out = c
	r.process([]event{{kind: kindService, cur: svc("a", "web", "10.96.0.1")}})
	c.TakeChanges()
	r.process([]event{{kind: kindHTTPRoute, cur: route}})
	if ch, _ := c.TakeChanges(); ch != nil {
		t.Errorf("an HTTPRoute changed Workload API resources: %v", ch)
	}
}

// A ReferenceGrant recomputes the Services that routes of the namespaces it
// lets in attach to (their backends may change), before and after a
// change, and nothing else.
func TestRegistry_ReferenceGrantRecomputesServicesOfRoutesItLetsIn(t *testing.T) {
	r, p := testRegistry()
	svc := func(ns, name, ip string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: ip, Selector: map[string]string{"app": name}}}
	}
	kindSvc := gatewayv1.Kind("Service")
	httpRoute := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "r"},
		Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
			{Kind: &kindSvc, Name: "web"}}}}}
	grpcRoute := &gatewayv1.GRPCRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "c", Name: "g"},
		Spec: gatewayv1.GRPCRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
			{Kind: &kindSvc, Name: "api"}}}}}
	r.process([]event{
		{kind: kindService, cur: svc("a", "web", "10.96.0.1")},
		{kind: kindService, cur: svc("c", "api", "10.96.0.2")},
		{kind: kindService, cur: svc("b", "db", "10.96.0.3")},
		{kind: kindHTTPRoute, cur: httpRoute},
		{kind: kindGRPCRoute, cur: grpcRoute},
		{kind: kindSynced, cur: true},
	})
	grant := func(from ...string) *gatewayv1beta1.ReferenceGrant {
		g := &gatewayv1beta1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: "b", Name: "g"},
			Spec: gatewayv1beta1.ReferenceGrantSpec{To: []gatewayv1beta1.ReferenceGrantTo{{Kind: "Service"}}}}
		for _, ns := range from {
			g.Spec.From = append(g.Spec.From, gatewayv1beta1.ReferenceGrantFrom{Group: gatewayv1.GroupName, Kind: "HTTPRoute", Namespace: gatewayv1.Namespace(ns)})
		}
		return g
	}
	step := func(what string, e event, want ...string) {
		t.Helper()
		n := len(p.batches)
		r.process([]event{e})
		var got []string
		for _, b := range p.batches[n:] {
			got = append(got, b...)
		}
		sort.Strings(want)
		if !equal(got, want) {
			t.Errorf("%s: recomputed %v, want %v", what, got, want)
		}
	}
	g1 := grant("a")
	step("a grant for namespace a", event{kind: kindGrant, cur: g1}, "+a/web.a.svc.cluster.local")
	if len(r.b.Store().ReferenceGrants("b")) != 1 {
		t.Fatal("grant not cached")
	}
	g2 := grant("c")
	step("the grant moves to namespace c", event{kind: kindGrant, old: g1, cur: g2}, "+a/web.a.svc.cluster.local", "+c/api.c.svc.cluster.local")
	step("the grant deleted", event{kind: kindGrant, old: g2}, "+c/api.c.svc.cluster.local")
	if len(r.b.Store().ReferenceGrants("b")) != 0 {
		t.Error("deleted grant still cached")
	}
}

// A Service created or deleted recomputes the Services whose routes name
// it as a backend (backendRef or mirror, any namespace): their backend to
// it turns valid or invalid ("Service not found"). An update does not.
func TestRegistry_BackendServiceComingOrGoingRecomputesRouteParents(t *testing.T) {
	r, p := testRegistry()
	svc := func(ns, name, ip string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: ip, Selector: map[string]string{"app": name}}}
	}
	kindSvc := gatewayv1.Kind("Service")
	bNS := gatewayv1.Namespace("b")
	route := &gatewayv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "r"},
		Spec: gatewayv1.HTTPRouteSpec{
			CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Kind: &kindSvc, Name: "web"}}},
			Rules: []gatewayv1.HTTPRouteRule{{
				Filters: []gatewayv1.HTTPRouteFilter{{Type: gatewayv1.HTTPRouteFilterRequestMirror,
					RequestMirror: &gatewayv1.HTTPRequestMirrorFilter{BackendRef: gatewayv1.BackendObjectReference{Namespace: &bNS, Name: "shadow"}}}},
				BackendRefs: []gatewayv1.HTTPBackendRef{{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Name: "v2"}}}},
			}},
		}}
	r.process([]event{
		{kind: kindService, cur: svc("a", "web", "10.96.0.1")},
		{kind: kindHTTPRoute, cur: route},
		{kind: kindSynced, cur: true},
	})
	step := func(what string, e event, want ...string) {
		t.Helper()
		n := len(p.batches)
		r.process([]event{e})
		var got []string
		for _, b := range p.batches[n:] {
			got = append(got, b...)
		}
		sort.Strings(got)
		sort.Strings(want)
		if !equal(got, want) {
			t.Errorf("%s: recomputed %v, want %v", what, got, want)
		}
	}
	v2 := svc("a", "v2", "10.96.0.2")
	step("the backend created", event{kind: kindService, cur: v2}, "+a/v2.a.svc.cluster.local", "+a/web.a.svc.cluster.local")
	v2b := v2.DeepCopy()
	v2b.Labels = map[string]string{"x": "y"}
	step("the backend updated", event{kind: kindService, old: v2, cur: v2b}, "+a/v2.a.svc.cluster.local")
	step("the mirror backend in another namespace created", event{kind: kindService, cur: svc("b", "shadow", "10.96.0.3")},
		"+b/shadow.b.svc.cluster.local", "+a/web.a.svc.cluster.local")
	step("an unrelated Service created", event{kind: kindService, cur: svc("b", "v2", "10.96.0.4")}, "+b/v2.b.svc.cluster.local")
	step("the backend deleted", event{kind: kindService, old: v2b}, "-a/v2.a.svc.cluster.local", "+a/web.a.svc.cluster.local")
}
