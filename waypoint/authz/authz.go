// Package authz evaluates the L7 AuthorizationPolicies of a Service for one
// request (or, for plain TCP, one connection) with Istio's semantics: a
// matching DENY denies; then, if any ALLOW policy applies, one of them must
// match; AUDIT policies are only reported. It is pure: it decides and says
// which policy and rule decided, and leaves logging and answering to the
// caller.
package authz

import (
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshlite/meshlite/proto/l7"
)

// Attributes describe what is being authorized.
type Attributes struct {
	// Principal is the source SPIFFE ID without "spiffe://"; Namespace the
	// source namespace read from it. Empty when the source is unknown.
	Principal string
	Namespace string
	SourceIP  netip.Addr
	// DestPort is the Service port.
	DestPort uint32
	// HTTP is false for plain TCP: then L7 fields cannot be checked.
	HTTP   bool
	Method string
	Path   string
	Host   string
	Header http.Header
}

// Decision is the outcome.
type Decision struct {
	Allowed bool
	// Policy ("<namespace>/<name>") and Rule (index) that decided; Policy
	// is empty and Rule -1 when no policy matched (allowed because there is
	// no ALLOW policy, or denied because none of the ALLOW policies matched).
	Policy string
	Rule   int
	Reason string
	// DryRun lists dry-run policies that would have changed the outcome.
	DryRun []string
	// Audit lists matching AUDIT policies.
	Audit []string
}

// Engine is the compiled policy set of one Service; immutable.
type Engine struct {
	deny, allow, audit []*policy
}

type policy struct {
	name   string
	action l7.AuthorizationPolicy_Action
	dryRun bool
	rules  []rule
}

type rule struct {
	from []*l7.Source
	to   []*l7.Operation
	when []condition
	// l7 marks rules that need L7 attributes (hosts, methods, paths,
	// request headers): under plain TCP an ALLOW rule like this never
	// matches and a DENY rule is judged on its other fields.
	l7 bool
}

type condition struct {
	key, header       string
	values, notValues []string
	known             bool
}

// Compile builds the engine; policies with problems are kept but their
// unknown parts fail closed (see Condition in l7.proto) and are reported.
func Compile(ps []*l7.AuthorizationPolicy) (*Engine, []error) {
	e := &Engine{}
	var errs []error
	for _, p := range ps {
		cp := &policy{name: p.GetNamespace() + "/" + p.GetName(), action: p.GetAction(), dryRun: p.GetDryRun()}
		for i, r := range p.GetRules() {
			cr := rule{from: r.GetFrom(), to: r.GetTo()}
			for _, op := range r.GetTo() {
				if len(op.GetHosts())+len(op.GetNotHosts())+len(op.GetMethods())+len(op.GetNotMethods())+len(op.GetPaths())+len(op.GetNotPaths()) > 0 {
					cr.l7 = true
				}
			}
			for _, w := range r.GetWhen() {
				c := condition{key: w.GetKey(), values: w.GetValues(), notValues: w.GetNotValues(), known: true}
				switch {
				case strings.HasPrefix(c.key, "request.headers[") && strings.HasSuffix(c.key, "]"):
					c.header = c.key[len("request.headers[") : len(c.key)-1]
					cr.l7 = true
				case c.key == "request.method" || c.key == "request.host" || c.key == "request.path":
					cr.l7 = true
				case slices.Contains([]string{"source.principal", "source.namespace", "source.ip", "destination.port"}, c.key):
				default:
					c.known = false
					errs = append(errs, fmt.Errorf("policy %s rule %d: unsupported condition key %q (never matches for ALLOW, always for DENY)", cp.name, i, c.key))
				}
				cr.when = append(cr.when, c)
			}
			cp.rules = append(cp.rules, cr)
		}
		switch cp.action {
		case l7.AuthorizationPolicy_DENY:
			e.deny = append(e.deny, cp)
		case l7.AuthorizationPolicy_ALLOW:
			e.allow = append(e.allow, cp)
		case l7.AuthorizationPolicy_AUDIT:
			e.audit = append(e.audit, cp)
		default:
			errs = append(errs, fmt.Errorf("policy %s: unknown action %v, ignored", cp.name, cp.action))
		}
	}
	return e, errs
}

// Empty reports whether there is no policy at all.
func (e *Engine) Empty() bool {
	return e == nil || len(e.deny)+len(e.allow)+len(e.audit) == 0
}

// Evaluate decides a.
func (e *Engine) Evaluate(a *Attributes) Decision {
	d := Decision{Allowed: true, Rule: -1}
	if e.Empty() {
		return d
	}
	for _, p := range e.audit {
		if i := p.match(a, false); i >= 0 {
			d.Audit = append(d.Audit, p.name)
		}
	}
	for _, p := range e.deny {
		if i := p.match(a, true); i >= 0 {
			if p.dryRun {
				d.DryRun = append(d.DryRun, p.name)
				continue
			}
			return Decision{Allowed: false, Policy: p.name, Rule: i, Reason: "denied by DENY policy", Audit: d.Audit, DryRun: d.DryRun}
		}
	}
	enforcedAllow := 0
	for _, p := range e.allow {
		if !p.dryRun {
			enforcedAllow++
		}
	}
	for _, p := range e.allow {
		if i := p.match(a, false); i >= 0 {
			if p.dryRun {
				d.DryRun = append(d.DryRun, p.name)
				continue
			}
			d.Policy, d.Rule, d.Reason = p.name, i, "allowed by ALLOW policy"
			return d
		}
	}
	if enforcedAllow > 0 {
		d.Allowed, d.Reason = false, "no ALLOW policy matched"
		return d
	}
	d.Reason = "no ALLOW policy applies"
	return d
}

