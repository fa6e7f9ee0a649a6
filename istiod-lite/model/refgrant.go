package model

import (
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
