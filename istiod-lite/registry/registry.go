package registry

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	ixds "github.com/meshlite/meshlite/internal/xds"
	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/istiod-lite/model"
	"github.com/meshlite/meshlite/istiod-lite/xds"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/proto/workload"
)

// Publisher receives computed resources; *xds.Cache is one.
type Publisher interface {
	Update(typeURL string, set []*xds.Resource, remove []string) int
	MarkReady()
}

type kind int

const (
	kindNamespace kind = iota
	kindNode
	kindPod
	kindService
	kindSlice
	kindGateway
	kindHTTPRoute
	kindAuthz
	kindPeerAuth
	kindGRPCRoute
	kindTraffic
	kindGrant
	kindSynced
)

var kindNames = [...]string{"namespace", "node", "pod", "service", "endpointslice", "gateway", "httproute", "authorizationpolicy",
	"peerauthentication", "grpcroute", "trafficpolicy", "referencegrant", "synced"}

// event is one informer notification; old or cur is nil on add or delete.
type event struct {
	kind     kind
	old, cur any
}

// objRef names an object whose resources depend on a waypoint Gateway.
type objRef struct {
	kind kind
	key  types.NamespacedName
}

// Registry turns cluster state into Workload API resources.
type Registry struct {
	in  *Informers
	b   *model.Builder
	out Publisher
	log *slog.Logger

	mu     sync.Mutex
	queue  []event
	signal chan struct{}

	// Owned by the worker.
	sliceUIDs map[types.NamespacedName][]string
	wpDeps    map[string]map[objRef]struct{}
	objWP     map[objRef]string
	paKeys    map[string]bool
	// l7Keys are the ServiceConfig names published.
	l7Keys map[string]bool
	// synced: the informers' first lists are in (kindSynced applied).
	synced bool

	events    *prometheus.CounterVec
	recompute prometheus.Histogram
}

// New registers the registry's handlers on the informers (before they
// start) and returns it; Run does the work.
func New(cfg model.Config, in *Informers, out Publisher, log *slog.Logger, reg prometheus.Registerer) (*Registry, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Registry{
		in:        in,
		b:         model.NewBuilder(cfg, model.NewStore()),
		out:       out,
		log:       log,
		signal:    make(chan struct{}, 1),
		sliceUIDs: map[types.NamespacedName][]string{},
		wpDeps:    map[string]map[objRef]struct{}{},
		objWP:     map[objRef]string{},
		paKeys:    map[string]bool{},
		l7Keys:    map[string]bool{},
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlite_istiod_registry_events_total", Help: "Kubernetes object events processed, by kind."}, []string{"kind"}),
		recompute: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "meshlite_istiod_registry_batch_seconds", Help: "Seconds to apply a batch of events and recompute what they affect.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10)}),
	}
	if reg != nil {
		reg.MustRegister(r.events, r.recompute)
	}
	for k, inf := range r.kinds(nil) {
		if err := r.watch(k, inf); err != nil {
			return nil, err
		}
	}
	// An API installed later: watch its informers as those above, before
	// they start; their first lists then arrive as adds and recompute what
	// they touch, as any change would.
	in.OnServed(func(a API) error {
		for k, inf := range r.kinds(&a) {
			if err := r.watch(k, inf); err != nil {
				return err
			}
		}
		return nil
	})
	return r, nil
}

