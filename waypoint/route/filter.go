package route

import (
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/meshlite/meshlite/proto/l7"
)

// ApplyHeaders applies a header modifier: set, then add, then remove.
func ApplyHeaders(h http.Header, m *l7.HeaderModifier) {
	if m == nil {
		return
	}
	for _, s := range m.GetSet() {
		if validHeader(s.GetName(), s.GetValue()) {
			h.Set(s.GetName(), s.GetValue())
		}
	}
	for _, a := range m.GetAdd() {
		if validHeader(a.GetName(), a.GetValue()) {
			h.Add(a.GetName(), a.GetValue())
		}
	}
	for _, r := range m.GetRemove() {
		h.Del(r)
	}
}

// validHeader keeps configured headers that would corrupt the message
// (empty or non-token names, control characters in values) out of it.
func validHeader(name, value string) bool {
	if name == "" || strings.HasPrefix(name, ":") {
		return false
	}
	for _, c := range []byte(name) {
		if c <= ' ' || c >= 0x7f || strings.IndexByte("()<>@,;:\\\"/[]?={}", c) >= 0 {
			return false
		}
	}
	for _, c := range []byte(value) {
		if (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// RewritePath applies a path modifier to path. prefixMatched is the rule's
// PATH_PREFIX value that matched, required by REPLACE_PREFIX_MATCH (without
// it the path is kept).
func RewritePath(path string, pm *l7.PathModifier, prefixMatched string) string {
	if pm == nil {
		return path
	}
	switch pm.GetType() {
	case l7.PathModifier_REPLACE_FULL_PATH:
		if pm.GetValue() == "" {
			return "/"
		}
		return pm.GetValue()
	case l7.PathModifier_REPLACE_PREFIX_MATCH:
		if prefixMatched == "" || !PrefixMatches(prefixMatched, path) {
			return path
		}
		rest := path
		if prefixMatched != "/" {
			rest = path[len(prefixMatched):]
		}
		// rest is "" or starts with "/" (or, for prefix "/", is the whole
		// path); join without doubling or losing the slash.
		repl := strings.TrimRight(pm.GetValue(), "/")
		rest = strings.TrimLeft(rest, "/")
		switch {
		case rest == "" && repl == "":
			return "/"
		case rest == "":
			return repl
		default:
			return repl + "/" + rest
		}
	}
	return path
}

// Redirect computes the Location and status of a RequestRedirect for a
// request to scheme://host path?query. host may carry a port.
func Redirect(rr *l7.RequestRedirect, scheme, host, path, rawQuery, prefixMatched string) (location string, status int) {
	status = int(rr.GetStatusCode())
	if status != http.StatusMovedPermanently && status != http.StatusFound {
		status = http.StatusFound
	}
	hostname, port := host, ""
	if h, p, err := net.SplitHostPort(host); err == nil {
		hostname, port = h, p
	}
	newScheme := scheme
	if rr.GetScheme() != "" {
		newScheme = strings.ToLower(rr.GetScheme())
	}
	if rr.GetHostname() != "" {
		hostname = rr.GetHostname()
	}
	switch {
	case rr.GetPort() != 0:
		port = strconv.Itoa(int(rr.GetPort()))
	case newScheme != scheme:
		// Gateway API: a scheme change without a port uses the scheme's
		// well-known port, which is left out of Location.
		port = ""
	}
	if (newScheme == "http" && port == "80") || (newScheme == "https" && port == "443") {
		port = ""
	}
	hostPort := hostname
	if port != "" {
		hostPort = net.JoinHostPort(hostname, port)
	}
	p := RewritePath(path, rr.GetPath(), prefixMatched)
	loc := newScheme + "://" + hostPort + p
	if rawQuery != "" {
		loc += "?" + rawQuery
	}
	return loc, status
}

// PickBackend chooses among refs by weight with r in [0,1). It returns nil
// when there is no ref with a positive weight.
func PickBackend(refs []*l7.BackendRef, r float64) *l7.BackendRef {
	var total uint64
	for _, b := range refs {
		total += uint64(b.GetWeight())
	}
	if total == 0 {
		return nil
	}
	x := uint64(r * float64(total))
	if x >= total {
		x = total - 1
	}
	for _, b := range refs {
		w := uint64(b.GetWeight())
		if x < w {
			return b
		}
		x -= w
	}
	return nil
}
