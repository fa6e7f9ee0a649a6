package model

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/proto/l7"
)

// ServiceConfigInfo is a Service's L7 configuration for its waypoint and
// what it was computed from.
type ServiceConfigInfo struct {
	// Config is nil when the Service is not served by a waypoint.
	Config *l7.ServiceConfig
	// WaypointKey is the Gateway ("<ns>/<name>") serving it: the only
	// waypoint that may receive Config.
	WaypointKey string
	// Warnings name what was left out (unsupported filters, policy
	// fields) or kept but marked invalid (unresolved backendRefs), for the
	// log.
	Warnings []string
}

// ServiceConfig computes the L7 configuration of a Service bound to a
// waypoint that takes service traffic: its ports, the HTTPRoutes and
// GRPCRoutes in its namespace whose parentRefs name it (producer routes,
// GAMMA), the AuthorizationPolicies targeting it or its waypoint (or, from
// the root namespace, the GatewayClass istio-waypoint) and the
// TrafficPolicies targeting it or its routes.
func (b *Builder) ServiceConfig(svc *corev1.Service) ServiceConfigInfo {
	wp, _ := ServiceWaypoint(b.cfg, b.store, svc)
	if wp == nil {
		return ServiceConfigInfo{}
	}
	var warn []string
	host := b.cfg.Hostname(svc.Namespace, svc.Name)
	sc := &l7.ServiceConfig{
		Namespace: svc.Namespace,
		Name:      svc.Name,
		Hostname:  host,
		Addresses: serviceVIPs(svc),
		Waypoint:  wp.Key(),
	}
	for _, p := range svc.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue
		}
		sp := &l7.ServicePort{Port: uint32(p.Port), TargetPort: uint32(p.TargetPort.IntVal), Name: p.Name}
		if p.AppProtocol != nil {
			sp.AppProtocol = *p.AppProtocol
		}
		sp.Protocol = portProtocol(sp.AppProtocol, p.Name)
		sc.Ports = append(sc.Ports, sp)
	}
	sc.Resilience = b.resilienceFor(svc.Namespace, "", "Service", svc.Name)

	routes := b.store.HTTPRoutesOf(svc.Namespace, svc.Name)
	sort.SliceStable(routes, func(i, j int) bool {
		return olderFirst(routes[i].CreationTimestamp.Time, routes[j].CreationTimestamp.Time, routes[i].Name, routes[j].Name)
	})
	for _, rt := range routes {
		if rt.Namespace != svc.Namespace {
			continue // consumer routes are not applied at the waypoint
		}
		r, w := b.httpRoute(rt, svc)
		warn = append(warn, w...)
		sc.HttpRoutes = append(sc.HttpRoutes, r)
	}
	groutes := b.store.GRPCRoutesOf(svc.Namespace, svc.Name)
	sort.SliceStable(groutes, func(i, j int) bool {
		return olderFirst(groutes[i].CreationTimestamp.Time, groutes[j].CreationTimestamp.Time, groutes[i].Name, groutes[j].Name)
	})
	for _, rt := range groutes {
		if rt.Namespace != svc.Namespace {
			continue
		}
		r, w := b.grpcRoute(rt, svc)
		warn = append(warn, w...)
		sc.GrpcRoutes = append(sc.GrpcRoutes, r)
	}
	pols, w := b.waypointPolicies(svc, wp)
	warn = append(warn, w...)
	sc.AuthorizationPolicies = pols
	return ServiceConfigInfo{Config: sc, WaypointKey: wp.Key(), Warnings: warn}
}

func olderFirst(a, b time.Time, an, bn string) bool {
	if !a.Equal(b) {
		return a.Before(b)
	}
	return an < bn
}