// kinds maps each kind to its informer (nil: an API the cluster does not
// serve); with only, just the kinds of that API.
func (r *Registry) kinds(only *API) map[kind]cache.SharedIndexInformer {
	in := r.in
	if only != nil {
		switch *only {
		case GatewayAPI:
			return map[kind]cache.SharedIndexInformer{kindGateway: in.Gateways, kindHTTPRoute: in.HTTPRoutes, kindGRPCRoute: in.GRPCRoutes}
		case ReferenceGrants:
			return map[kind]cache.SharedIndexInformer{kindGrant: in.ReferenceGrants}
		case TrafficPolicies:
			return map[kind]cache.SharedIndexInformer{kindTraffic: in.TrafficPolicies}
		case AuthorizationPolicies:
			return map[kind]cache.SharedIndexInformer{kindAuthz: in.AuthorizationPolicies}
		case PeerAuthentications:
			return map[kind]cache.SharedIndexInformer{kindPeerAuth: in.PeerAuthentications}
		}
		return nil
	}
	return map[kind]cache.SharedIndexInformer{
		kindNamespace: in.Namespaces, kindNode: in.Nodes, kindPod: in.Pods, kindService: in.Services,
		kindSlice: in.EndpointSlices, kindGateway: in.Gateways, kindHTTPRoute: in.HTTPRoutes, kindAuthz: in.AuthorizationPolicies,
		kindPeerAuth: in.PeerAuthentications, kindGRPCRoute: in.GRPCRoutes, kindTraffic: in.TrafficPolicies,
		kindGrant: in.ReferenceGrants,
	}
}

// watch queues inf's events as kind k; a nil inf (not served) is skipped.
func (r *Registry) watch(k kind, inf cache.SharedIndexInformer) error {
	if inf == nil {
		return nil
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { r.enqueue(event{kind: k, cur: r.decode(k, o)}) },
		UpdateFunc: func(o, n any) { r.enqueue(event{kind: k, old: r.decode(k, o), cur: r.decode(k, n)}) },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			r.enqueue(event{kind: k, old: r.decode(k, o)})
		},
	}); err != nil {
		return fmt.Errorf("watch %s: %w", kindNames[k], err)
	}
	return nil
}

// decode turns the policy CRDs' unstructured objects into model types; a
// policy that does not decode is treated as absent, with an error logged.
func (r *Registry) decode(k kind, o any) any {
	u, ok := o.(*unstructured.Unstructured)
	if !ok {
		return o
	}
	var (
		v   any
		err error
	)
	switch k {
	case kindAuthz:
		v, err = model.DecodeAuthorizationPolicy(u)
	case kindPeerAuth:
		v, err = model.DecodePeerAuthentication(u)
	case kindTraffic:
		v, err = policyv1alpha1.Decode(u)
	default:
		return nil
	}
	if err != nil {
		r.log.Error("ignoring a policy that does not decode", "err", err)
		return nil
	}
	return v
}

func (r *Registry) enqueue(e event) {
	if e.old == nil && e.cur == nil {
		return
	}
	r.mu.Lock()
	r.queue = append(r.queue, e)
	r.mu.Unlock()
	select {
	case r.signal <- struct{}{}:
	default:
	}
}