// match returns the index of the first matching rule, or -1.
func (p *policy) match(a *Attributes, deny bool) int {
	for i := range p.rules {
		r := &p.rules[i]
		if !a.HTTP && r.l7 && !deny {
			continue
		}
		if r.matches(a, deny) {
			return i
		}
	}
	return -1
}

func (r *rule) matches(a *Attributes, deny bool) bool {
	if len(r.from) > 0 && !slices.ContainsFunc(r.from, func(s *l7.Source) bool { return matchSource(s, a) }) {
		return false
	}
	if len(r.to) > 0 && !slices.ContainsFunc(r.to, func(o *l7.Operation) bool { return matchOperation(o, a) }) {
		return false
	}
	for _, c := range r.when {
		if !c.matches(a, deny) {
			return false
		}
	}
	return true
}

func matchSource(s *l7.Source, a *Attributes) bool {
	return matchList(s.GetPrincipals(), s.GetNotPrincipals(), a.Principal, false) &&
		matchList(s.GetNamespaces(), s.GetNotNamespaces(), a.Namespace, false) &&
		matchIPs(s.GetIpBlocks(), s.GetNotIpBlocks(), a.SourceIP)
}

func matchOperation(o *l7.Operation, a *Attributes) bool {
	if len(o.GetPorts()) > 0 && !slices.Contains(o.GetPorts(), a.DestPort) {
		return false
	}
	if slices.Contains(o.GetNotPorts(), a.DestPort) {
		return false
	}
	if !a.HTTP {
		// Only DENY rules get here with L7 fields; judge them on ports.
		return true
	}
	return matchList(o.GetHosts(), o.GetNotHosts(), a.Host, true) &&
		matchList(o.GetMethods(), o.GetNotMethods(), a.Method, false) &&
		matchList(o.GetPaths(), o.GetNotPaths(), a.Path, false)
}

func (c *condition) matches(a *Attributes, deny bool) bool {
	if !c.known {
		return deny
	}
	var got []string
	switch {
	case c.header != "":
		if !a.HTTP {
			return deny
		}
		got = a.Header.Values(c.header)
	case c.key == "request.method" || c.key == "request.host" || c.key == "request.path":
		if !a.HTTP {
			return deny
		}
		got = []string{map[string]string{"request.method": a.Method, "request.host": a.Host, "request.path": a.Path}[c.key]}
	case c.key == "source.principal":
		got = []string{a.Principal}
	case c.key == "source.namespace":
		got = []string{a.Namespace}
	case c.key == "destination.port":
		got = []string{strconv.Itoa(int(a.DestPort))}
	case c.key == "source.ip":
		if len(c.values) > 0 && !matchIPs(c.values, nil, a.SourceIP) {
			return false
		}
		return len(c.notValues) == 0 || matchIPs(nil, c.notValues, a.SourceIP)
	}
	anyMatch := func(pats []string) bool {
		for _, g := range got {
			for _, p := range pats {
				if matchString(p, g, false) {
					return true
				}
			}
		}
		return false
	}
	if len(c.values) > 0 && !anyMatch(c.values) {
		return false
	}
	return len(c.notValues) == 0 || !anyMatch(c.notValues)
}

// matchList: values set means one must match; notValues means none may.
func matchList(values, notValues []string, got string, fold bool) bool {
	if len(values) > 0 && !slices.ContainsFunc(values, func(p string) bool { return matchString(p, got, fold) }) {
		return false
	}
	return !slices.ContainsFunc(notValues, func(p string) bool { return matchString(p, got, fold) })
}

// matchString is Istio's string match: "*", "prefix*", "*suffix" or exact.
func matchString(pattern, s string, fold bool) bool {
	if fold {
		pattern, s = strings.ToLower(pattern), strings.ToLower(s)
	}
	switch {
	case pattern == "*":
		// Istio: "*" means present (e.g. any authenticated principal).
		return s != ""
	case strings.HasSuffix(pattern, "*"):
		return strings.HasPrefix(s, pattern[:len(pattern)-1])
	case strings.HasPrefix(pattern, "*"):
		return strings.HasSuffix(s, pattern[1:])
	}
	return pattern == s
}

func matchIPs(blocks, notBlocks []string, ip netip.Addr) bool {
	in := func(list []string) bool {
		for _, b := range list {
			if p, err := netip.ParsePrefix(b); err == nil {
				if ip.IsValid() && p.Contains(ip.Unmap()) {
					return true
				}
			} else if a, err := netip.ParseAddr(b); err == nil && ip.IsValid() && a.Unmap() == ip.Unmap() {
				return true
			}
		}
		return false
	}
	if len(blocks) > 0 && !in(blocks) {
		return false
	}
	return !in(notBlocks)
}