// portProtocol reads a port's protocol from its appProtocol, else its name
// prefix, as Istio's protocol selection.
func portProtocol(appProtocol, name string) l7.Protocol {
	p := strings.ToLower(appProtocol)
	if p == "" {
		p = strings.ToLower(name)
		if i := strings.IndexByte(p, '-'); i >= 0 {
			p = p[:i]
		}
	}
	switch p {
	case "http", "http1", "kubernetes.io/ws", "kubernetes.io/wss":
		return l7.Protocol_HTTP
	case "http2", "h2c", "kubernetes.io/h2c":
		return l7.Protocol_HTTP2
	case "grpc", "grpc-web":
		return l7.Protocol_GRPC
	case "tcp", "tls", "https", "mongo", "mysql", "redis":
		return l7.Protocol_TCP
	}
	return l7.Protocol_PROTOCOL_UNSPECIFIED
}

// routePorts lists the Service ports a route's parentRefs to svc name;
// empty when one of them names no port (all ports).
func routePorts(refs []gatewayv1.ParentReference, routeNS string, svc *corev1.Service) []uint32 {
	var ports []uint32
	for _, p := range refs {
		for _, k := range ServiceParents(routeNS, []gatewayv1.ParentReference{p}) {
			if k.Namespace != svc.Namespace || k.Name != svc.Name {
				continue
			}
			if p.Port == nil {
				return nil
			}
			ports = append(ports, uint32(*p.Port))
		}
	}
	return ports
}

func duration(d *gatewayv1.Duration) *durationpb.Duration {
	if d == nil || *d == "" {
		return nil
	}
	v, err := time.ParseDuration(string(*d))
	if err != nil || v <= 0 {
		return nil
	}
	return durationpb.New(v)
}

func ruleName(n *gatewayv1.SectionName, i int) string {
	if n != nil && *n != "" {
		return string(*n)
	}
	return fmt.Sprintf("rule-%d", i)
}

func (b *Builder) httpRoute(rt *gatewayv1.HTTPRoute, svc *corev1.Service) (*l7.HTTPRoute, []string) {
	var warn []string
	out := &l7.HTTPRoute{
		Namespace: rt.Namespace, Name: rt.Name,
		Ports: routePorts(rt.Spec.ParentRefs, rt.Namespace, svc),
		// GAMMA: hostnames are not matched for Service parents.
		Resilience: b.resilienceFor(rt.Namespace, gatewayv1.GroupName, "HTTPRoute", rt.Name),
	}
	type split struct {
		rule *l7.HTTPRouteRule
		key  matchRank
		idx  int
	}
	var rules []split
	for i, r := range rt.Spec.Rules {
		base := &l7.HTTPRouteRule{Name: ruleName(r.Name, i)}
		for _, f := range r.Filters {
			lf, err := b.httpFilter(f, rt.Namespace)
			if err != nil {
				warn = append(warn, fmt.Sprintf("HTTPRoute %s/%s %s: %v", rt.Namespace, rt.Name, base.Name, err))
				continue
			}
			base.Filters = append(base.Filters, lf)
		}
		for _, br := range r.BackendRefs {
			lb := b.backend(br.BackendObjectReference, br.Weight, "HTTPRoute", rt.Namespace)
			base.BackendRefs = append(base.BackendRefs, lb)
			if lb.Invalid != "" {
				// Kept, so its share of the requests is answered 500; its
				// filters never run.
				warn = append(warn, fmt.Sprintf("HTTPRoute %s/%s %s: %s", rt.Namespace, rt.Name, base.Name, lb.Invalid))
				continue
			}
			for _, f := range br.Filters {
				lf, err := b.httpFilter(f, rt.Namespace)
				if err != nil {
					warn = append(warn, fmt.Sprintf("HTTPRoute %s/%s %s: %v", rt.Namespace, rt.Name, base.Name, err))
					continue
				}
				lb.Filters = append(lb.Filters, lf)
			}
		}
		if t := r.Timeouts; t != nil {
			if req, be := duration(t.Request), duration(t.BackendRequest); req != nil || be != nil {
				base.Timeouts = &l7.Timeouts{Request: req, BackendRequest: be}
			}
		}
		if rr := r.Retry; rr != nil {
			lr := &l7.Retry{Backoff: duration(rr.Backoff), RetryOnConnectFailure: true}
			if rr.Attempts != nil && *rr.Attempts > 0 {
				lr.Attempts = uint32(*rr.Attempts)
			}
			for _, c := range rr.Codes {
				lr.Codes = append(lr.Codes, uint32(c))
			}
			base.Retry = lr
		}
		// One rule per match, so the rules can be ordered by Gateway API
		// match precedence (the waypoint takes the first that matches).
		matches := r.Matches
		if len(matches) == 0 {
			matches = []gatewayv1.HTTPRouteMatch{{}}
		}
		for _, m := range matches {
			lr := cloneRule(base)
			lm := httpMatch(m)
			lr.Matches = []*l7.HTTPRouteMatch{lm}
			rules = append(rules, split{rule: lr, key: rankOf(lm), idx: len(rules)})
		}
	}
	sort.SliceStable(rules, func(i, j int) bool { return rules[i].key.before(rules[j].key) })
	for _, r := range rules {
		out.Rules = append(out.Rules, r.rule)
	}
	return out, warn
}

