package model

import (
	"sort"

	"google.golang.org/protobuf/types/known/emptypb"
	securityv1beta1 "istio.io/api/security/v1beta1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/meshlite/meshlite/proto/security"
)

// PeerAuthentication STRICT reaches ztunnel as DENY policies on
// non-mTLS traffic, the way istiod derives them:
//   - while any PeerAuthentication exists, a static DENY policy
//     "<root>/istio_converted_static_strict" (deny when the peer has no
//     identity) is published, and every workload whose effective mode
//     (mesh, then namespace, then workload policy) is STRICT lists it;
//   - a workload policy (selector, not in the root namespace) with port-level
//     settings becomes "<ns>/converted_peer_authentication_<name>", merging
//     the effective STRICT mode with its per-port exceptions, and the
//     workloads it selects list it instead.

func mtlsMode(m *securityv1beta1.PeerAuthentication_MutualTLS) securityv1beta1.PeerAuthentication_MutualTLS_Mode {
	if m == nil {
		return securityv1beta1.PeerAuthentication_MutualTLS_UNSET
	}
	return m.GetMode()
}

func isStrict(m *securityv1beta1.PeerAuthentication_MutualTLS) bool {
	return mtlsMode(m) == securityv1beta1.PeerAuthentication_MutualTLS_STRICT
}

func isUnset(m *securityv1beta1.PeerAuthentication_MutualTLS) bool {
	return mtlsMode(m) == securityv1beta1.PeerAuthentication_MutualTLS_UNSET
}

func isPermissiveOrDisable(m *securityv1beta1.PeerAuthentication_MutualTLS) bool {
	switch mtlsMode(m) {
	case securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE, securityv1beta1.PeerAuthentication_MutualTLS_DISABLE:
		return true
	}
	return false
}

// noIdentity matches a connection whose peer presented no identity.
func noIdentity(ports ...uint32) *security.Match {
	return &security.Match{
		NotPrincipals:    []*security.StringMatch{{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}},
		DestinationPorts: ports,
	}
}

// StaticStrictPolicy is the static STRICT policy; HasStaticStrict says
// whether it is published (only while some PeerAuthentication exists).
func (b *Builder) StaticStrictPolicy() *security.Authorization {
	return &security.Authorization{
		Name:      StaticStrictPolicyName,
		Namespace: b.cfg.RootNamespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups:    []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{noIdentity()}}}}},
	}
}

// StaticStrictKey is the resource name of the static STRICT policy.
func (b *Builder) StaticStrictKey() string {
	return PolicyKey(b.cfg.RootNamespace, StaticStrictPolicyName)
}

// HasStaticStrict reports whether the static STRICT policy is published.
func (b *Builder) HasStaticStrict() bool { return b.store.HasPeerAuthentications() }

// ConvertedPeerAuthenticationName is the Authorization name derived from
// PeerAuthentication name.
func ConvertedPeerAuthenticationName(name string) string { return convertedPeerAuthNamePrefix + name }

func oldest(ps []*PeerAuthentication) *PeerAuthentication {
	var o *PeerAuthentication
	for _, p := range ps {
		if o == nil || p.CreationTimestamp.Before(&o.CreationTimestamp) ||
			(p.CreationTimestamp.Equal(&o.CreationTimestamp) && p.Name < o.Name) {
			o = p
		}
	}
	return o
}

// namespacePolicy is the oldest selector-less PeerAuthentication of ns.
func (b *Builder) namespacePeerAuthentication(ns string) *PeerAuthentication {
	var ps []*PeerAuthentication
	for _, p := range b.store.PeerAuthentications(ns) {
		if p.Spec.GetSelector() == nil {
			ps = append(ps, p)
		}
	}
	return oldest(ps)
}

