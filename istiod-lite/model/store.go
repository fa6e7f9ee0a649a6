package model

import (
	"slices"
	"sort"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
)

// Store holds the Kubernetes objects the translation reads, indexed the way
// the Builder looks them up. Set* replaces an object (nil is not allowed),
// Delete* removes it. Objects are kept as given and must not be modified
// afterwards. Not safe for concurrent use.
type Store struct {
	namespaces map[string]*corev1.Namespace
	nodes      map[string]*corev1.Node
	pods       *nsIndex[*corev1.Pod]
	services   *nsIndex[*corev1.Service]
	slices     *nsIndex[*discoveryv1.EndpointSlice]
	gateways   *nsIndex[*gatewayv1.Gateway]
	httpRoutes *nsIndex[*gatewayv1.HTTPRoute]
	grpcRoutes *nsIndex[*gatewayv1.GRPCRoute]
	grants     *nsIndex[*gatewayv1beta1.ReferenceGrant]
	traffic    *nsIndex[*policyv1alpha1.TrafficPolicy]
	authz      *nsIndex[*AuthorizationPolicy]
	peerAuths  *nsIndex[*PeerAuthentication]

	podsByNode map[string]map[types.NamespacedName]struct{}
	// slicesByService: "<ns>/<service>" -> slice names.
	slicesByService map[string]map[string]struct{}
	// routesByService: Service -> the HTTPRoutes attached to it.
	routesByService map[types.NamespacedName]map[types.NamespacedName]struct{}
	// grpcRoutesByService: Service -> the GRPCRoutes attached to it.
	grpcRoutesByService map[types.NamespacedName]map[types.NamespacedName]struct{}
}

// NewStore returns an empty Store.
func NewStore() *Store {
	return &Store{
		namespaces:      map[string]*corev1.Namespace{},
		nodes:           map[string]*corev1.Node{},
		pods:            newNSIndex[*corev1.Pod](),
		services:        newNSIndex[*corev1.Service](),
		slices:          newNSIndex[*discoveryv1.EndpointSlice](),
		gateways:        newNSIndex[*gatewayv1.Gateway](),
		httpRoutes:      newNSIndex[*gatewayv1.HTTPRoute](),
		grpcRoutes:      newNSIndex[*gatewayv1.GRPCRoute](),
		grants:          newNSIndex[*gatewayv1beta1.ReferenceGrant](),
		traffic:         newNSIndex[*policyv1alpha1.TrafficPolicy](),
		authz:           newNSIndex[*AuthorizationPolicy](),
		peerAuths:       newNSIndex[*PeerAuthentication](),
		podsByNode:      map[string]map[types.NamespacedName]struct{}{},
		slicesByService: map[string]map[string]struct{}{},
		routesByService: map[types.NamespacedName]map[types.NamespacedName]struct{}{},

		grpcRoutesByService: map[types.NamespacedName]map[types.NamespacedName]struct{}{},
	}
}

// nsIndex maps namespace -> name -> object, and caches each namespace's
// sorted list (pods of a namespace are translated against the same list of
// services many times over).
type nsIndex[T any] struct {
	objs   map[string]map[string]T
	sorted map[string][]T
}

func newNSIndex[T any]() *nsIndex[T] {
	return &nsIndex[T]{objs: map[string]map[string]T{}, sorted: map[string][]T{}}
}

func (x *nsIndex[T]) get(ns, name string) (T, bool) {
	v, ok := x.objs[ns][name]
	return v, ok
}

func (x *nsIndex[T]) set(ns, name string, v T) {
	m := x.objs[ns]
	if m == nil {
		m = map[string]T{}
		x.objs[ns] = m
	}
	m[name] = v
	delete(x.sorted, ns)
}

func (x *nsIndex[T]) del(ns, name string) {
	if m := x.objs[ns]; m != nil {
		delete(m, name)
		if len(m) == 0 {
			delete(x.objs, ns)
		}
	}
	delete(x.sorted, ns)
}

