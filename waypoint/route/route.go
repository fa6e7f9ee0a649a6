package route

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"github.com/meshlite/meshlite/proto/l7"
)

// Kind says which route type a rule came from.
type Kind string

const (
	KindHTTP Kind = "HTTPRoute"
	KindGRPC Kind = "GRPCRoute"
)

// Rule is one route rule in a form both route types share.
type Rule struct {
	Kind           Kind
	RouteNamespace string
	RouteName      string
	// Name is the rule's name or "rule-<index>".
	Name        string
	Filters     []*l7.HTTPRouteFilter
	BackendRefs []*l7.BackendRef
	Timeouts    *l7.Timeouts
	Retry       *l7.Retry
	// Resilience is the route's TrafficPolicy (nil: the Service's applies).
	Resilience *l7.ResiliencePolicy
}

// ID names the rule in logs, metrics and rate-limit buckets:
// "<kind>/<namespace>/<name>/<rule>".
func (r *Rule) ID() string {
	return string(r.Kind) + "/" + r.RouteNamespace + "/" + r.RouteName + "/" + r.Name
}

// Request is what matching looks at.
type Request struct {
	Method string
	// Path is the URL path (decoded as net/url does), without the query.
	Path   string
	Query  url.Values
	Header http.Header
	// Port is the Service port the request arrived for.
	Port uint32
	// GRPC is set for gRPC requests (content-type application/grpc...).
	GRPC bool
}

// Match is the outcome of a successful match.
type Match struct {
	Rule *Rule
	// PrefixMatched is the PATH_PREFIX value that matched ("" otherwise),
	// for REPLACE_PREFIX_MATCH rewrites and redirects.
	PrefixMatched string
}

// Table is a compiled, immutable route table for one Service.
type Table struct {
	entries []entry
	// ports with at least one route: requests to such a port that match
	// nothing get 404; other ports go to the Service itself.
	routedPorts map[uint32]bool
	allPorts    bool
}

type entry struct {
	rule  *Rule
	ports []uint32
	grpc  bool
	// HTTP match parts.
	pathType  l7.PathMatch_Type
	pathValue string
	pathRE    *regexp.Regexp
	method    string
	headers   []headerMatcher
	query     []queryMatcher
	// gRPC method match.
	grpcService, grpcMethod string
	grpcRE                  *regexp.Regexp
	// precedence inputs
	order int
}

type headerMatcher struct {
	name  string
	value string
	re    *regexp.Regexp
}

type queryMatcher struct {
	name  string
	value string
	re    *regexp.Regexp
}

func anchored(expr string) (*regexp.Regexp, error) {
	return regexp.Compile("^(?:" + expr + ")$")
}

// Compile builds the table of sc. Matches that cannot be compiled (a bad
// regular expression, a path that is not absolute) are left out and
// reported; the rest of the table works.
func Compile(sc *l7.ServiceConfig) (*Table, []error) {
	t := &Table{routedPorts: map[uint32]bool{}}
	var errs []error
	order := 0
	addPorts := func(ports []uint32) {
		if len(ports) == 0 {
			t.allPorts = true
		}
		for _, p := range ports {
			t.routedPorts[p] = true
		}
	}
	for _, hr := range sc.GetHttpRoutes() {
		addPorts(hr.GetPorts())
		for i, r := range hr.GetRules() {
			rule := &Rule{Kind: KindHTTP, RouteNamespace: hr.GetNamespace(), RouteName: hr.GetName(), Name: ruleName(r.GetName(), i),
				Filters: r.GetFilters(), BackendRefs: r.GetBackendRefs(), Timeouts: r.GetTimeouts(), Retry: r.GetRetry(), Resilience: hr.GetResilience()}
			matches := r.GetMatches()
			if len(matches) == 0 {
				matches = []*l7.HTTPRouteMatch{{}}
			}
			for _, m := range matches {
				e, err := compileHTTPMatch(m)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", rule.ID(), err))
					continue
				}
				e.rule, e.ports, e.order = rule, hr.GetPorts(), order
				order++
				t.entries = append(t.entries, e)
			}
		}
	}
	for _, gr := range sc.GetGrpcRoutes() {
		addPorts(gr.GetPorts())
		for i, r := range gr.GetRules() {
			rule := &Rule{Kind: KindGRPC, RouteNamespace: gr.GetNamespace(), RouteName: gr.GetName(), Name: ruleName(r.GetName(), i),
				Filters: r.GetFilters(), BackendRefs: r.GetBackendRefs(), Timeouts: r.GetTimeouts(), Retry: r.GetRetry(), Resilience: gr.GetResilience()}
			matches := r.GetMatches()
			if len(matches) == 0 {
				matches = []*l7.GRPCRouteMatch{{}}
			}
			for _, m := range matches {
				e, err := compileGRPCMatch(m)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", rule.ID(), err))
					continue
				}
				e.rule, e.ports, e.order = rule, gr.GetPorts(), order
				order++
				t.entries = append(t.entries, e)
			}
		}
	}
	// Gateway API precedence: gRPC routes before HTTP ones for gRPC
	// requests is handled in Match; among HTTP matches: exact path, then
	// the longest prefix, then a method, then more header matches, then
	// more query matches (regular expressions rank between exact paths
	// and prefixes); ties keep the configured order (route age and
	// name, then rule order, which istiod-lite gives).
	slices.SortStableFunc(t.entries, func(a, b entry) int {
		if a.grpc != b.grpc {
			if a.grpc {
				return -1
			}
			return 1
		}
		if c := cmpDesc(a.precedence(), b.precedence()); c != 0 {
			return c
		}
		return a.order - b.order
	})
	return t, errs
}