func cloneRule(r *l7.HTTPRouteRule) *l7.HTTPRouteRule {
	// The split rules share their read-only parts.
	return &l7.HTTPRouteRule{Name: r.Name, Filters: r.Filters, BackendRefs: r.BackendRefs, Timeouts: r.Timeouts, Retry: r.Retry}
}

func httpMatch(m gatewayv1.HTTPRouteMatch) *l7.HTTPRouteMatch {
	lm := &l7.HTTPRouteMatch{Path: &l7.PathMatch{Type: l7.PathMatch_PATH_PREFIX, Value: "/"}}
	if p := m.Path; p != nil {
		if p.Value != nil {
			lm.Path.Value = *p.Value
		}
		if p.Type != nil {
			switch *p.Type {
			case gatewayv1.PathMatchExact:
				lm.Path.Type = l7.PathMatch_EXACT
			case gatewayv1.PathMatchRegularExpression:
				lm.Path.Type = l7.PathMatch_REGULAR_EXPRESSION
			}
		}
	}
	for _, h := range m.Headers {
		hm := &l7.HeaderMatch{Name: string(h.Name), Value: h.Value}
		if h.Type != nil && *h.Type == gatewayv1.HeaderMatchRegularExpression {
			hm.Type = l7.HeaderMatch_REGULAR_EXPRESSION
		}
		lm.Headers = append(lm.Headers, hm)
	}
	for _, q := range m.QueryParams {
		qm := &l7.QueryParamMatch{Name: string(q.Name), Value: q.Value}
		if q.Type != nil && *q.Type == gatewayv1.QueryParamMatchRegularExpression {
			qm.Type = l7.QueryParamMatch_REGULAR_EXPRESSION
		}
		lm.QueryParams = append(lm.QueryParams, qm)
	}
	if m.Method != nil {
		lm.Method = strings.ToUpper(string(*m.Method))
	}
	return lm
}

// matchRank orders matches by Gateway API precedence: exact path, longer
// path, method, more headers, more query parameters.
type matchRank struct {
	exact                   bool
	pathLen                 int
	method                  bool
	headers, queryParameter int
}

func rankOf(m *l7.HTTPRouteMatch) matchRank {
	return matchRank{
		exact:   m.GetPath().GetType() == l7.PathMatch_EXACT,
		pathLen: len(m.GetPath().GetValue()),
		method:  m.GetMethod() != "",
		headers: len(m.GetHeaders()), queryParameter: len(m.GetQueryParams()),
	}
}

func (a matchRank) before(b matchRank) bool {
	switch {
	case a.exact != b.exact:
		return a.exact
	case a.pathLen != b.pathLen:
		return a.pathLen > b.pathLen
	case a.method != b.method:
		return a.method
	case a.headers != b.headers:
		return a.headers > b.headers
	default:
		return a.queryParameter > b.queryParameter
	}
}