// list returns the objects of ns sorted by name (all namespaces, sorted by
// namespace then name, when ns is ""). The result must not be modified.
func (x *nsIndex[T]) list(ns string) []T {
	if ns != "" {
		return x.listNS(ns)
	}
	nss := make([]string, 0, len(x.objs))
	for n := range x.objs {
		nss = append(nss, n)
	}
	sort.Strings(nss)
	var out []T
	for _, n := range nss {
		out = append(out, x.listNS(n)...)
	}
	return out
}

// listNS lists one namespace (possibly "", for objects that came without
// one), cached until it changes.
func (x *nsIndex[T]) listNS(ns string) []T {
	if l, ok := x.sorted[ns]; ok {
		return l
	}
	m := x.objs[ns]
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	l := make([]T, 0, len(names))
	for _, n := range names {
		l = append(l, m[n])
	}
	x.sorted[ns] = l
	return l
}

func (x *nsIndex[T]) count() int {
	n := 0
	for _, m := range x.objs {
		n += len(m)
	}
	return n
}

func (x *nsIndex[T]) empty() bool { return len(x.objs) == 0 }

// Namespaces.

func (s *Store) SetNamespace(o *corev1.Namespace) { s.namespaces[o.Name] = o }
func (s *Store) DeleteNamespace(name string)      { delete(s.namespaces, name) }
func (s *Store) Namespace(name string) *corev1.Namespace {
	return s.namespaces[name]
}

// Nodes.

func (s *Store) SetNode(o *corev1.Node)        { s.nodes[o.Name] = o }
func (s *Store) DeleteNode(name string)        { delete(s.nodes, name) }
func (s *Store) Node(name string) *corev1.Node { return s.nodes[name] }

// Pods.

func (s *Store) SetPod(o *corev1.Pod) {
	if old, ok := s.pods.get(o.Namespace, o.Name); ok && old.Spec.NodeName != o.Spec.NodeName {
		s.unindexPodNode(old)
	}
	s.pods.set(o.Namespace, o.Name, o)
	if o.Spec.NodeName != "" {
		m := s.podsByNode[o.Spec.NodeName]
		if m == nil {
			m = map[types.NamespacedName]struct{}{}
			s.podsByNode[o.Spec.NodeName] = m
		}
		m[types.NamespacedName{Namespace: o.Namespace, Name: o.Name}] = struct{}{}
	}
}

func (s *Store) DeletePod(ns, name string) {
	if old, ok := s.pods.get(ns, name); ok {
		s.unindexPodNode(old)
	}
	s.pods.del(ns, name)
}

func (s *Store) unindexPodNode(p *corev1.Pod) {
	if m := s.podsByNode[p.Spec.NodeName]; m != nil {
		delete(m, types.NamespacedName{Namespace: p.Namespace, Name: p.Name})
		if len(m) == 0 {
			delete(s.podsByNode, p.Spec.NodeName)
		}
	}
}

func (s *Store) Pod(ns, name string) *corev1.Pod { v, _ := s.pods.get(ns, name); return v }

// Pods lists the pods of ns ("" for all), sorted.
func (s *Store) Pods(ns string) []*corev1.Pod { return s.pods.list(ns) }

// PodCount is the number of pods held.
func (s *Store) PodCount() int { return s.pods.count() }

// PodsOnNode lists the pods bound to node.
func (s *Store) PodsOnNode(node string) []types.NamespacedName {
	out := make([]types.NamespacedName, 0, len(s.podsByNode[node]))
	for k := range s.podsByNode[node] {
		out = append(out, k)
	}
	return out
}

// Services.

func (s *Store) SetService(o *corev1.Service)         { s.services.set(o.Namespace, o.Name, o) }
func (s *Store) DeleteService(ns, name string)        { s.services.del(ns, name) }
func (s *Store) Services(ns string) []*corev1.Service { return s.services.list(ns) }
func (s *Store) Service(ns, name string) *corev1.Service {
	v, _ := s.services.get(ns, name)
	return v
}