func ruleName(name string, i int) string {
	if name != "" {
		return name
	}
	return fmt.Sprintf("rule-%d", i)
}

// precedence is a tuple compared lexicographically, higher first.
func (e *entry) precedence() [5]int {
	var p [5]int
	switch {
	case e.grpc:
		// GRPCRoute: exact service/method before partial before regex.
		if e.grpcRE == nil {
			p[0] = 1
			p[1] = len(e.grpcService) + len(e.grpcMethod)
		}
		p[3] = len(e.headers)
		return p
	case e.pathType == l7.PathMatch_EXACT:
		p[0] = 3
		p[1] = len(e.pathValue)
	case e.pathType == l7.PathMatch_REGULAR_EXPRESSION:
		// Gateway API leaves regex precedence to the implementation: after
		// exact paths, before prefixes (else "/" would shadow every regex).
		p[0] = 2
	case e.pathType == l7.PathMatch_PATH_PREFIX:
		p[0] = 1
		p[1] = len(e.pathValue)
	}
	if e.method != "" {
		p[2] = 1
	}
	p[3] = len(e.headers)
	p[4] = len(e.query)
	return p
}

func cmpDesc(a, b [5]int) int {
	for i := range a {
		if a[i] != b[i] {
			if a[i] > b[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

func compileHTTPMatch(m *l7.HTTPRouteMatch) (entry, error) {
	e := entry{method: strings.ToUpper(m.GetMethod())}
	pm := m.GetPath()
	e.pathType = pm.GetType()
	e.pathValue = pm.GetValue()
	switch e.pathType {
	case l7.PathMatch_PATH_PREFIX:
		if e.pathValue == "" {
			e.pathValue = "/"
		}
		if !strings.HasPrefix(e.pathValue, "/") {
			return e, fmt.Errorf("path prefix %q is not absolute", e.pathValue)
		}
		if len(e.pathValue) > 1 {
			e.pathValue = strings.TrimRight(e.pathValue, "/")
			if e.pathValue == "" {
				e.pathValue = "/"
			}
		}
	case l7.PathMatch_EXACT:
		if !strings.HasPrefix(e.pathValue, "/") {
			return e, fmt.Errorf("exact path %q is not absolute", e.pathValue)
		}
	case l7.PathMatch_REGULAR_EXPRESSION:
		re, err := anchored(e.pathValue)
		if err != nil {
			return e, fmt.Errorf("path regex: %w", err)
		}
		e.pathRE = re
	default:
		return e, fmt.Errorf("unknown path match type %v", e.pathType)
	}
	var err error
	if e.headers, err = compileHeaders(m.GetHeaders()); err != nil {
		return e, err
	}
	for _, q := range m.GetQueryParams() {
		qm := queryMatcher{name: q.GetName(), value: q.GetValue()}
		if q.GetType() == l7.QueryParamMatch_REGULAR_EXPRESSION {
			if qm.re, err = anchored(q.GetValue()); err != nil {
				return e, fmt.Errorf("query param %q regex: %w", q.GetName(), err)
			}
		}
		e.query = append(e.query, qm)
	}
	return e, nil
}

func compileHeaders(hs []*l7.HeaderMatch) ([]headerMatcher, error) {
	var out []headerMatcher
	for _, h := range hs {
		hm := headerMatcher{name: http.CanonicalHeaderKey(h.GetName()), value: h.GetValue()}
		if h.GetType() == l7.HeaderMatch_REGULAR_EXPRESSION {
			re, err := anchored(h.GetValue())
			if err != nil {
				return nil, fmt.Errorf("header %q regex: %w", h.GetName(), err)
			}
			hm.re = re
		}
		out = append(out, hm)
	}
	return out, nil
}

func compileGRPCMatch(m *l7.GRPCRouteMatch) (entry, error) {
	e := entry{grpc: true}
	mm := m.GetMethod()
	e.grpcService, e.grpcMethod = mm.GetService(), mm.GetMethod()
	if mm.GetType() == l7.GRPCMethodMatch_REGULAR_EXPRESSION {
		svc, meth := e.grpcService, e.grpcMethod
		if svc == "" {
			svc = "[^/]+"
		}
		if meth == "" {
			meth = "[^/]+"
		}
		re, err := regexp.Compile("^/(?:" + svc + ")/(?:" + meth + ")$")
		if err != nil {
			return e, fmt.Errorf("gRPC method regex: %w", err)
		}
		e.grpcRE = re
	}
	var err error
	if e.headers, err = compileHeaders(m.GetHeaders()); err != nil {
		return e, err
	}
	return e, nil
}

// Routed reports whether any route attaches to port; if so a request that
// matches no rule is answered 404, else it goes to the Service itself.
func (t *Table) Routed(port uint32) bool {
	return t != nil && (t.allPorts || t.routedPorts[port])
}

// Match finds the rule for r: for gRPC requests GRPCRoutes first, then
// HTTPRoutes; the first entry in precedence order that matches wins.
func (t *Table) Match(r *Request) (Match, bool) {
	if t == nil {
		return Match{}, false
	}
	for i := range t.entries {
		e := &t.entries[i]
		if e.grpc && !r.GRPC {
			continue
		}
		if len(e.ports) > 0 && !slices.Contains(e.ports, r.Port) {
			continue
		}
		if ok, prefix := e.match(r); ok {
			return Match{Rule: e.rule, PrefixMatched: prefix}, true
		}
	}
	return Match{}, false
}

func (e *entry) match(r *Request) (bool, string) {
	if e.grpc {
		if !e.matchGRPC(r.Path) {
			return false, ""
		}
		return matchHeaders(e.headers, r.Header), ""
	}
	prefix := ""
	switch e.pathType {
	case l7.PathMatch_EXACT:
		if r.Path != e.pathValue {
			return false, ""
		}
	case l7.PathMatch_PATH_PREFIX:
		if !PrefixMatches(e.pathValue, r.Path) {
			return false, ""
		}
		prefix = e.pathValue
	case l7.PathMatch_REGULAR_EXPRESSION:
		if !e.pathRE.MatchString(r.Path) {
			return false, ""
		}
	}
	if e.method != "" && r.Method != e.method {
		return false, ""
	}
	if !matchHeaders(e.headers, r.Header) {
		return false, ""
	}
	for _, q := range e.query {
		vs, ok := r.Query[q.name]
		if !ok || len(vs) == 0 {
			return false, ""
		}
		if q.re != nil {
			if !q.re.MatchString(vs[0]) {
				return false, ""
			}
		} else if vs[0] != q.value {
			return false, ""
		}
	}
	return true, prefix
}

func (e *entry) matchGRPC(path string) bool {
	if e.grpcRE != nil {
		return e.grpcRE.MatchString(path)
	}
	svc, meth, ok := SplitGRPCPath(path)
	if !ok {
		return false
	}
	return (e.grpcService == "" || e.grpcService == svc) && (e.grpcMethod == "" || e.grpcMethod == meth)
}

// SplitGRPCPath splits "/<service>/<method>".
func SplitGRPCPath(path string) (service, method string, ok bool) {
	rest, ok := strings.CutPrefix(path, "/")
	if !ok {
		return "", "", false
	}
	service, method, ok = strings.Cut(rest, "/")
	if !ok || service == "" || method == "" || strings.Contains(method, "/") {
		return "", "", false
	}
	return service, method, true
}

func matchHeaders(ms []headerMatcher, h http.Header) bool {
	for _, m := range ms {
		vs := h.Values(m.name)
		if len(vs) == 0 {
			return false
		}
		v := strings.Join(vs, ",")
		if m.re != nil {
			if !m.re.MatchString(v) {
				return false
			}
		} else if v != m.value {
			return false
		}
	}
	return true
}

// PrefixMatches is Gateway API's element-wise path prefix: "/foo" matches
// "/foo", "/foo/" and "/foo/bar" but not "/foobar". prefix has no trailing
// slash except for "/".
func PrefixMatches(prefix, path string) bool {
	if prefix == "/" {
		return strings.HasPrefix(path, "/")
	}
	if !strings.HasPrefix(path, prefix) {
		return false
	}
	return len(path) == len(prefix) || path[len(prefix)] == '/'
}