// backend translates a backendRef of a route of kind routeKind in routeNS.
// A reference that cannot be resolved is kept with its weight and marked
// Invalid (the reason, also what the caller logs), with no hostname:
// Gateway API answers its share of the requests with 500 instead of giving
// it to the other backends. Unresolved are, checked in the order
// routestatus reports them: a kind other than Service; a Service of another
// namespace that no ReferenceGrant there permits (checked before existence,
// so the config does not tell whether it exists); a Service not found.
func (b *Builder) backend(ref gatewayv1.BackendObjectReference, weight *int32, routeKind, routeNS string) *l7.BackendRef {
	ns, problem := ResolveBackend(b.store, routeKind, routeNS, ref)
	lb := &l7.BackendRef{Namespace: ns, Name: string(ref.Name), Weight: 1}
	switch problem {
	case BackendInvalidKind:
		lb.Invalid = fmt.Sprintf("backendRef %s: only Services are supported", ref.Name)
	case BackendNotPermitted:
		lb.Invalid = fmt.Sprintf("backendRef %s/%s: not permitted, no ReferenceGrant in %s allows %ss of namespace %s", ns, ref.Name, ns, routeKind, routeNS)
	case BackendNotFound:
		lb.Invalid = fmt.Sprintf("backendRef %s/%s: Service not found", ns, ref.Name)
	default:
		lb.Hostname = b.cfg.Hostname(ns, string(ref.Name))
	}
	if ref.Port != nil {
		lb.Port = uint32(*ref.Port)
	}
	if weight != nil {
		if *weight < 0 {
			lb.Weight = 0
		} else {
			lb.Weight = uint32(*weight)
		}
	}
	return lb
}

// BackendParents lists the Services whose L7 configuration refers to
// Service ns/name as a backend: the parents of the HTTPRoutes and
// GRPCRoutes (of any namespace) naming it in a backendRef or a mirror.
// When that Service is created or deleted, their backends to it turn valid
// or invalid ("Service not found"), so their configuration is stale.
func BackendParents(s *Store, ns, name string) []types.NamespacedName {
	var out []types.NamespacedName
	add := func(keys []types.NamespacedName) {
		for _, k := range keys {
			if !slices.Contains(out, k) {
				out = append(out, k)
			}
		}
	}
	// The kind is not looked at: naming more parents only costs a
	// recomputation that pushes nothing.
	names := func(routeNS string, refs []gatewayv1.BackendObjectReference) bool {
		return slices.ContainsFunc(refs, func(ref gatewayv1.BackendObjectReference) bool {
			rns := routeNS
			if ref.Namespace != nil && *ref.Namespace != "" {
				rns = string(*ref.Namespace)
			}
			return rns == ns && string(ref.Name) == name
		})
	}
	for _, rt := range s.HTTPRoutes("") {
		if names(rt.Namespace, HTTPRouteBackends(rt)) {
			add(HTTPRouteServices(rt))
		}
	}
	for _, rt := range s.GRPCRoutes("") {
		if names(rt.Namespace, GRPCRouteBackends(rt)) {
			add(ServiceParents(rt.Namespace, rt.Spec.ParentRefs))
		}
	}
	return out
}

// HTTPRouteBackends lists what an HTTPRoute sends requests to: its
// backendRefs and mirrors, in order.
func HTTPRouteBackends(rt *gatewayv1.HTTPRoute) []gatewayv1.BackendObjectReference {
	var out []gatewayv1.BackendObjectReference
	mirrors := func(fs []gatewayv1.HTTPRouteFilter) {
		for _, f := range fs {
			if f.Type == gatewayv1.HTTPRouteFilterRequestMirror && f.RequestMirror != nil {
				out = append(out, f.RequestMirror.BackendRef)
			}
		}
	}
	for _, rule := range rt.Spec.Rules {
		mirrors(rule.Filters)
		for _, b := range rule.BackendRefs {
			out = append(out, b.BackendObjectReference)
			mirrors(b.Filters)
		}
	}
	return out
}

