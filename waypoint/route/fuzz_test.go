package route

import (
	"net/http"
	"net/url"
	"testing"

	"github.com/meshlite/meshlite/proto/l7"
)

// FuzzMatch compiles routes from fuzzed match values and matches fuzzed
// requests against them: no panic, and a match is always consistent with
// the rule it names.
//
//	go test ./waypoint/route -run '^$' -fuzz FuzzMatch -fuzztime 30s
func FuzzMatch(f *testing.F) {
	f.Add("/v1", uint8(0), "x-user", "ja.*", "/v1/items?debug=1", "GET", "jane", "/x")
	f.Add("[", uint8(2), "", "(", "/%zz", "", "", "")
	f.Add("/", uint8(1), "a", "b", "//..//a", "POST", "b", "/")
	f.Fuzz(func(t *testing.T, path string, ptype uint8, hname, hval, target, method, reqHdr, rewrite string) {
		sc := &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Name: "r", Rules: []*l7.HTTPRouteRule{
			{Name: "a", Matches: []*l7.HTTPRouteMatch{{
				Path:    &l7.PathMatch{Type: l7.PathMatch_Type(ptype % 4), Value: path},
				Headers: []*l7.HeaderMatch{{Type: l7.HeaderMatch_Type(ptype % 2), Name: hname, Value: hval}},
				Method:  method,
			}}},
		}}}}
		tab, _ := Compile(sc)
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return
		}
		h := http.Header{}
		if hname != "" {
			h.Set(hname, reqHdr)
		}
		r := &Request{Method: method, Path: u.Path, Query: u.Query(), Header: h}
		m, ok := tab.Match(r)
		if ok {
			if m.Rule.Name != "a" {
				t.Fatalf("matched unknown rule %q", m.Rule.Name)
			}
			if m.PrefixMatched != "" && !PrefixMatches(m.PrefixMatched, r.Path) {
				t.Fatalf("prefix %q reported for %q", m.PrefixMatched, r.Path)
			}
			_ = RewritePath(r.Path, &l7.PathModifier{Type: l7.PathModifier_REPLACE_PREFIX_MATCH, Value: rewrite}, m.PrefixMatched)
		}
		_, _ = Redirect(&l7.RequestRedirect{Hostname: hname, Path: &l7.PathModifier{Value: rewrite}}, "http", hval, r.Path, u.RawQuery, m.PrefixMatched)
		_, _, _ = SplitGRPCPath(r.Path)
	})
}