// EndpointSlices.

func (s *Store) SetEndpointSlice(o *discoveryv1.EndpointSlice) {
	if old, ok := s.slices.get(o.Namespace, o.Name); ok {
		s.unindexSlice(old)
	}
	s.slices.set(o.Namespace, o.Name, o)
	if svc := o.Labels[discoveryv1.LabelServiceName]; svc != "" {
		k := o.Namespace + "/" + svc
		m := s.slicesByService[k]
		if m == nil {
			m = map[string]struct{}{}
			s.slicesByService[k] = m
		}
		m[o.Name] = struct{}{}
	}
}

func (s *Store) DeleteEndpointSlice(ns, name string) {
	if old, ok := s.slices.get(ns, name); ok {
		s.unindexSlice(old)
	}
	s.slices.del(ns, name)
}

func (s *Store) unindexSlice(o *discoveryv1.EndpointSlice) {
	k := o.Namespace + "/" + o.Labels[discoveryv1.LabelServiceName]
	if m := s.slicesByService[k]; m != nil {
		delete(m, o.Name)
		if len(m) == 0 {
			delete(s.slicesByService, k)
		}
	}
}

func (s *Store) EndpointSlice(ns, name string) *discoveryv1.EndpointSlice {
	v, _ := s.slices.get(ns, name)
	return v
}

// EndpointSlicesOf lists the slices labelled for service ns/name, sorted.
func (s *Store) EndpointSlicesOf(ns, name string) []*discoveryv1.EndpointSlice {
	names := s.slicesByService[ns+"/"+name]
	keys := make([]string, 0, len(names))
	for n := range names {
		keys = append(keys, n)
	}
	sort.Strings(keys)
	out := make([]*discoveryv1.EndpointSlice, 0, len(keys))
	for _, n := range keys {
		if es, ok := s.slices.get(ns, n); ok {
			out = append(out, es)
		}
	}
	return out
}

// EndpointSlices lists the slices of ns, sorted.
func (s *Store) EndpointSlices(ns string) []*discoveryv1.EndpointSlice { return s.slices.list(ns) }

// Gateways.

func (s *Store) SetGateway(o *gatewayv1.Gateway) { s.gateways.set(o.Namespace, o.Name, o) }
func (s *Store) DeleteGateway(ns, name string)   { s.gateways.del(ns, name) }
func (s *Store) Gateway(ns, name string) *gatewayv1.Gateway {
	v, _ := s.gateways.get(ns, name)
	return v
}

// HTTPRoutes. Nothing in the Workload API reads them; the waypoint's L7
// configuration does, per Service they attach to (GAMMA).

func (s *Store) SetHTTPRoute(o *gatewayv1.HTTPRoute) {
	if old, ok := s.httpRoutes.get(o.Namespace, o.Name); ok {
		s.unindexRoute(old)
	}
	s.httpRoutes.set(o.Namespace, o.Name, o)
	rk := types.NamespacedName{Namespace: o.Namespace, Name: o.Name}
	for _, svc := range HTTPRouteServices(o) {
		m := s.routesByService[svc]
		if m == nil {
			m = map[types.NamespacedName]struct{}{}
			s.routesByService[svc] = m
		}
		m[rk] = struct{}{}
	}
}

func (s *Store) DeleteHTTPRoute(ns, name string) {
	if old, ok := s.httpRoutes.get(ns, name); ok {
		s.unindexRoute(old)
	}
	s.httpRoutes.del(ns, name)
}

func (s *Store) unindexRoute(o *gatewayv1.HTTPRoute) {
	rk := types.NamespacedName{Namespace: o.Namespace, Name: o.Name}
	for _, svc := range HTTPRouteServices(o) {
		if m := s.routesByService[svc]; m != nil {
			delete(m, rk)
			if len(m) == 0 {
				delete(s.routesByService, svc)
			}
		}
	}
}