// PeerAuthorization converts a PeerAuthentication into its derived
// Authorization, or nil when it needs none (everything but a workload policy
// outside the root namespace with port-level settings that change the
// effective mode of some port).
func (b *Builder) PeerAuthorization(pa *PeerAuthentication) *security.Authorization {
	spec := pa.Spec
	if pa.Namespace == b.cfg.RootNamespace || spec.GetSelector() == nil || len(spec.GetPortLevelMtls()) == 0 {
		return nil
	}
	nsCfg := b.namespacePeerAuthentication(pa.Namespace)
	rootCfg := b.namespacePeerAuthentication(b.cfg.RootNamespace)
	var nsMtls, rootMtls *securityv1beta1.PeerAuthentication_MutualTLS
	if nsCfg != nil {
		nsMtls = nsCfg.Spec.GetMtls()
	}
	if rootCfg != nil {
		rootMtls = rootCfg.Spec.GetMtls()
	}
	mode := mtlsMode(spec.GetMtls())

	var rules []*security.Rules
	var groups []*security.Group
	if mode == securityv1beta1.PeerAuthentication_MutualTLS_STRICT {
		rules = append(rules, &security.Rules{Matches: []*security.Match{noIdentity()}})
	}
	ports := make([]uint32, 0, len(spec.GetPortLevelMtls()))
	for p := range spec.GetPortLevelMtls() {
		ports = append(ports, p)
	}
	sort.Slice(ports, func(i, j int) bool { return ports[i] < ports[j] })
	nonStrictPort := false
	for _, port := range ports {
		pm := spec.GetPortLevelMtls()[port]
		switch {
		case isStrict(pm):
			// Already enforced when the workload's own mode, or the inherited one, is STRICT.
			if isStrict(spec.GetMtls()) ||
				(isUnset(spec.GetMtls()) && nsCfg != nil && isStrict(nsMtls)) ||
				((nsCfg == nil || isUnset(nsMtls)) && rootCfg != nil && isStrict(rootMtls)) {
				continue
			}
			groups = append(groups, &security.Group{Rules: []*security.Rules{{Matches: []*security.Match{noIdentity(port)}}}})
		case isPermissiveOrDisable(pm):
			if mode == securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE || mode == securityv1beta1.PeerAuthentication_MutualTLS_DISABLE {
				continue
			}
			if mode == securityv1beta1.PeerAuthentication_MutualTLS_UNSET &&
				((nsCfg != nil && !isStrict(nsMtls)) || (nsCfg == nil && rootCfg != nil && !isStrict(rootMtls)) || (nsCfg == nil && rootCfg == nil)) {
				continue
			}
			nonStrictPort = true
			// Exempt this port from the deny: the rule only matches other ports.
			rules = append(rules, &security.Rules{Matches: []*security.Match{{NotDestinationPorts: []uint32{port}}}})
		}
	}
	if mode == securityv1beta1.PeerAuthentication_MutualTLS_STRICT && !nonStrictPort {
		return nil // plain STRICT: the static policy covers it
	}
	if len(rules) == 0 && len(groups) == 0 {
		return nil
	}
	mergeStrict := (rootCfg != nil && isStrict(rootMtls) && (nsCfg == nil || isUnset(nsMtls) || isStrict(nsMtls))) ||
		(nsCfg != nil && isStrict(nsMtls))
	if mergeStrict && nonStrictPort {
		rules = append(rules, &security.Rules{Matches: []*security.Match{noIdentity()}})
	}
	if len(rules) > 0 {
		groups = append(groups, &security.Group{Rules: rules})
	}
	return &security.Authorization{
		Name:      ConvertedPeerAuthenticationName(pa.Name),
		Namespace: pa.Namespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups:    groups,
	}
}

