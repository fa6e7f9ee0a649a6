// Package policy evaluates L4 authorization (istio.security.Authorization)
// for one connection, with the semantics of Istio's ztunnel: DENY policies
// first, then ALLOW (when any ALLOW policy applies, one must match), dry-run
// policies evaluated and logged but never enforced.
//
// It owns compiling Authorization resources into a form that is cheap to
// evaluate, and the decision with its reason. It does not decide which
// policies apply to a workload (package state does) and holds no state.
package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/proto/security"
)

// Policy is a compiled Authorization. It is immutable once compiled.
type Policy struct {
	// Key is "<namespace>/<name>", the resource name.
	Key       string
	Name      string
	Namespace string
	Scope     security.Scope
	Action    security.Action
	DryRun    bool
	// groups: a policy matches when any group does; a group when all its
	// clauses do; a clause when any of its matches does.
	groups [][][]match
}

type strMatch struct {
	kind  uint8 // exact, prefix, suffix, presence
	value string
}

const (
	strExact uint8 = iota
	strPrefix
	strSuffix
	strPresence
)

func (m strMatch) matches(s string) bool {
	switch m.kind {
	case strExact:
		return s == m.value
	case strPrefix:
		return strings.HasPrefix(s, m.value)
	case strSuffix:
		return strings.HasSuffix(s, m.value)
	default:
		return s != ""
	}
}

type saMatch struct{ namespace, serviceAccount string }

type match struct {
	namespaces, notNamespaces []strMatch
	sas, notSAs               []saMatch
	principals, notPrincipals []strMatch
	srcIPs, notSrcIPs         []netip.Prefix
	dstIPs, notDstIPs         []netip.Prefix
	dstPorts, notDstPorts     []uint16
}

func (m *match) empty() bool {
	return len(m.namespaces)+len(m.notNamespaces)+len(m.sas)+len(m.notSAs)+
		len(m.principals)+len(m.notPrincipals)+len(m.srcIPs)+len(m.notSrcIPs)+
		len(m.dstIPs)+len(m.notDstIPs)+len(m.dstPorts)+len(m.notDstPorts) == 0
}

// Compile checks an Authorization and compiles it. Unlike Istio's ztunnel,
// which drops entries it cannot parse (which can widen an ALLOW), a
// malformed entry rejects the whole resource so the push is NACKed and the
// last good policy stays in force.
func Compile(a *security.Authorization) (*Policy, error) {
	if a == nil {
		return nil, errors.New("nil authorization")
	}
	if a.GetName() == "" {
		return nil, errors.New("authorization without a name")
	}
	key := a.GetNamespace() + "/" + a.GetName()
	if _, ok := security.Scope_name[int32(a.GetScope())]; !ok {
		return nil, fmt.Errorf("authorization %s: unknown scope %d", key, a.GetScope())
	}
	if _, ok := security.Action_name[int32(a.GetAction())]; !ok {
		return nil, fmt.Errorf("authorization %s: unknown action %d", key, a.GetAction())
	}
	p := &Policy{Key: key, Name: a.GetName(), Namespace: a.GetNamespace(), Scope: a.GetScope(),
		Action: a.GetAction(), DryRun: a.GetDryRun()}
	for gi, g := range a.GetGroups() {
		var clauses [][]match
		for ci, r := range g.GetRules() {
			var ms []match
			for mi, m := range r.GetMatches() {
				cm, err := compileMatch(m)
				if err != nil {
					return nil, fmt.Errorf("authorization %s group %d rules %d match %d: %w", key, gi, ci, mi, err)
				}
				ms = append(ms, cm)
			}
			clauses = append(clauses, ms)
		}
		p.groups = append(p.groups, clauses)
	}
	return p, nil
}