func (s *Store) HTTPRoute(ns, name string) *gatewayv1.HTTPRoute {
	v, _ := s.httpRoutes.get(ns, name)
	return v
}

// HTTPRoutes lists the routes of ns ("" for all), sorted.
func (s *Store) HTTPRoutes(ns string) []*gatewayv1.HTTPRoute { return s.httpRoutes.list(ns) }

// HTTPRoutesOf lists the routes attached to Service ns/name through a
// parentRef, sorted by namespace and name.
func (s *Store) HTTPRoutesOf(ns, name string) []*gatewayv1.HTTPRoute {
	keys := make([]types.NamespacedName, 0, len(s.routesByService[types.NamespacedName{Namespace: ns, Name: name}]))
	for k := range s.routesByService[types.NamespacedName{Namespace: ns, Name: name}] {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
	out := make([]*gatewayv1.HTTPRoute, 0, len(keys))
	for _, k := range keys {
		if rt, ok := s.httpRoutes.get(k.Namespace, k.Name); ok {
			out = append(out, rt)
		}
	}
	return out
}

// HTTPRouteServices lists the Services an HTTPRoute attaches to: its
// parentRefs of kind Service in the core group (GAMMA), the namespace
// defaulting to the route's. Gateway parents are not Services and are left
// out.
func HTTPRouteServices(rt *gatewayv1.HTTPRoute) []types.NamespacedName {
	var out []types.NamespacedName
	for _, p := range rt.Spec.ParentRefs {
		if p.Kind == nil || *p.Kind != "Service" {
			continue
		}
		if p.Group != nil && *p.Group != "" && *p.Group != "core" {
			continue
		}
		ns := rt.Namespace
		if p.Namespace != nil && *p.Namespace != "" {
			ns = string(*p.Namespace)
		}
		k := types.NamespacedName{Namespace: ns, Name: string(p.Name)}
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

// GRPCRoutes, indexed by the Services they attach to, as HTTPRoutes.

func (s *Store) SetGRPCRoute(o *gatewayv1.GRPCRoute) {
	if old, ok := s.grpcRoutes.get(o.Namespace, o.Name); ok {
		unindexParents(s.grpcRoutesByService, old.Namespace, old.Name, ServiceParents(old.Namespace, old.Spec.ParentRefs))
	}
	s.grpcRoutes.set(o.Namespace, o.Name, o)
	indexParents(s.grpcRoutesByService, o.Namespace, o.Name, ServiceParents(o.Namespace, o.Spec.ParentRefs))
}

func (s *Store) DeleteGRPCRoute(ns, name string) {
	if old, ok := s.grpcRoutes.get(ns, name); ok {
		unindexParents(s.grpcRoutesByService, ns, name, ServiceParents(old.Namespace, old.Spec.ParentRefs))
	}
	s.grpcRoutes.del(ns, name)
}

func (s *Store) GRPCRoute(ns, name string) *gatewayv1.GRPCRoute {
	v, _ := s.grpcRoutes.get(ns, name)
	return v
}

// GRPCRoutes lists the GRPCRoutes of ns ("" for all), sorted.
func (s *Store) GRPCRoutes(ns string) []*gatewayv1.GRPCRoute { return s.grpcRoutes.list(ns) }

// GRPCRoutesOf lists the GRPCRoutes attached to Service ns/name, sorted by
// namespace and name.
func (s *Store) GRPCRoutesOf(ns, name string) []*gatewayv1.GRPCRoute {
	var out []*gatewayv1.GRPCRoute
	for _, k := range sortedKeys(s.grpcRoutesByService[types.NamespacedName{Namespace: ns, Name: name}]) {
		if rt, ok := s.grpcRoutes.get(k.Namespace, k.Name); ok {
			out = append(out, rt)
		}
	}
	return out
}

func indexParents(idx map[types.NamespacedName]map[types.NamespacedName]struct{}, ns, name string, parents []types.NamespacedName) {
	rk := types.NamespacedName{Namespace: ns, Name: name}
	for _, svc := range parents {
		m := idx[svc]
		if m == nil {
			m = map[types.NamespacedName]struct{}{}
			idx[svc] = m
		}
		m[rk] = struct{}{}
	}
}

func unindexParents(idx map[types.NamespacedName]map[types.NamespacedName]struct{}, ns, name string, parents []types.NamespacedName) {
	rk := types.NamespacedName{Namespace: ns, Name: name}
	for _, svc := range parents {
		if m := idx[svc]; m != nil {
			delete(m, rk)
			if len(m) == 0 {
				delete(idx, svc)
			}
		}
	}
}

func sortedKeys(m map[types.NamespacedName]struct{}) []types.NamespacedName {
	keys := make([]types.NamespacedName, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
	return keys
}

// ServiceParents lists the Services among parentRefs (kind Service in the
// core group, GAMMA), the namespace defaulting to ns.
func ServiceParents(ns string, refs []gatewayv1.ParentReference) []types.NamespacedName {
	var out []types.NamespacedName
	for _, p := range refs {
		if p.Kind == nil || *p.Kind != "Service" {
			continue
		}
		if p.Group != nil && *p.Group != "" && *p.Group != "core" {
			continue
		}
		pns := ns
		if p.Namespace != nil && *p.Namespace != "" {
			pns = string(*p.Namespace)
		}
		k := types.NamespacedName{Namespace: pns, Name: string(p.Name)}
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

// ReferenceGrants, which let routes of other namespaces use a namespace's
// Services as backends.

func (s *Store) SetReferenceGrant(o *gatewayv1beta1.ReferenceGrant) {
	s.grants.set(o.Namespace, o.Name, o)
}
func (s *Store) DeleteReferenceGrant(ns, name string) { s.grants.del(ns, name) }

// ReferenceGrants lists the grants of ns, sorted by name.
func (s *Store) ReferenceGrants(ns string) []*gatewayv1beta1.ReferenceGrant { return s.grants.list(ns) }

// TrafficPolicies (meshlite's resilience policy).

func (s *Store) SetTrafficPolicy(o *policyv1alpha1.TrafficPolicy) {
	s.traffic.set(o.Namespace, o.Name, o)
}
func (s *Store) DeleteTrafficPolicy(ns, name string) { s.traffic.del(ns, name) }
func (s *Store) TrafficPolicy(ns, name string) *policyv1alpha1.TrafficPolicy {
	v, _ := s.traffic.get(ns, name)
	return v
}

// TrafficPolicies lists the TrafficPolicies of ns, sorted by name.
func (s *Store) TrafficPolicies(ns string) []*policyv1alpha1.TrafficPolicy { return s.traffic.list(ns) }

// AuthorizationPolicies.

func (s *Store) SetAuthorizationPolicy(o *AuthorizationPolicy) { s.authz.set(o.Namespace, o.Name, o) }
func (s *Store) DeleteAuthorizationPolicy(ns, name string)     { s.authz.del(ns, name) }
func (s *Store) AuthorizationPolicy(ns, name string) *AuthorizationPolicy {
	v, _ := s.authz.get(ns, name)
	return v
}
func (s *Store) AuthorizationPolicies(ns string) []*AuthorizationPolicy { return s.authz.list(ns) }

// PeerAuthentications.

func (s *Store) SetPeerAuthentication(o *PeerAuthentication) { s.peerAuths.set(o.Namespace, o.Name, o) }
func (s *Store) DeletePeerAuthentication(ns, name string)    { s.peerAuths.del(ns, name) }
func (s *Store) PeerAuthentication(ns, name string) *PeerAuthentication {
	v, _ := s.peerAuths.get(ns, name)
	return v
}
func (s *Store) PeerAuthentications(ns string) []*PeerAuthentication { return s.peerAuths.list(ns) }

// HasPeerAuthentications reports whether any PeerAuthentication exists.
func (s *Store) HasPeerAuthentications() bool { return !s.peerAuths.empty() }