// GRPCRouteBackends is HTTPRouteBackends for a GRPCRoute.
func GRPCRouteBackends(rt *gatewayv1.GRPCRoute) []gatewayv1.BackendObjectReference {
	var out []gatewayv1.BackendObjectReference
	mirrors := func(fs []gatewayv1.GRPCRouteFilter) {
		for _, f := range fs {
			if f.Type == gatewayv1.GRPCRouteFilterRequestMirror && f.RequestMirror != nil {
				out = append(out, f.RequestMirror.BackendRef)
			}
		}
	}
	for _, rule := range rt.Spec.Rules {
		mirrors(rule.Filters)
		for _, b := range rule.BackendRefs {
			out = append(out, b.BackendObjectReference)
			mirrors(b.Filters)
		}
	}
	return out
}

func headerModifier(f *gatewayv1.HTTPHeaderFilter) *l7.HeaderModifier {
	hm := &l7.HeaderModifier{Remove: f.Remove}
	for _, h := range f.Set {
		hm.Set = append(hm.Set, &l7.Header{Name: string(h.Name), Value: h.Value})
	}
	for _, h := range f.Add {
		hm.Add = append(hm.Add, &l7.Header{Name: string(h.Name), Value: h.Value})
	}
	return hm
}

func pathModifier(p *gatewayv1.HTTPPathModifier) *l7.PathModifier {
	if p == nil {
		return nil
	}
	switch p.Type {
	case gatewayv1.FullPathHTTPPathModifier:
		if p.ReplaceFullPath != nil {
			return &l7.PathModifier{Type: l7.PathModifier_REPLACE_FULL_PATH, Value: *p.ReplaceFullPath}
		}
	case gatewayv1.PrefixMatchHTTPPathModifier:
		if p.ReplacePrefixMatch != nil {
			return &l7.PathModifier{Type: l7.PathModifier_REPLACE_PREFIX_MATCH, Value: *p.ReplacePrefixMatch}
		}
	}
	return nil
}

func (b *Builder) mirror(m *gatewayv1.HTTPRequestMirrorFilter, routeKind, routeNS string) (*l7.HTTPRouteFilter, error) {
	be := b.backend(m.BackendRef, nil, routeKind, routeNS)
	if be.Invalid != "" {
		// Nothing to mirror to: the filter is left out.
		return nil, fmt.Errorf("mirror: %s", be.Invalid)
	}
	rm := &l7.RequestMirror{Backend: be}
	switch {
	case m.Percent != nil:
		v := float64(*m.Percent)
		rm.Percent = &v
	case m.Fraction != nil:
		den := int32(100)
		if m.Fraction.Denominator != nil && *m.Fraction.Denominator > 0 {
			den = *m.Fraction.Denominator
		}
		v := 100 * float64(m.Fraction.Numerator) / float64(den)
		rm.Percent = &v
	}
	return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_RequestMirror{RequestMirror: rm}}, nil
}

func (b *Builder) httpFilter(f gatewayv1.HTTPRouteFilter, routeNS string) (*l7.HTTPRouteFilter, error) {
	switch {
	case f.Type == gatewayv1.HTTPRouteFilterRequestHeaderModifier && f.RequestHeaderModifier != nil:
		return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_RequestHeaderModifier{RequestHeaderModifier: headerModifier(f.RequestHeaderModifier)}}, nil
	case f.Type == gatewayv1.HTTPRouteFilterResponseHeaderModifier && f.ResponseHeaderModifier != nil:
		return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_ResponseHeaderModifier{ResponseHeaderModifier: headerModifier(f.ResponseHeaderModifier)}}, nil
	case f.Type == gatewayv1.HTTPRouteFilterURLRewrite && f.URLRewrite != nil:
		rw := &l7.URLRewrite{Path: pathModifier(f.URLRewrite.Path)}
		if f.URLRewrite.Hostname != nil {
			rw.Hostname = string(*f.URLRewrite.Hostname)
		}
		return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_UrlRewrite{UrlRewrite: rw}}, nil
	case f.Type == gatewayv1.HTTPRouteFilterRequestRedirect && f.RequestRedirect != nil:
		r := f.RequestRedirect
		rd := &l7.RequestRedirect{Path: pathModifier(r.Path)}
		if r.Scheme != nil {
			rd.Scheme = *r.Scheme
		}
		if r.Hostname != nil {
			rd.Hostname = string(*r.Hostname)
		}
		if r.Port != nil {
			rd.Port = uint32(*r.Port)
		}
		if r.StatusCode != nil {
			rd.StatusCode = uint32(*r.StatusCode)
		}
		return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_RequestRedirect{RequestRedirect: rd}}, nil
	case f.Type == gatewayv1.HTTPRouteFilterRequestMirror && f.RequestMirror != nil:
		return b.mirror(f.RequestMirror, "HTTPRoute", routeNS)
	}
	return nil, fmt.Errorf("filter %s is not supported", f.Type)
}