// peerAuthenticationKeys lists the PeerAuthentication-derived policies a
// workload with lbls in ns must enforce: the static STRICT policy when its
// effective mode is STRICT, and/or its converted workload policy.
func (b *Builder) peerAuthenticationKeys(ns string, lbls map[string]string) []string {
	var meshCfg, nsCfg, wlCfg *PeerAuthentication
	pick := func(cur, p *PeerAuthentication) *PeerAuthentication {
		if cur == nil || p.CreationTimestamp.Before(&cur.CreationTimestamp) ||
			(p.CreationTimestamp.Equal(&cur.CreationTimestamp) && p.Name < cur.Name) {
			return p
		}
		return cur
	}
	// As istiod: the root namespace's selector-less policy is mesh-wide; in
	// the workload's namespace a policy without match labels is
	// namespace-wide and one whose labels match is the workload's.
	for _, p := range b.store.PeerAuthentications(b.cfg.RootNamespace) {
		if p.Spec.GetSelector() == nil || (ns == b.cfg.RootNamespace && len(p.Spec.GetSelector().GetMatchLabels()) == 0) {
			meshCfg = pick(meshCfg, p)
		}
	}
	if ns != b.cfg.RootNamespace {
		for _, p := range b.store.PeerAuthentications(ns) {
			ml := p.Spec.GetSelector().GetMatchLabels()
			if len(ml) == 0 {
				nsCfg = pick(nsCfg, p)
			} else if labels.SelectorFromSet(ml).Matches(labels.Set(lbls)) {
				wlCfg = pick(wlCfg, p)
			}
		}
	}

	strict := false
	if meshCfg != nil {
		strict = isStrict(meshCfg.Spec.GetMtls())
	}
	if nsCfg != nil && !isUnset(nsCfg.Spec.GetMtls()) {
		strict = isStrict(nsCfg.Spec.GetMtls())
	}
	portKey := ""
	if wlCfg != nil {
		spec := wlCfg.Spec
		key := PolicyKey(wlCfg.Namespace, ConvertedPeerAuthenticationName(wlCfg.Name))
		if isStrict(spec.GetMtls()) {
			strict = true
		}
		if isPermissiveOrDisable(spec.GetMtls()) {
			strict = false
		}
		if spec.GetPortLevelMtls() != nil {
			switch mtlsMode(spec.GetMtls()) {
			case securityv1beta1.PeerAuthentication_MutualTLS_STRICT:
				if anyPort(spec, isPermissiveOrDisable) {
					portKey, strict = key, false
				}
			case securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE, securityv1beta1.PeerAuthentication_MutualTLS_DISABLE:
				if anyPort(spec, isStrict) {
					portKey = key
				}
			default:
				if strict {
					permissive := anyPort(spec, func(m *securityv1beta1.PeerAuthentication_MutualTLS) bool {
						return mtlsMode(m) == securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE
					})
					if permissive {
						portKey, strict = key, false
					}
				} else {
					strict = false
					if anyPort(spec, isStrict) {
						portKey = key
					}
				}
			}
		}
	}
	var out []string
	if strict {
		out = append(out, b.StaticStrictKey())
	}
	if portKey != "" && portKey != b.StaticStrictKey() {
		out = append(out, portKey)
	}
	sort.Strings(out)
	return out
}

func anyPort(spec *securityv1beta1.PeerAuthentication, f func(*securityv1beta1.PeerAuthentication_MutualTLS) bool) bool {
	for _, m := range spec.GetPortLevelMtls() {
		if f(m) {
			return true
		}
	}
	return false
}

// PeerAuthenticationSelects reports whether pa bears on the effective mode
// of a workload with lbls in ns.
func (b *Builder) PeerAuthenticationSelects(pa *PeerAuthentication, ns string, lbls map[string]string) bool {
	if pa.Namespace == b.cfg.RootNamespace && len(pa.Spec.GetSelector().GetMatchLabels()) == 0 {
		return true
	}
	if pa.Namespace != ns {
		return false
	}
	ml := pa.Spec.GetSelector().GetMatchLabels()
	return len(ml) == 0 || labels.SelectorFromSet(ml).Matches(labels.Set(lbls))
}
