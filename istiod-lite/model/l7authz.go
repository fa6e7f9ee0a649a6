package model

import (
	"fmt"
	"sort"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	corev1 "k8s.io/api/core/v1"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/proto/l7"
)

// annotationDryRun marks a policy that is evaluated and logged, never
// enforced (Istio's istio.io/dry-run).
const annotationDryRun = "istio.io/dry-run"

// policyTargets reports whether an AuthorizationPolicy's targetRefs name the
// Service svc, the waypoint wp serving it, or (from the root namespace) the
// waypoint GatewayClass. Policies without targetRefs are ztunnel's.
func (b *Builder) policyTargets(p *AuthorizationPolicy, svc *corev1.Service, wp *Waypoint) bool {
	refs := p.Spec.GetTargetRefs()
	if r := p.Spec.GetTargetRef(); r != nil {
		refs = append([]*typev1beta1.PolicyTargetReference{r}, refs...)
	}
	for _, r := range refs {
		ns := r.GetNamespace()
		if ns == "" {
			ns = p.Namespace
		}
		if ns != p.Namespace {
			continue // Istio: a targetRef stays in the policy's namespace
		}
		switch {
		case r.GetKind() == "Service" && (r.GetGroup() == "" || r.GetGroup() == "core"):
			if ns == svc.Namespace && r.GetName() == svc.Name {
				return true
			}
		case r.GetKind() == "Gateway" && r.GetGroup() == "gateway.networking.k8s.io":
			if ns == wp.Namespace && r.GetName() == wp.Name {
				return true
			}
		case r.GetKind() == "GatewayClass" && r.GetGroup() == "gateway.networking.k8s.io":
			if p.Namespace == b.cfg.RootNamespace && r.GetName() == kube.WaypointGatewayClass {
				return true
			}
		}
	}
	return false
}

// PolicyTargetsWaypoints reports whether p is for waypoints (has targetRefs).
func PolicyTargetsWaypoints(p *AuthorizationPolicy) bool {
	return p.Spec.GetTargetRef() != nil || len(p.Spec.GetTargetRefs()) > 0
}

// waypointPolicies lists the L7 policies that apply to svc at its waypoint,
// sorted by namespace and name.
func (b *Builder) waypointPolicies(svc *corev1.Service, wp *Waypoint) ([]*l7.AuthorizationPolicy, []string) {
	var out []*l7.AuthorizationPolicy
	var warn []string
	seen := map[string]bool{}
	for _, ns := range []string{svc.Namespace, wp.Namespace, b.cfg.RootNamespace} {
		if seen[ns] {
			continue
		}
		seen[ns] = true
		for _, p := range b.store.AuthorizationPolicies(ns) {
			if p.Spec == nil || !b.policyTargets(p, svc, wp) {
				continue
			}
			lp, w := convertL7Policy(p)
			warn = append(warn, w...)
			if lp != nil {
				out = append(out, lp)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Namespace != out[j].Namespace {
			return out[i].Namespace < out[j].Namespace
		}
		return out[i].Name < out[j].Name
	})
	return out, warn
}

// convertL7Policy keeps an AuthorizationPolicy's L4 and L7 fields. What the
// waypoint cannot check (request principals: no JWT) makes an ALLOW rule
// never match and is dropped from a DENY rule (denying more): fail closed.
// CUSTOM policies are not supported and left out, with a warning.
func convertL7Policy(p *AuthorizationPolicy) (*l7.AuthorizationPolicy, []string) {
	spec := p.Spec
	out := &l7.AuthorizationPolicy{Name: p.Name, Namespace: p.Namespace, DryRun: p.Annotations[annotationDryRun] == "true"}
	switch spec.GetAction() {
	case securityv1beta1.AuthorizationPolicy_ALLOW:
		out.Action = l7.AuthorizationPolicy_ALLOW
	case securityv1beta1.AuthorizationPolicy_DENY:
		out.Action = l7.AuthorizationPolicy_DENY
	case securityv1beta1.AuthorizationPolicy_AUDIT:
		out.Action = l7.AuthorizationPolicy_AUDIT
	default:
		return nil, []string{fmt.Sprintf("AuthorizationPolicy %s/%s: action %s is not supported by waypoints; ignored", p.Namespace, p.Name, spec.GetAction())}
	}
	var warn []string
	for _, r := range spec.GetRules() {
		lr := &l7.AuthorizationRule{}
		unsupported := false
		for _, f := range r.GetFrom() {
			s := f.GetSource()
			if len(s.GetRequestPrincipals())+len(s.GetNotRequestPrincipals()) > 0 {
				unsupported = true
			}
			src := &l7.Source{
				Principals: s.GetPrincipals(), NotPrincipals: s.GetNotPrincipals(),
				Namespaces: s.GetNamespaces(), NotNamespaces: s.GetNotNamespaces(),
				IpBlocks:    append(append([]string(nil), s.GetIpBlocks()...), s.GetRemoteIpBlocks()...),
				NotIpBlocks: append(append([]string(nil), s.GetNotIpBlocks()...), s.GetNotRemoteIpBlocks()...),
			}
			// serviceAccounts ("ns/sa" or "sa") are principals of this trust
			// domain; the waypoint matches principals by suffix-free form.
			for _, sa := range toServiceAccounts(s.GetServiceAccounts(), p.Namespace) {
				src.Principals = append(src.Principals, "*/ns/"+sa.Namespace+"/sa/"+sa.ServiceAccount)
			}
			for _, sa := range toServiceAccounts(s.GetNotServiceAccounts(), p.Namespace) {
				src.NotPrincipals = append(src.NotPrincipals, "*/ns/"+sa.Namespace+"/sa/"+sa.ServiceAccount)
			}
			lr.From = append(lr.From, src)
		}
		for _, t := range r.GetTo() {
			o := t.GetOperation()
			lr.To = append(lr.To, &l7.Operation{
				Hosts: o.GetHosts(), NotHosts: o.GetNotHosts(),
				Ports: toPorts(o.GetPorts()), NotPorts: toPorts(o.GetNotPorts()),
				Methods: o.GetMethods(), NotMethods: o.GetNotMethods(),
				Paths: o.GetPaths(), NotPaths: o.GetNotPaths(),
			})
		}
		for _, w := range r.GetWhen() {
			if len(w.GetKey()) > 19 && w.GetKey()[:19] == "request.auth.claims" || w.GetKey() == "request.auth.principal" {
				unsupported = true
				continue
			}
			lr.When = append(lr.When, &l7.Condition{Key: w.GetKey(), Values: w.GetValues(), NotValues: w.GetNotValues()})
		}
		if unsupported {
			warn = append(warn, fmt.Sprintf("AuthorizationPolicy %s/%s: request authentication (JWT) fields are not supported by waypoints", p.Namespace, p.Name))
			if out.Action == l7.AuthorizationPolicy_ALLOW {
				continue // never matches
			}
		}
		out.Rules = append(out.Rules, lr)
	}
	return out, warn
}