func (b *Builder) grpcRoute(rt *gatewayv1.GRPCRoute, svc *corev1.Service) (*l7.GRPCRoute, []string) {
	var warn []string
	out := &l7.GRPCRoute{
		Namespace: rt.Namespace, Name: rt.Name,
		Ports:      routePorts(rt.Spec.ParentRefs, rt.Namespace, svc),
		Resilience: b.resilienceFor(rt.Namespace, gatewayv1.GroupName, "GRPCRoute", rt.Name),
	}
	for i, r := range rt.Spec.Rules {
		lr := &l7.GRPCRouteRule{Name: ruleName(r.Name, i)}
		for _, m := range r.Matches {
			gm := &l7.GRPCRouteMatch{}
			if mm := m.Method; mm != nil {
				gm.Method = &l7.GRPCMethodMatch{}
				if mm.Type != nil && *mm.Type == gatewayv1.GRPCMethodMatchRegularExpression {
					gm.Method.Type = l7.GRPCMethodMatch_REGULAR_EXPRESSION
				}
				if mm.Service != nil {
					gm.Method.Service = *mm.Service
				}
				if mm.Method != nil {
					gm.Method.Method = *mm.Method
				}
			}
			for _, h := range m.Headers {
				hm := &l7.HeaderMatch{Name: string(h.Name), Value: h.Value}
				if h.Type != nil && *h.Type == gatewayv1.GRPCHeaderMatchRegularExpression {
					hm.Type = l7.HeaderMatch_REGULAR_EXPRESSION
				}
				gm.Headers = append(gm.Headers, hm)
			}
			lr.Matches = append(lr.Matches, gm)
		}
		gf := func(f gatewayv1.GRPCRouteFilter) (*l7.HTTPRouteFilter, error) {
			switch {
			case f.Type == gatewayv1.GRPCRouteFilterRequestHeaderModifier && f.RequestHeaderModifier != nil:
				return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_RequestHeaderModifier{RequestHeaderModifier: headerModifier(f.RequestHeaderModifier)}}, nil
			case f.Type == gatewayv1.GRPCRouteFilterResponseHeaderModifier && f.ResponseHeaderModifier != nil:
				return &l7.HTTPRouteFilter{Kind: &l7.HTTPRouteFilter_ResponseHeaderModifier{ResponseHeaderModifier: headerModifier(f.ResponseHeaderModifier)}}, nil
			case f.Type == gatewayv1.GRPCRouteFilterRequestMirror && f.RequestMirror != nil:
				return b.mirror(f.RequestMirror, "GRPCRoute", rt.Namespace)
			}
			return nil, fmt.Errorf("filter %s is not supported", f.Type)
		}
		for _, f := range r.Filters {
			lf, err := gf(f)
			if err != nil {
				warn = append(warn, fmt.Sprintf("GRPCRoute %s/%s %s: %v", rt.Namespace, rt.Name, lr.Name, err))
				continue
			}
			lr.Filters = append(lr.Filters, lf)
		}
		for _, br := range r.BackendRefs {
			lb := b.backend(br.BackendObjectReference, br.Weight, "GRPCRoute", rt.Namespace)
			lr.BackendRefs = append(lr.BackendRefs, lb)
			if lb.Invalid != "" {
				warn = append(warn, fmt.Sprintf("GRPCRoute %s/%s %s: %s", rt.Namespace, rt.Name, lr.Name, lb.Invalid))
				continue
			}
			for _, f := range br.Filters {
				if lf, err := gf(f); err == nil {
					lb.Filters = append(lb.Filters, lf)
				} else {
					warn = append(warn, fmt.Sprintf("GRPCRoute %s/%s %s: %v", rt.Namespace, rt.Name, lr.Name, err))
				}
			}
		}
		out.Rules = append(out.Rules, lr)
	}
	return out, warn
}

