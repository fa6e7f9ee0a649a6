package model

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/protobuf/types/known/emptypb"
	securityv1beta1 "istio.io/api/security/v1beta1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/meshlite/meshlite/proto/security"
)

// Names istiod gives the policies it derives from PeerAuthentications; '_'
// cannot appear in Kubernetes names, so they never clash with real ones.
const (
	StaticStrictPolicyName      = "istio_converted_static_strict"
	convertedPeerAuthNamePrefix = "converted_peer_authentication_"
)

// PolicyKey is the Authorization resource name: "<namespace>/<name>".
func PolicyKey(ns, name string) string { return ns + "/" + name }

// AuthorizationInfo is an Authorization and what the conversion noticed.
type AuthorizationInfo struct {
	Authorization *security.Authorization
	// Warnings name the HTTP attributes ztunnel cannot enforce; the policy
	// was made stricter (ALLOW rules dropped, DENY rules kept without them).
	Warnings []string
}

// Authorization converts an AuthorizationPolicy to the L4 Authorization
// ztunnel enforces, as istiod does: policies with targetRefs are for
// waypoints, and actions other than ALLOW and DENY are not ztunnel's, so
// both convert to nil.
func (b *Builder) Authorization(p *AuthorizationPolicy) AuthorizationInfo {
	spec := p.Spec
	if spec == nil {
		spec = &securityv1beta1.AuthorizationPolicy{}
	}
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return AuthorizationInfo{}
	}
	scope := security.Scope_WORKLOAD_SELECTOR
	if spec.GetSelector() == nil {
		scope = security.Scope_NAMESPACE
		if p.Namespace == b.cfg.RootNamespace {
			scope = security.Scope_GLOBAL
		}
	}
	var action security.Action
	switch spec.GetAction() {
	case securityv1beta1.AuthorizationPolicy_ALLOW:
		action = security.Action_ALLOW
	case securityv1beta1.AuthorizationPolicy_DENY:
		action = security.Action_DENY
	default:
		return AuthorizationInfo{Warnings: []string{fmt.Sprintf("ztunnel does not support the %s action", spec.GetAction())}}
	}
	out := &security.Authorization{Name: p.Name, Namespace: p.Namespace, Scope: scope, Action: action}
	l7 := map[string]bool{}
	for _, rule := range spec.GetRules() {
		rules, found := convertRule(action, rule, p.Namespace)
		for _, f := range found {
			l7[f] = true
		}
		if rules != nil {
			out.Groups = append(out.Groups, &security.Group{Rules: rules})
		}
	}
	info := AuthorizationInfo{Authorization: out}
	for f := range l7 {
		info.Warnings = append(info.Warnings, f)
	}
	sort.Strings(info.Warnings)
	return info
}

// l4When are the condition keys ztunnel can evaluate.
var l4When = map[string]bool{
	"source.ip": true, "source.namespace": true, "source.principal": true,
	"destination.ip": true, "destination.port": true,
}

// convertRule turns one rule into a group's rules: one Rules for all "to"
// entries, one for all "from" entries, one per "when" condition. A rule with
// HTTP attributes never matches in an ALLOW policy (nil), and in a DENY
// policy is kept without them (denying more).
func convertRule(action security.Action, rule *securityv1beta1.Rule, ns string) ([]*security.Rules, []string) {
	var l7 []string
	var to, from []*security.Match
	for _, t := range rule.GetTo() {
		op := t.GetOperation()
		l7 = append(l7, httpOperationFields(op)...)
		to = append(to, &security.Match{
			DestinationPorts:    toPorts(op.GetPorts()),
			NotDestinationPorts: toPorts(op.GetNotPorts()),
		})
	}
	for _, f := range rule.GetFrom() {
		src := f.GetSource()
		l7 = append(l7, httpSourceFields(src)...)
		from = append(from, &security.Match{
			SourceIps:          toAddresses(src.GetIpBlocks()),
			NotSourceIps:       toAddresses(src.GetNotIpBlocks()),
			Namespaces:         toStringMatches(src.GetNamespaces()),
			NotNamespaces:      toStringMatches(src.GetNotNamespaces()),
			ServiceAccounts:    toServiceAccounts(src.GetServiceAccounts(), ns),
			NotServiceAccounts: toServiceAccounts(src.GetNotServiceAccounts(), ns),
			Principals:         toStringMatches(src.GetPrincipals()),
			NotPrincipals:      toStringMatches(src.GetNotPrincipals()),
		})
	}
	rules := []*security.Rules{}
	if len(to) > 0 {
		rules = append(rules, &security.Rules{Matches: to})
	}
	if len(from) > 0 {
		rules = append(rules, &security.Rules{Matches: from})
	}
	for _, w := range rule.GetWhen() {
		key := w.GetKey()
		if !l4When[key] {
			l7 = append(l7, key)
		}
		m := &security.Match{}
		switch key {
		case "source.namespace":
			m.Namespaces, m.NotNamespaces = toStringMatches(w.GetValues()), toStringMatches(w.GetNotValues())
		case "source.principal":
			m.Principals, m.NotPrincipals = toStringMatches(w.GetValues()), toStringMatches(w.GetNotValues())
		case "source.ip":
			m.SourceIps, m.NotSourceIps = toAddresses(w.GetValues()), toAddresses(w.GetNotValues())
		case "destination.port":
			m.DestinationPorts, m.NotDestinationPorts = toPorts(w.GetValues()), toPorts(w.GetNotValues())
		case "destination.ip":
			m.DestinationIps, m.NotDestinationIps = toAddresses(w.GetValues()), toAddresses(w.GetNotValues())
		}
		rules = append(rules, &security.Rules{Matches: []*security.Match{m}})
	}
	if action == security.Action_ALLOW && len(l7) > 0 {
		return nil, l7
	}
	return rules, l7
}

