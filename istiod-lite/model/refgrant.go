package model

import (
	corev1 "k8s.io/api/core/v1"

	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
)

// BackendGranted reports whether a route of kind routeKind (HTTPRoute,
// GRPCRoute) in namespace routeNS may use Service svcNS/svcName as a
// backend: always within a namespace; across namespaces only when one of
// grants (the ReferenceGrants of svcNS) lists the route's kind and
// namespace in from and Services (all, or this one by name) in to, as
// Gateway API requires.
func BackendGranted(grants []*gatewayv1beta1.ReferenceGrant, routeKind, routeNS, svcNS, svcName string) bool {
	if routeNS == svcNS {
		return true
	}
	for _, g := range grants {
		if g.Namespace != svcNS {
			continue
		}
		from := false
		for _, f := range g.Spec.From {
			if string(f.Group) == gatewayv1.GroupName && string(f.Kind) == routeKind && string(f.Namespace) == routeNS {
				from = true
				break
			}
		}
		if !from {
			continue
		}
		for _, t := range g.Spec.To {
			if coreGroup(string(t.Group)) && t.Kind == "Service" && (t.Name == nil || *t.Name == "" || string(*t.Name) == svcName) {
				return true
			}
		}
	}
	return false
}

// coreGroup reports whether g names the core API group ("", or "core" as
// some write it).
func coreGroup(g string) bool { return g == "" || g == "core" }

// BackendLookup is what resolving a backendRef reads (*Store is one).
type BackendLookup interface {
	Service(ns, name string) *corev1.Service
	ReferenceGrants(ns string) []*gatewayv1beta1.ReferenceGrant
}

// BackendProblem says why a backendRef does not resolve.
type BackendProblem int

const (
	BackendResolved     BackendProblem = iota
	BackendInvalidKind                 // not a core Service
	BackendNotPermitted                // another namespace, no ReferenceGrant there allows it
	BackendNotFound                    // no such Service
)

// ResolveBackend resolves a backendRef of a route of kind routeKind in
// routeNS: the Service's namespace and what, if anything, is wrong, in the
// order the route status reports it. The grant is checked before
// existence, so neither the waypoint's config nor a route's status tells
// whether a Service the route may not use exists.
func ResolveBackend(l BackendLookup, routeKind, routeNS string, ref gatewayv1.BackendObjectReference) (string, BackendProblem) {
	ns := routeNS
	if ref.Namespace != nil && *ref.Namespace != "" {
		ns = string(*ref.Namespace)
	}
	switch {
	case (ref.Group != nil && *ref.Group != "" && *ref.Group != "core") || (ref.Kind != nil && *ref.Kind != "Service"):
		return ns, BackendInvalidKind
	case !BackendGranted(l.ReferenceGrants(ns), routeKind, routeNS, ns, string(ref.Name)):
		return ns, BackendNotPermitted
	case l.Service(ns, string(ref.Name)) == nil:
		return ns, BackendNotFound
	}
	return ns, BackendResolved
}