func compileMatch(m *security.Match) (match, error) {
	var out match
	var err error
	if out.namespaces, err = strMatches(m.GetNamespaces()); err != nil {
		return out, fmt.Errorf("namespaces: %w", err)
	}
	if out.notNamespaces, err = strMatches(m.GetNotNamespaces()); err != nil {
		return out, fmt.Errorf("not_namespaces: %w", err)
	}
	if out.principals, err = strMatches(m.GetPrincipals()); err != nil {
		return out, fmt.Errorf("principals: %w", err)
	}
	if out.notPrincipals, err = strMatches(m.GetNotPrincipals()); err != nil {
		return out, fmt.Errorf("not_principals: %w", err)
	}
	out.sas = saMatches(m.GetServiceAccounts())
	out.notSAs = saMatches(m.GetNotServiceAccounts())
	if out.srcIPs, err = prefixes(m.GetSourceIps()); err != nil {
		return out, fmt.Errorf("source_ips: %w", err)
	}
	if out.notSrcIPs, err = prefixes(m.GetNotSourceIps()); err != nil {
		return out, fmt.Errorf("not_source_ips: %w", err)
	}
	if out.dstIPs, err = prefixes(m.GetDestinationIps()); err != nil {
		return out, fmt.Errorf("destination_ips: %w", err)
	}
	if out.notDstIPs, err = prefixes(m.GetNotDestinationIps()); err != nil {
		return out, fmt.Errorf("not_destination_ips: %w", err)
	}
	if out.dstPorts, err = ports(m.GetDestinationPorts()); err != nil {
		return out, fmt.Errorf("destination_ports: %w", err)
	}
	if out.notDstPorts, err = ports(m.GetNotDestinationPorts()); err != nil {
		return out, fmt.Errorf("not_destination_ports: %w", err)
	}
	return out, nil
}

func strMatches(in []*security.StringMatch) ([]strMatch, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]strMatch, 0, len(in))
	for i, s := range in {
		switch t := s.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			out = append(out, strMatch{strExact, t.Exact})
		case *security.StringMatch_Prefix:
			out = append(out, strMatch{strPrefix, t.Prefix})
		case *security.StringMatch_Suffix:
			out = append(out, strMatch{strSuffix, t.Suffix})
		case *security.StringMatch_Presence:
			out = append(out, strMatch{kind: strPresence})
		default:
			return nil, fmt.Errorf("entry %d: string match without a match type", i)
		}
	}
	return out, nil
}

func saMatches(in []*security.ServiceAccountMatch) []saMatch {
	if len(in) == 0 {
		return nil
	}
	out := make([]saMatch, 0, len(in))
	for _, s := range in {
		out = append(out, saMatch{s.GetNamespace(), s.GetServiceAccount()})
	}
	return out
}

func prefixes(in []*security.Address) ([]netip.Prefix, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]netip.Prefix, 0, len(in))
	for i, a := range in {
		ip, ok := netip.AddrFromSlice(a.GetAddress())
		if !ok {
			return nil, fmt.Errorf("entry %d: address of %d bytes", i, len(a.GetAddress()))
		}
		if a.GetLength() > uint32(ip.BitLen()) {
			return nil, fmt.Errorf("entry %d: prefix length %d for %s", i, a.GetLength(), ip)
		}
		pfx, err := ip.Prefix(int(a.GetLength()))
		if err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
		out = append(out, pfx)
	}
	return out, nil
}

func ports(in []uint32) ([]uint16, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]uint16, 0, len(in))
	for i, p := range in {
		if p > 65535 {
			return nil, fmt.Errorf("entry %d: port %d out of range", i, p)
		}
		out = append(out, uint16(p))
	}
	return out, nil
}

// Conn is what a policy sees of a connection.
type Conn struct {
	// Src is the source IP, Dst the destination the caller asked for
	// (workload IP and target port).
	Src netip.Addr
	Dst netip.AddrPort
	// Principal is the peer's SPIFFE ID without "spiffe://"
	// ("<td>/ns/<ns>/sa/<sa>"); empty when the peer has no identity
	// (plaintext).
	Principal string
	// Namespace and ServiceAccount come from the SPIFFE ID path; empty when
	// there is no identity.
	Namespace      string
	ServiceAccount string
}