func httpOperationFields(op *securityv1beta1.Operation) []string {
	var out []string
	add := func(n int, name string) {
		if n > 0 {
			out = append(out, name)
		}
	}
	add(len(op.GetHosts()), "hosts")
	add(len(op.GetNotHosts()), "notHosts")
	add(len(op.GetMethods()), "methods")
	add(len(op.GetNotMethods()), "notMethods")
	add(len(op.GetPaths()), "paths")
	add(len(op.GetNotPaths()), "notPaths")
	return out
}

func httpSourceFields(s *securityv1beta1.Source) []string {
	var out []string
	add := func(n int, name string) {
		if n > 0 {
			out = append(out, name)
		}
	}
	add(len(s.GetRemoteIpBlocks()), "remoteIpBlocks")
	add(len(s.GetNotRemoteIpBlocks()), "notRemoteIpBlocks")
	add(len(s.GetRequestPrincipals()), "requestPrincipals")
	add(len(s.GetNotRequestPrincipals()), "notRequestPrincipals")
	return out
}

// toStringMatches maps Istio's string patterns: "*" any non-empty value,
// "*x" suffix, "x*" prefix, else exact.
func toStringMatches(vs []string) []*security.StringMatch {
	out := make([]*security.StringMatch, 0, len(vs))
	for _, v := range vs {
		var m *security.StringMatch
		switch {
		case v == "*":
			m = &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
		case strings.HasPrefix(v, "*"):
			m = &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: strings.TrimPrefix(v, "*")}}
		case strings.HasSuffix(v, "*"):
			m = &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: strings.TrimSuffix(v, "*")}}
		default:
			m = &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: v}}
		}
		out = append(out, m)
	}
	return out
}

// toServiceAccounts reads "ns/sa" or "sa" (in the policy's namespace).
func toServiceAccounts(vs []string, ns string) []*security.ServiceAccountMatch {
	out := make([]*security.ServiceAccountMatch, 0, len(vs))
	for _, v := range vs {
		if n, sa, ok := strings.Cut(v, "/"); ok {
			out = append(out, &security.ServiceAccountMatch{Namespace: n, ServiceAccount: sa})
		} else {
			out = append(out, &security.ServiceAccountMatch{Namespace: ns, ServiceAccount: v})
		}
	}
	return out
}

// toPorts keeps the values that are valid port numbers.
func toPorts(vs []string) []uint32 {
	out := make([]uint32, 0, len(vs))
	for _, v := range vs {
		p, err := strconv.ParseUint(v, 10, 32)
		if err != nil || p > 65535 {
			continue
		}
		out = append(out, uint32(p))
	}
	return out
}

// toAddresses keeps the values that are IPs or CIDRs.
func toAddresses(vs []string) []*security.Address {
	out := make([]*security.Address, 0, len(vs))
	for _, v := range vs {
		if v == "" {
			continue
		}
		var (
			ip   netip.Addr
			bits int
		)
		if strings.Contains(v, "/") {
			pfx, err := netip.ParsePrefix(v)
			if err != nil {
				continue
			}
			ip, bits = pfx.Addr(), pfx.Bits()
		} else {
			a, err := netip.ParseAddr(v)
			if err != nil {
				continue
			}
			ip, bits = a, a.BitLen()
		}
		out = append(out, &security.Address{Address: ip.AsSlice(), Length: uint32(bits)})
	}
	return out
}

// selectsWorkload reports whether a selector policy in namespace polNS
// applies to a workload with lbls in namespace ns.
func (b *Builder) authzSelects(p *AuthorizationPolicy, ns string, lbls map[string]string) bool {
	sel := p.Spec.GetSelector()
	if sel == nil {
		return false
	}
	if p.Namespace != ns && p.Namespace != b.cfg.RootNamespace {
		return false
	}
	return labels.SelectorFromSet(sel.GetMatchLabels()).Matches(labels.Set(lbls))
}

// AuthorizationSelects reports whether the selector policy p lists a
// workload with lbls in namespace ns (policies of the root namespace select
// in every namespace).
func (b *Builder) AuthorizationSelects(p *AuthorizationPolicy, ns string, lbls map[string]string) bool {
	return b.authzSelects(p, ns, lbls)
}

// workloadPolicies is Workload.authorization_policies: the selector
// policies of the workload's namespace and of the root namespace that select
// it (sorted), then the PeerAuthentication-derived ones.
func (b *Builder) workloadPolicies(ns string, lbls map[string]string) []string {
	var out []string
	for _, polNS := range uniq(ns, b.cfg.RootNamespace) {
		for _, p := range b.store.AuthorizationPolicies(polNS) {
			if !b.authzSelects(p, ns, lbls) || b.Authorization(p).Authorization == nil {
				continue
			}
			out = append(out, PolicyKey(p.Namespace, p.Name))
		}
	}
	sort.Strings(out)
	out = append(out, b.peerAuthenticationKeys(ns, lbls)...)
	return out
}

func uniq(a, b string) []string {
	if a == b {
		return []string{a}
	}
	return []string{a, b}
}