// resilienceFor merges the TrafficPolicies of ns targeting group/kind/name:
// for each part, the oldest policy that sets it wins (Gateway API's policy
// conflict rule). The name is the oldest contributing policy's.
func (b *Builder) resilienceFor(ns, group, kind, name string) *l7.ResiliencePolicy {
	var pols []*policyv1alpha1.TrafficPolicy
	for _, p := range b.store.TrafficPolicies(ns) {
		for _, r := range p.Spec.TargetRefs {
			g := r.Group
			if g == "core" {
				g = ""
			}
			if g == group && r.Kind == kind && r.Name == name {
				pols = append(pols, p)
				break
			}
		}
	}
	if len(pols) == 0 {
		return nil
	}
	sort.SliceStable(pols, func(i, j int) bool {
		return olderFirst(pols[i].CreationTimestamp.Time, pols[j].CreationTimestamp.Time, pols[i].Name, pols[j].Name)
	})
	out := &l7.ResiliencePolicy{}
	for _, p := range pols {
		s := p.Spec
		used := false
		if out.RateLimit == nil && s.RateLimit != nil {
			out.RateLimit = &l7.RateLimit{RequestsPerSecond: s.RateLimit.RequestsPerSecond, Burst: nonNeg(s.RateLimit.Burst),
				PerSourceIdentity: s.RateLimit.PerSourceIdentity}
			used = true
		}
		if out.CircuitBreaker == nil && s.CircuitBreaker != nil {
			out.CircuitBreaker = &l7.CircuitBreaker{MaxConnections: nonNeg(s.CircuitBreaker.MaxConnections),
				MaxPendingRequests: nonNeg(s.CircuitBreaker.MaxPendingRequests), MaxRequestsPerConnection: nonNeg(s.CircuitBreaker.MaxRequestsPerConnection)}
			used = true
		}
		if out.OutlierDetection == nil && s.OutlierDetection != nil {
			od := s.OutlierDetection
			out.OutlierDetection = &l7.OutlierDetection{Consecutive_5Xx: nonNeg(od.Consecutive5xx), MaxEjectionPercent: nonNeg(od.MaxEjectionPercent),
				Interval: gwDuration(od.Interval), BaseEjectionTime: gwDuration(od.BaseEjectionTime)}
			used = true
		}
		if out.Fault == nil && s.FaultInjection != nil {
			f := &l7.FaultInjection{}
			if d := s.FaultInjection.Delay; d != nil {
				f.Delay = &l7.FaultDelay{FixedDelay: gwDuration(d.Fixed), Percentage: d.Percentage}
			}
			if a := s.FaultInjection.Abort; a != nil {
				f.Abort = &l7.FaultAbort{HttpStatus: nonNeg(a.HTTPStatus), GrpcStatus: nonNeg(a.GRPCStatus), Percentage: a.Percentage}
			}
			out.Fault = f
			used = true
		}
		if used && out.Name == "" {
			out.Namespace, out.Name = p.Namespace, p.Name
		}
	}
	return out
}

func nonNeg(v int32) uint32 {
	if v < 0 {
		return 0
	}
	return uint32(v)
}

func gwDuration(s string) *durationpb.Duration {
	d, err := policyv1alpha1.ParseDuration(s)
	if err != nil || d == 0 {
		return nil
	}
	return durationpb.New(d)
}