// HasIdentity reports whether the peer presented an identity.
func (c *Conn) HasIdentity() bool { return c.Principal != "" }

// NewConn builds a Conn from a peer's SPIFFE ID (zero ID: no identity).
func NewConn(src netip.Addr, dst netip.AddrPort, peer spiffeid.ID) Conn {
	c := Conn{Src: src.Unmap(), Dst: netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())}
	if peer.IsZero() {
		return c
	}
	c.Principal = peer.TrustDomain().Name() + peer.Path()
	// Path is /ns/<ns>/sa/<sa> for workload identities; any other shape
	// leaves namespace and service account empty, which no namespace or
	// service-account match accepts.
	if rest, ok := strings.CutPrefix(peer.Path(), "/ns/"); ok {
		if ns, sa, ok := strings.Cut(rest, "/sa/"); ok && ns != "" && sa != "" && !strings.Contains(sa, "/") {
			c.Namespace, c.ServiceAccount = ns, sa
		}
	}
	return c
}

func (m *match) matches(c *Conn) bool {
	ip := c.Dst.Addr()
	if !prefixesMatch(m.dstIPs, m.notDstIPs, ip) || !prefixesMatch(m.srcIPs, m.notSrcIPs, c.Src) {
		return false
	}
	port := c.Dst.Port()
	if len(m.dstPorts) > 0 && !containsPort(m.dstPorts, port) {
		return false
	}
	if len(m.notDstPorts) > 0 && containsPort(m.notDstPorts, port) {
		return false
	}
	if !sasMatch(m.sas, m.notSAs, c) {
		return false
	}
	// Principals are matched without the spiffe:// scheme; no identity
	// matches no principal (not even presence).
	if !strsMatch(m.principals, m.notPrincipals, c.Principal, c.HasIdentity()) {
		return false
	}
	return strsMatch(m.namespaces, m.notNamespaces, c.Namespace, true)
}

func prefixesMatch(pos, neg []netip.Prefix, ip netip.Addr) bool {
	if len(pos) > 0 {
		ok := false
		for _, p := range pos {
			if p.Contains(ip) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	for _, p := range neg {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}

func containsPort(ps []uint16, p uint16) bool {
	for _, x := range ps {
		if x == p {
			return true
		}
	}
	return false
}

func sasMatch(pos, neg []saMatch, c *Conn) bool {
	has := c.HasIdentity()
	one := func(s saMatch) bool {
		return has && s.namespace == c.Namespace && s.serviceAccount == c.ServiceAccount
	}
	if len(pos) > 0 {
		ok := false
		for _, s := range pos {
			if one(s) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	for _, s := range neg {
		if one(s) {
			return false
		}
	}
	return true
}

// strsMatch applies positive and negative string matches; when valid is
// false the value matches nothing.
func strsMatch(pos, neg []strMatch, v string, valid bool) bool {
	if len(pos) > 0 {
		ok := false
		for _, s := range pos {
			if valid && s.matches(v) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	for _, s := range neg {
		if valid && s.matches(v) {
			return false
		}
	}
	return true
}

// Match reports whether the policy matches c and, if so, the index of the
// first matching group (the AuthorizationPolicy rule). A policy without
// groups matches nothing.
func (p *Policy) Match(c *Conn) (int, bool) {
	for gi, g := range p.groups {
		if groupMatches(g, c) {
			return gi, true
		}
	}
	return -1, false
}

func groupMatches(g [][]match, c *Conn) bool {
	for _, clause := range g {
		if len(clause) == 0 {
			continue // an empty clause constrains nothing
		}
		ok := false
		for i := range clause {
			if clause[i].empty() {
				continue // an empty match matches nothing
			}
			if clause[i].matches(c) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}