// Run waits for the informers to list, publishes the first complete
// picture (then marks the publisher ready), and follows changes until ctx
// ends. The informers must be started by the caller.
func (r *Registry) Run(ctx context.Context) error {
	go func() {
		if cache.WaitForCacheSync(ctx.Done(), r.in.HasSynced) {
			// Every event of the initial lists is queued before this marker.
			r.mu.Lock()
			r.queue = append(r.queue, event{kind: kindSynced, cur: true})
			r.mu.Unlock()
			select {
			case r.signal <- struct{}{}:
			default:
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.signal:
		}
		r.mu.Lock()
		batch := r.queue
		r.queue = nil
		r.mu.Unlock()
		if len(batch) > 0 {
			r.process(batch)
		}
	}
}

// dirty collects what a batch of events touched.
type dirty struct {
	pods, services, slices, authz map[types.NamespacedName]struct{}
	peerAuth                      bool
	synced                        bool
}

func (d *dirty) add(m *map[types.NamespacedName]struct{}, ns, name string) {
	if *m == nil {
		*m = map[types.NamespacedName]struct{}{}
	}
	(*m)[types.NamespacedName{Namespace: ns, Name: name}] = struct{}{}
}

func (r *Registry) process(batch []event) {
	start := time.Now()
	var d dirty
	for _, e := range batch {
		r.events.WithLabelValues(kindNames[e.kind]).Inc()
		r.apply(e, &d)
	}
	addr, authz, l7c := r.recomputeDirty(&d)
	if n := len(addr.set) + len(addr.remove); n > 0 {
		r.out.Update(ixds.TypeAddress, addr.set, addr.remove)
	}
	if n := len(authz.set) + len(authz.remove); n > 0 {
		r.out.Update(ixds.TypeAuthorization, authz.set, authz.remove)
	}
	if n := len(l7c.set) + len(l7c.remove); n > 0 {
		r.out.Update(l7.TypeURL, l7c.set, l7c.remove)
	}
	r.recompute.Observe(time.Since(start).Seconds())
	if d.synced {
		r.out.MarkReady()
		r.log.Info("cluster state synced", "pods", r.b.Store().PodCount(), "took_last_batch", time.Since(start).Round(time.Millisecond))
	}
}

// apply updates the store with one event and marks what it affects.
func (r *Registry) apply(e event, d *dirty) {
	s := r.b.Store()
	switch e.kind {
	case kindSynced:
		d.synced = true
		r.synced = true
		// Backend Services seen before this were not followed to the
		// routes naming them (below): recompute every route's parents once.
		for _, rt := range s.HTTPRoutes("") {
			for _, k := range model.HTTPRouteServices(rt) {
				d.add(&d.services, k.Namespace, k.Name)
			}
		}
		for _, rt := range s.GRPCRoutes("") {
			for _, k := range model.ServiceParents(rt.Namespace, rt.Spec.ParentRefs) {
				d.add(&d.services, k.Namespace, k.Name)
			}
		}
	case kindNamespace:
		old, _ := e.old.(*corev1.Namespace)
		cur, _ := e.cur.(*corev1.Namespace)
		name := nameOf(old, cur)
		if cur != nil {
			s.SetNamespace(cur)
		} else {
			s.DeleteNamespace(name)
		}
		// Enrollment, waypoints and traffic distribution come from labels
		// and annotations; anything else about a namespace changes nothing.
		if old == nil || cur == nil || !reflect.DeepEqual(old.Labels, cur.Labels) || !reflect.DeepEqual(old.Annotations, cur.Annotations) {
			for _, p := range s.Pods(name) {
				d.add(&d.pods, p.Namespace, p.Name)
			}
			for _, svc := range s.Services(name) {
				d.add(&d.services, svc.Namespace, svc.Name)
			}
		}
	case kindNode:
		old, _ := e.old.(*corev1.Node)
		cur, _ := e.cur.(*corev1.Node)
		if cur != nil {
			s.SetNode(cur)
		} else if old != nil {
			s.DeleteNode(old.Name)
		}
		if old == nil || cur == nil || !reflect.DeepEqual(old.Labels, cur.Labels) {
			for _, k := range s.PodsOnNode(nameOf(old, cur)) {
				d.add(&d.pods, k.Namespace, k.Name)
			}
		}
	case kindPod:
		old, _ := e.old.(*corev1.Pod)
		cur, _ := e.cur.(*corev1.Pod)
		if cur != nil {
			s.SetPod(cur)
			d.add(&d.pods, cur.Namespace, cur.Name)
		} else if old != nil {
			s.DeletePod(old.Namespace, old.Name)
			d.add(&d.pods, old.Namespace, old.Name)
		}
	case kindService:
		old, _ := e.old.(*corev1.Service)
		cur, _ := e.cur.(*corev1.Service)
		var ns, name string
		if cur != nil {
			s.SetService(cur)
			ns, name = cur.Namespace, cur.Name
		} else {
			s.DeleteService(old.Namespace, old.Name)
			ns, name = old.Namespace, old.Name
		}
		d.add(&d.services, ns, name)
		// Services whose routes name it as a backend: that backend turns
		// valid or invalid ("Service not found") as it comes or goes. Not
		// during the first lists (every route is scanned once at the sync
		// instead of once per Service).
		if r.synced && (old == nil) != (cur == nil) {
			for _, k := range model.BackendParents(s, ns, name) {
				d.add(&d.services, k.Namespace, k.Name)
			}
		}
		// The pods it selected or selects list it in their services; pods
		// reached through its slices too; and its slices' own workloads
		// depend on it.
		var sels []labels.Selector
		selectorless := false
		for _, svc := range []*corev1.Service{old, cur} {
			if svc == nil {
				continue
			}
			if len(svc.Spec.Selector) > 0 {
				sels = append(sels, labels.SelectorFromSet(svc.Spec.Selector))
			} else {
				selectorless = true
			}
		}
		if len(sels) > 0 {
			for _, p := range s.Pods(ns) {
				for _, sel := range sels {
					if sel.Matches(labels.Set(p.Labels)) {
						d.add(&d.pods, p.Namespace, p.Name)
						break
					}
				}
			}
		}
		for _, es := range s.EndpointSlicesOf(ns, name) {
			d.add(&d.slices, es.Namespace, es.Name)
			if selectorless {
				markSlicePods(es, d)
			}
		}
	case kindSlice:
		old, _ := e.old.(*discoveryv1.EndpointSlice)
		cur, _ := e.cur.(*discoveryv1.EndpointSlice)
		if cur != nil {
			s.SetEndpointSlice(cur)
			d.add(&d.slices, cur.Namespace, cur.Name)
		} else {
			s.DeleteEndpointSlice(old.Namespace, old.Name)
			d.add(&d.slices, old.Namespace, old.Name)
		}
		for _, es := range []*discoveryv1.EndpointSlice{old, cur} {
			if es != nil && r.serviceIsSelectorless(es) {
				markSlicePods(es, d)
			}
		}
	case kindGateway:
		old, _ := e.old.(*gatewayv1.Gateway)
		cur, _ := e.cur.(*gatewayv1.Gateway)
		if cur != nil {
			s.SetGateway(cur)
		} else {
			s.DeleteGateway(old.Namespace, old.Name)
		}
		var key string
		if cur != nil {
			key = cur.Namespace + "/" + cur.Name
		} else {
			key = old.Namespace + "/" + old.Name
		}
		for ref := range r.wpDeps[key] {
			switch ref.kind {
			case kindPod:
				d.add(&d.pods, ref.key.Namespace, ref.key.Name)
			case kindService:
				d.add(&d.services, ref.key.Namespace, ref.key.Name)
			}
		}
	case kindHTTPRoute:
		old, _ := e.old.(*gatewayv1.HTTPRoute)
		cur, _ := e.cur.(*gatewayv1.HTTPRoute)
		if cur != nil {
			s.SetHTTPRoute(cur)
		} else if old != nil {
			s.DeleteHTTPRoute(old.Namespace, old.Name)
		} else {
			return
		}
		// The Services it attaches to, before and after (GAMMA parentRefs):
		// their L7 configuration changes (their Workload API resources
		// recompute to the same versions and push nothing).
		for _, rt := range []*gatewayv1.HTTPRoute{old, cur} {
			if rt == nil {
				continue
			}
			for _, k := range model.HTTPRouteServices(rt) {
				d.add(&d.services, k.Namespace, k.Name)
			}
		}
	case kindGRPCRoute:
		old, _ := e.old.(*gatewayv1.GRPCRoute)
		cur, _ := e.cur.(*gatewayv1.GRPCRoute)
		if cur != nil {
			s.SetGRPCRoute(cur)
		} else if old != nil {
			s.DeleteGRPCRoute(old.Namespace, old.Name)
		} else {
			return
		}
		for _, rt := range []*gatewayv1.GRPCRoute{old, cur} {
			if rt != nil {
				for _, k := range model.ServiceParents(rt.Namespace, rt.Spec.ParentRefs) {
					d.add(&d.services, k.Namespace, k.Name)
				}
			}
		}
	case kindGrant:
		old, _ := e.old.(*gatewayv1beta1.ReferenceGrant)
		cur, _ := e.cur.(*gatewayv1beta1.ReferenceGrant)
		if cur != nil {
			s.SetReferenceGrant(cur)
		} else if old != nil {
			s.DeleteReferenceGrant(old.Namespace, old.Name)
		} else {
			return
		}
		// The routes of the namespaces it lets in (before and after) may
		// gain or lose backends: the Services they attach to recompute.
		seen := map[string]bool{}
		for _, g := range []*gatewayv1beta1.ReferenceGrant{old, cur} {
			if g == nil {
				continue
			}
			for _, f := range g.Spec.From {
				ns := string(f.Namespace)
				if seen[ns] {
					continue
				}
				seen[ns] = true
				for _, rt := range s.HTTPRoutes(ns) {
					for _, k := range model.HTTPRouteServices(rt) {
						d.add(&d.services, k.Namespace, k.Name)
					}
				}
				for _, rt := range s.GRPCRoutes(ns) {
					for _, k := range model.ServiceParents(rt.Namespace, rt.Spec.ParentRefs) {
						d.add(&d.services, k.Namespace, k.Name)
					}
				}
			}
		}
	case kindTraffic:
		old, _ := e.old.(*policyv1alpha1.TrafficPolicy)
		cur, _ := e.cur.(*policyv1alpha1.TrafficPolicy)
		if cur != nil {
			s.SetTrafficPolicy(cur)
		} else if old != nil {
			s.DeleteTrafficPolicy(old.Namespace, old.Name)
		} else {
			return
		}
		// Its targets, before and after: Services, and the Services of
		// targeted routes.
		for _, p := range []*policyv1alpha1.TrafficPolicy{old, cur} {
			if p == nil {
				continue
			}
			for _, t := range p.Spec.TargetRefs {
				switch t.Kind {
				case "Service":
					d.add(&d.services, p.Namespace, t.Name)
				case "HTTPRoute":
					if rt := s.HTTPRoute(p.Namespace, t.Name); rt != nil {
						for _, k := range model.HTTPRouteServices(rt) {
							d.add(&d.services, k.Namespace, k.Name)
						}
					}
				case "GRPCRoute":
					if rt := s.GRPCRoute(p.Namespace, t.Name); rt != nil {
						for _, k := range model.ServiceParents(rt.Namespace, rt.Spec.ParentRefs) {
							d.add(&d.services, k.Namespace, k.Name)
						}
					}
				}
			}
		}
	case kindAuthz:
		old, _ := e.old.(*model.AuthorizationPolicy)
		cur, _ := e.cur.(*model.AuthorizationPolicy)
		var ns, name string
		if cur != nil {
			s.SetAuthorizationPolicy(cur)
			ns, name = cur.Namespace, cur.Name
		} else if old != nil {
			s.DeleteAuthorizationPolicy(old.Namespace, old.Name)
			ns, name = old.Namespace, old.Name
		} else {
			return
		}
		d.add(&d.authz, ns, name)
		// A policy for waypoints (targetRefs) changes the L7 configuration
		// of every Service bound to a waypoint that it may target: those
		// of its namespace, those behind the waypoints of its namespace,
		// and, from the root namespace (GatewayClass), all of them.
		if (old != nil && model.PolicyTargetsWaypoints(old)) || (cur != nil && model.PolicyTargetsWaypoints(cur)) {
			for wp, refs := range r.wpDeps {
				wns, _, _ := strings.Cut(wp, "/")
				for ref := range refs {
					if ref.kind == kindService && (ns == r.b.Config().RootNamespace || wns == ns || ref.key.Namespace == ns) {
						d.add(&d.services, ref.key.Namespace, ref.key.Name)
					}
				}
			}
		}
		r.markSelected(d, ns, func(p *corev1.Pod) bool {
			return (old != nil && r.b.AuthorizationSelects(old, p.Namespace, p.Labels)) ||
				(cur != nil && r.b.AuthorizationSelects(cur, p.Namespace, p.Labels))
		})
	case kindPeerAuth:
		old, _ := e.old.(*model.PeerAuthentication)
		cur, _ := e.cur.(*model.PeerAuthentication)
		var ns string
		if cur != nil {
			s.SetPeerAuthentication(cur)
			ns = cur.Namespace
		} else if old != nil {
			s.DeletePeerAuthentication(old.Namespace, old.Name)
			ns = old.Namespace
		} else {
			return
		}
		d.peerAuth = true
		r.markSelected(d, ns, func(p *corev1.Pod) bool {
			return (old != nil && r.b.PeerAuthenticationSelects(old, p.Namespace, p.Labels)) ||
				(cur != nil && r.b.PeerAuthenticationSelects(cur, p.Namespace, p.Labels))
		})
	}
}

// markSelected marks the pods a policy of namespace ns may select: those
// of ns, or of every namespace for the root namespace.
func (r *Registry) markSelected(d *dirty, ns string, selects func(*corev1.Pod) bool) {
	scope := ns
	if ns == r.b.Config().RootNamespace {
		scope = ""
	}
	for _, p := range r.b.Store().Pods(scope) {
		if selects(p) {
			d.add(&d.pods, p.Namespace, p.Name)
		}
	}
}

func (r *Registry) serviceIsSelectorless(es *discoveryv1.EndpointSlice) bool {
	svc := r.b.Store().Service(es.Namespace, es.Labels[discoveryv1.LabelServiceName])
	return svc != nil && len(svc.Spec.Selector) == 0
}

func markSlicePods(es *discoveryv1.EndpointSlice, d *dirty) {
	for _, ep := range es.Endpoints {
		if t := ep.TargetRef; t != nil && t.Kind == "Pod" {
			ns := t.Namespace
			if ns == "" {
				ns = es.Namespace
			}
			d.add(&d.pods, ns, t.Name)
		}
	}
}

func nameOf[T interface{ GetName() string }](old, cur T) string {
	if any(cur) != nil && !reflect.ValueOf(cur).IsNil() {
		return cur.GetName()
	}
	return old.GetName()
}

type changes struct {
	set    []*xds.Resource
	remove []string
	errs   []error
}

func (c *changes) put(r *xds.Resource, err error) {
	if err != nil {
		c.errs = append(c.errs, err)
		return
	}
	c.set = append(c.set, r)
}

// recomputeDirty computes every marked resource from the store.
func (r *Registry) recomputeDirty(d *dirty) (addr, authz, l7c changes) {
	cfg := r.b.Config()
	s := r.b.Store()
	for k := range d.pods {
		uid := cfg.PodUID(k.Namespace, k.Name)
		ref := objRef{kindPod, k}
		p := s.Pod(k.Namespace, k.Name)
		if p == nil {
			addr.remove = append(addr.remove, uid)
			r.setDep(ref, "")
			continue
		}
		info := r.b.PodWorkload(p)
		r.setDep(ref, info.WaypointKey)
		if info.Workload == nil {
			addr.remove = append(addr.remove, uid)
			continue
		}
		addr.put(workloadResource(info.Workload))
	}
	for k := range d.services {
		key := cfg.ServiceKey(k.Namespace, k.Name)
		ref := objRef{kindService, k}
		svc := s.Service(k.Namespace, k.Name)
		if svc == nil {
			addr.remove = append(addr.remove, key)
			r.removeL7(&l7c, key)
			r.setDep(ref, "")
			continue
		}
		sci := r.b.ServiceConfig(svc)
		if len(sci.Warnings) > 0 {
			r.log.Warn("waypoint configuration partly applied", "service", k.String(), "unsupported", sci.Warnings)
		}
		if sci.Config == nil {
			r.removeL7(&l7c, key)
		} else {
			res, err := xds.NewResource(l7.TypeURL, key, sci.Config, nil, nil)
			if res != nil {
				res.Scope = sci.WaypointKey
				r.l7Keys[key] = true
			}
			l7c.put(res, err)
		}
		info, err := r.b.Service(svc)
		r.setDep(ref, info.WaypointKey)
		if err != nil {
			r.log.Warn("service not published", "service", k.String(), "err", err)
		}
		if info.Service == nil {
			addr.remove = append(addr.remove, key)
			continue
		}
		addr.put(serviceResource(key, info.Service))
	}
	for k := range d.slices {
		var ws []*workload.Workload
		if es := s.EndpointSlice(k.Namespace, k.Name); es != nil {
			ws = r.b.SliceWorkloads(es)
		}
		keep := map[string]bool{}
		var uids []string
		for _, w := range ws {
			keep[w.Uid] = true
			uids = append(uids, w.Uid)
			addr.put(workloadResource(w))
		}
		for _, old := range r.sliceUIDs[k] {
			if !keep[old] {
				addr.remove = append(addr.remove, old)
			}
		}
		if len(uids) > 0 {
			r.sliceUIDs[k] = uids
		} else {
			delete(r.sliceUIDs, k)
		}
	}
	for k := range d.authz {
		key := model.PolicyKey(k.Namespace, k.Name)
		p := s.AuthorizationPolicy(k.Namespace, k.Name)
		if p == nil {
			authz.remove = append(authz.remove, key)
			continue
		}
		info := r.b.Authorization(p)
		if len(info.Warnings) > 0 {
			r.log.Warn("AuthorizationPolicy partly enforced by ztunnel", "policy", key, "unsupported", info.Warnings)
		}
		if info.Authorization == nil {
			authz.remove = append(authz.remove, key)
			continue
		}
		authz.put(xds.NewResource(ixds.TypeAuthorization, key, info.Authorization, nil, nil))
	}
	if d.peerAuth {
		keys := map[string]bool{}
		if r.b.HasStaticStrict() {
			k := r.b.StaticStrictKey()
			keys[k] = true
			authz.put(xds.NewResource(ixds.TypeAuthorization, k, r.b.StaticStrictPolicy(), nil, nil))
		}
		for _, pa := range s.PeerAuthentications("") {
			if a := r.b.PeerAuthorization(pa); a != nil {
				k := model.PolicyKey(a.Namespace, a.Name)
				keys[k] = true
				authz.put(xds.NewResource(ixds.TypeAuthorization, k, a, nil, nil))
			}
		}
		for k := range r.paKeys {
			if !keys[k] {
				authz.remove = append(authz.remove, k)
			}
		}
		r.paKeys = keys
	}
	for _, err := range append(append(addr.errs, authz.errs...), l7c.errs...) {
		r.log.Error("cannot publish a resource", "err", err)
	}
	sort.Strings(addr.remove)
	sort.Strings(authz.remove)
	sort.Strings(l7c.remove)
	return addr, authz, l7c
}

// removeL7 removes a Service's L7 configuration if it was published.
func (r *Registry) removeL7(c *changes, key string) {
	if r.l7Keys[key] {
		delete(r.l7Keys, key)
		c.remove = append(c.remove, key)
	}
}

// setDep records which waypoint Gateway an object's resource depends on.
func (r *Registry) setDep(ref objRef, wp string) {
	if old, ok := r.objWP[ref]; ok {
		if old == wp {
			return
		}
		if m := r.wpDeps[old]; m != nil {
			delete(m, ref)
			if len(m) == 0 {
				delete(r.wpDeps, old)
			}
		}
		delete(r.objWP, ref)
	}
	if wp == "" {
		return
	}
	r.objWP[ref] = wp
	m := r.wpDeps[wp]
	if m == nil {
		m = map[objRef]struct{}{}
		r.wpDeps[wp] = m
	}
	m[ref] = struct{}{}
}

func workloadResource(w *workload.Workload) (*xds.Resource, error) {
	var aliases []string
	if w.NetworkMode != workload.NetworkMode_HOST_NETWORK {
		for _, a := range w.Addresses {
			if ip, ok := netip.AddrFromSlice(a); ok {
				aliases = append(aliases, ixds.AddressAlias(w.Network, ip.String()))
			}
		}
	}
	memberOf := make([]string, 0, len(w.Services))
	for k := range w.Services {
		memberOf = append(memberOf, k)
	}
	sort.Strings(memberOf)
	return xds.NewResource(ixds.TypeAddress, w.Uid, &workload.Address{Type: &workload.Address_Workload{Workload: w}}, aliases, memberOf)
}

func serviceResource(key string, s *workload.Service) (*xds.Resource, error) {
	var aliases []string
	for _, a := range s.Addresses {
		if ip, ok := netip.AddrFromSlice(a.Address); ok {
			aliases = append(aliases, ixds.AddressAlias(a.Network, ip.String()))
		}
	}
	return xds.NewResource(ixds.TypeAddress, key, &workload.Address{Type: &workload.Address_Service{Service: s}}, aliases, nil)
}
