package proxy

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/waypoint/authz"
	"github.com/meshlite/meshlite/waypoint/circuit"
	"github.com/meshlite/meshlite/waypoint/config"
	"github.com/meshlite/meshlite/waypoint/fault"
	"github.com/meshlite/meshlite/waypoint/ratelimit"
	"github.com/meshlite/meshlite/waypoint/retry"
	"github.com/meshlite/meshlite/waypoint/route"
	"github.com/meshlite/meshlite/waypoint/telemetry"
)

// The order a request goes through (each step may answer on its own):
//
//  1. authz      L7 AuthorizationPolicy (403)
//  2. route      HTTPRoute / GRPCRoute match (404 when routes exist and none matches)
//  3. fault      injected delay, then abort
//  4. ratelimit  token bucket per route rule [and source identity] (429 + retry-after)
//  5. filters    request header modifier, redirect (answers), URL rewrite, mirror
//  6. backend    weighted backendRef (500 when the pick is unresolved), then its own filters
//  7. circuit    breaker on the destination Service (503 + x-meshlite-overload)
//  8. upstream   endpoint by round robin without ejected ones; tries with
//                retry policy, per-try and request timeouts; outlier reports
//  9. response   response header modifiers, body and trailers streamed back;
//                a WebSocket upgrade answered 101 is spliced (upgrade.go)
//
// Metrics, the access log line and the span are written for every request.

// Response flags, after Envoy's, for metrics and the access log.
const (
	flagNoRoute        = "NR"
	flagNoCluster      = "NC"
	flagNoHealthy      = "UH"
	flagConnectFailure = "UF"
	flagOverflow       = "UO"
	flagTimeout        = "UT"
	flagRateLimited    = "RL"
	flagDelay          = "DI"
	flagFault          = "FI"
	flagDenied         = "RBAC"
)

// reqState carries one request through the steps.
type reqState struct {
	ci     *connInfo
	svc    *config.Service
	start  time.Time
	grpc   bool
	span   *telemetry.Span
	flags  []string
	labels telemetry.Labels
	access telemetry.Access
	rw     *respWriter
	// upgrade is the protocol an HTTP/1.1 request asks to switch to and
	// the waypoint passes on (websocket), else "".
	upgrade string
	// upgradedIn counts the bytes the client sent on its upgraded stream.
	upgradedIn int64
}

func (st *reqState) flag(f string) { st.flags = append(st.flags, f) }

// traceID is the span's trace id in hex (x-request-id, access log).
func (st *reqState) traceID() string { return hex.EncodeToString(st.span.Context.TraceID[:]) }

// ServeHTTP handles one request from a tunnel.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ci := connInfoFrom(r.Context())
	if ci == nil {
		http.Error(w, "no tunnel", http.StatusInternalServerError)
		return
	}
	snap := p.cfg.Store.Snapshot()
	st := &reqState{ci: ci, start: time.Now(), rw: &respWriter{w: w}}
	st.grpc = r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
	if ci.svcKey != "" {
		st.svc = snap.Service(ci.svcKey)
		if st.svc == nil {
			// Unbound since the tunnel opened: serve it with no L7 config.
			st.svc = &config.Service{Key: ci.svcKey, Config: &l7.ServiceConfig{}}
		}
	}
	// The span's name is only needed when it is exported (finish).
	st.span = telemetry.StartSpan("", r.Header.Get(telemetry.TraceHeader), st.start)
	p.fillSourceLabels(st, snap)
	defer p.finish(r, st)
	p.serve(st.rw, r, st, snap)
}

func (p *Proxy) fillSourceLabels(st *reqState, snap *config.Snapshot) {
	l := &st.labels
	l.SourcePrincipal = st.ci.peerID
	l.SourceNamespace = st.ci.peerNS
	l.SecurityPolicy = "mutual_tls"
	if w := snap.WorkloadByIP(st.ci.src.Addr()); w != nil {
		l.SourceWorkload, l.SourceCanonical = w.GetWorkloadName(), w.GetCanonicalName()
		l.SourceNamespace = w.GetNamespace()
	}
	if st.svc != nil {
		c := st.svc.Config
		l.DestService, l.DestServiceName, l.DestServiceNamespace = c.GetHostname(), c.GetName(), c.GetNamespace()
	}
}

func (p *Proxy) serve(w *respWriter, r *http.Request, st *reqState, snap *config.Snapshot) {
	host := r.Host
	rreq := &route.Request{Method: r.Method, Path: r.URL.Path, Header: r.Header, Port: st.ci.svcPort, GRPC: st.grpc}
	if r.URL.RawQuery != "" { // parsing allocates; most requests have none
		rreq.Query = r.URL.Query()
	}

	// 1. authz
	if st.svc != nil && !st.svc.Authz.Empty() {
		a := &authz.Attributes{Principal: st.ci.peer, Namespace: st.ci.peerNS, SourceIP: st.ci.src.Addr(), DestPort: st.ci.svcPort,
			HTTP: true, Method: r.Method, Path: r.URL.Path, Host: stripPort(host), Header: r.Header}
		d := st.svc.Authz.Evaluate(a)
		for _, name := range d.DryRun {
			p.log.Info("dry-run policy would change the decision", "policy", name, "src.identity", st.ci.peer, "dst.service", st.svc.Key, "method", r.Method, "path", r.URL.Path)
		}
		for _, name := range d.Audit {
			p.log.Info("audit", "policy", name, "src.identity", st.ci.peer, "src.addr", st.ci.src.String(), "dst.service", st.svc.Key, "method", r.Method, "path", r.URL.Path)
		}
		if !d.Allowed {
			p.log.Info("request denied", "src.identity", st.ci.peer, "src.addr", st.ci.src.String(), "dst.service", st.svc.Key,
				"policy", d.Policy, "rule", d.Rule, "reason", d.Reason, "method", r.Method, "path", r.URL.Path)
			st.flag(flagDenied)
			p.localReply(w, st, http.StatusForbidden, "RBAC: access denied")
			return
		}
	}

	// 2. route
	var rule *route.Rule
	var prefix string
	if st.svc != nil && st.ci.direct == nil {
		if m, ok := st.svc.Routes.Match(rreq); ok {
			rule, prefix = m.Rule, m.PrefixMatched
		} else if st.svc.Routes.Routed(st.ci.svcPort) {
			st.flag(flagNoRoute)
			p.localReply(w, st, http.StatusNotFound, "no route matched")
			return
		}
	}
	if rule != nil {
		st.access.Route = rule.ID() // also the rate-limit scope
	}
	res := p.resilience(st.svc, rule)

	// 3. fault
	if f := res.GetFault(); f != nil {
		act := fault.Decide(f, p.cfg.Rand)
		if act.Delay > 0 {
			st.flag(flagDelay)
			t := time.NewTimer(act.Delay)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
		if act.AbortStatus != 0 {
			st.flag(flagFault)
			if st.grpc {
				p.grpcReply(w, st, act.GRPCStatus, "fault filter abort")
			} else {
				p.localReply(w, st, act.AbortStatus, "fault filter abort")
			}
			return
		}
	}

	// 4. ratelimit
	if rl := res.GetRateLimit(); rl != nil {
		scope := st.ci.svcKey
		if rule != nil {
			scope = st.access.Route
		}
		if ok, wait := p.limiter.Allow(rl, scope, st.ci.peer); !ok {
			st.flag(flagRateLimited)
			w.Header().Set("Retry-After", ratelimit.RetryAfter(wait))
			p.localReply(w, st, http.StatusTooManyRequests, "local rate limited")
			return
		}
	}

	// 5. filters
	out := r.Clone(r.Context())
	out.RequestURI = ""
	removeHopHeaders(out.Header)
	if st.upgrade = upgradeType(r); st.upgrade != "" {
		// Hop-by-hop, and asked of the next hop again (as Envoy does).
		out.Header.Set("Connection", "Upgrade")
		out.Header.Set("Upgrade", st.upgrade)
	}
	var respMods []*l7.HeaderModifier
	var mirrors []*l7.RequestMirror
	var rewriteHost string
	applyFilters := func(fs []*l7.HTTPRouteFilter) bool {
		for _, f := range fs {
			switch k := f.GetKind().(type) {
			case *l7.HTTPRouteFilter_RequestHeaderModifier:
				route.ApplyHeaders(out.Header, k.RequestHeaderModifier)
			case *l7.HTTPRouteFilter_ResponseHeaderModifier:
				respMods = append(respMods, k.ResponseHeaderModifier)
			case *l7.HTTPRouteFilter_RequestRedirect:
				loc, code := route.Redirect(k.RequestRedirect, "http", host, r.URL.Path, r.URL.RawQuery, prefix)
				w.Header().Set("Location", loc)
				p.localReply(w, st, code, "")
				return false
			case *l7.HTTPRouteFilter_UrlRewrite:
				if h := k.UrlRewrite.GetHostname(); h != "" {
					rewriteHost = h
				}
				if pm := k.UrlRewrite.GetPath(); pm != nil {
					out.URL.Path = route.RewritePath(out.URL.Path, pm, prefix)
					out.URL.RawPath = ""
				}
			case *l7.HTTPRouteFilter_RequestMirror:
				mirrors = append(mirrors, k.RequestMirror)
			}
		}
		return true
	}
	if rule != nil && !applyFilters(rule.Filters) {
		return
	}

	// 6. backend
	var dest backend
	switch {
	case st.ci.direct != nil:
		ep, ok := snap.EndpointOf(st.ci.direct, st.ci.target.Port())
		if !ok {
			st.flag(flagNoHealthy)
			p.localReply(w, st, http.StatusServiceUnavailable, "no healthy upstream")
			return
		}
		dest = backend{key: "pod/" + ep.Addr.String(), endpoints: []config.Endpoint{ep}}
	case rule != nil && len(rule.BackendRefs) > 0:
		ref := route.PickBackend(rule.BackendRefs, p.cfg.Rand())
		if ref == nil {
			p.localReply(w, st, http.StatusInternalServerError, "no backend with weight")
			return
		}
		if reason := ref.GetInvalid(); reason != "" {
			// Gateway API: an unresolved backendRef's share of the
			// requests is answered 500, not sent to the other backends.
			// The reason stays in the log: it may name what the client
			// should not learn (another namespace's Services).
			p.log.Debug("backendRef not resolved", "route", st.access.Route, "backend", ref.GetNamespace()+"/"+ref.GetName(), "reason", reason)
			st.flag(flagNoCluster)
			p.localReply(w, st, http.StatusInternalServerError, "backend not resolved")
			return
		}
		if !applyFilters(ref.GetFilters()) {
			return
		}
		dest = p.backendFor(snap, ref, st.ci.svcPort)
	case rule != nil:
		p.localReply(w, st, http.StatusInternalServerError, "route rule has no backends")
		return
	default:
		dest = backend{key: st.ci.svcKey, port: st.ci.svcPort, endpoints: snap.Endpoints(st.ci.svcKey, st.ci.svcPort)}
		dest.hostname, dest.name, dest.namespace = st.svc.Config.GetHostname(), st.svc.Config.GetName(), st.svc.Config.GetNamespace()
	}
	if rewriteHost != "" {
		out.Host = rewriteHost
	}
	if dest.hostname != "" && st.svc != nil && dest.key != st.ci.svcKey {
		st.labels.DestService, st.labels.DestServiceName, st.labels.DestServiceNamespace = dest.hostname, dest.name, dest.namespace
	}

	// Body: kept in memory when retries or mirrors need it again.
	pol := retry.Policy{}
	if rule != nil {
		pol = retry.New(rule.Retry)
	}
	var body []byte
	replayable := true
	if r.Body != nil && r.Body != http.NoBody && (pol.Attempts > 0 || len(mirrors) > 0) {
		buf, err := io.ReadAll(io.LimitReader(r.Body, p.cfg.MaxBufferedBody+1))
		if err != nil {
			p.localReply(w, st, http.StatusBadRequest, "reading request body failed")
			return
		}
		if int64(len(buf)) > p.cfg.MaxBufferedBody {
			replayable = false
			out.Body = io.NopCloser(io.MultiReader(bytes.NewReader(buf), r.Body))
			pol = retry.Policy{}
		} else {
			body = buf
		}
	} else if r.Body == nil || r.Body == http.NoBody {
		body = []byte{}
	} else {
		replayable = false
	}
	if replayable && body != nil {
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		out.ContentLength = int64(len(body))
		// The client's body has been read into body: the first try sends
		// the copy too.
		if len(body) == 0 {
			out.Body = http.NoBody
		} else {
			out.Body = io.NopCloser(bytes.NewReader(body))
		}
	}
	for _, m := range mirrors {
		if replayable && st.upgrade == "" { // a handshake is not mirrored
			p.mirror(snap, out, body, m, st)
		}
	}

	// 7. circuit
	brk := p.breakers.For(dest.key, res.GetCircuitBreaker())
	release, err := brk.Acquire(r.Context())
	if err != nil {
		if errors.Is(err, circuit.ErrOpen) {
			st.flag(flagOverflow)
			w.Header().Set(circuit.OverloadHeader, circuit.OverloadValue)
			p.localReply(w, st, http.StatusServiceUnavailable, "upstream overflow: circuit open")
		}
		return
	}
	defer release()

	// 8. upstream
	p.forward(w, r, out, st, dest, pol, rule, res, respMods)
}

// resilience merges the route's TrafficPolicy over the Service's, part by part.
func (p *Proxy) resilience(svc *config.Service, rule *route.Rule) *l7.ResiliencePolicy {
	var base *l7.ResiliencePolicy
	if svc != nil {
		base = svc.Config.GetResilience()
	}
	if rule == nil || rule.Resilience == nil {
		return base
	}
	rp := rule.Resilience
	out := &l7.ResiliencePolicy{Namespace: rp.GetNamespace(), Name: rp.GetName(),
		RateLimit: base.GetRateLimit(), CircuitBreaker: base.GetCircuitBreaker(), OutlierDetection: base.GetOutlierDetection(), Fault: base.GetFault()}
	if rp.GetRateLimit() != nil {
		out.RateLimit = rp.GetRateLimit()
	}
	if rp.GetCircuitBreaker() != nil {
		out.CircuitBreaker = rp.GetCircuitBreaker()
	}
	if rp.GetOutlierDetection() != nil {
		out.OutlierDetection = rp.GetOutlierDetection()
	}
	if rp.GetFault() != nil {
		out.Fault = rp.GetFault()
	}
	return out
}

// destKey names the destination's Service port for round robin and
// outlier state.
func (b backend) destKey() string { return b.key + ":" + strconv.FormatUint(uint64(b.port), 10) }

// backend is a resolved destination: a Service port and its endpoints.
type backend struct {
	key                       string // "<namespace>/<hostname>"
	port                      uint32
	hostname, name, namespace string
	endpoints                 []config.Endpoint
}

func (p *Proxy) backendFor(snap *config.Snapshot, ref *l7.BackendRef, reqPort uint32) backend {
	ns := ref.GetNamespace()
	if ns == "" {
		// <name>.<namespace>.svc...
		if parts := strings.SplitN(ref.GetHostname(), ".", 3); len(parts) >= 2 {
			ns = parts[1]
		}
	}
	port := ref.GetPort()
	if port == 0 {
		port = reqPort
	}
	key := ns + "/" + ref.GetHostname()
	return backend{key: key, port: port, hostname: ref.GetHostname(), name: ref.GetName(), namespace: ns, endpoints: snap.Endpoints(key, port)}
}

// localReply answers from the waypoint itself; gRPC callers get a
// trailers-only gRPC status instead of an HTTP error.
func (p *Proxy) localReply(w *respWriter, st *reqState, status int, msg string) {
	if st.grpc && status >= 400 {
		// As Istio: response_code is the HTTP status sent (200), the
		// outcome is in grpc_response_status.
		p.grpcReply(w, st, fault.GRPCStatusFor(status), msg)
		return
	}
	if msg != "" {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
	}
	w.WriteHeader(status)
	if msg != "" {
		_, _ = io.WriteString(w, msg+"\n")
	}
}

func (p *Proxy) grpcReply(w *respWriter, st *reqState, code int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "application/grpc")
	h.Set("Grpc-Status", strconv.Itoa(code))
	if msg != "" {
		h.Set("Grpc-Message", msg)
	}
	w.WriteHeader(http.StatusOK)
	st.labels.GRPCStatus = strconv.Itoa(code)
}

// finish writes metrics, the access log line and the span.
func (p *Proxy) finish(r *http.Request, st *reqState) {
	end := time.Now()
	status := st.rw.status
	if status == 0 {
		status = http.StatusOK
		if r.Context().Err() != nil && !st.rw.wrote {
			status = 0 // client went away before any answer
		}
	}
	st.labels.ResponseCode = status
	if st.grpc && st.labels.GRPCStatus == "" {
		st.labels.GRPCStatus = st.rw.grpcStatus()
	}
	st.labels.Protocol = "http"
	if st.grpc {
		st.labels.Protocol = "grpc"
	}
	st.labels.ResponseFlags = strings.Join(st.flags, ",")
	reqBytes := headerSize(r.Header) + max(r.ContentLength, 0) + st.upgradedIn
	p.cfg.Metrics.Request(&st.labels, end.Sub(st.start), reqBytes, st.rw.bytes+headerSize(st.rw.Header()))
	a := &st.access
	a.Method, a.Authority, a.Path, a.Protocol = r.Method, r.Host, r.URL.RequestURI(), r.Proto
	a.Status, a.Flags, a.Duration = st.labels.ResponseCode, st.labels.ResponseFlags, end.Sub(st.start)
	a.BytesIn, a.BytesOut = max(r.ContentLength, 0)+st.upgradedIn, st.rw.bytes
	a.SourceAddr, a.SourcePrincipal = st.ci.srcStr, st.ci.peer
	if st.svc != nil {
		a.DestService = st.svc.Key
	}
	a.TraceID = st.traceID()
	p.alog.LogAccess(r.Context(), a)
	if p.cfg.Exporter != nil && st.span.Sampled() {
		st.span.Name = r.Method + " " + st.ci.target.String()
		st.span.End, st.span.Status = end, st.labels.ResponseCode
		st.span.Attrs = map[string]string{"http.method": r.Method, "http.url": r.URL.RequestURI(), "upstream_cluster": a.Upstream,
			"peer.identity": st.ci.peer, "response_flags": a.Flags, "component": "waypoint"}
		p.cfg.Exporter.Export(st.span)
	}
}

func headerSize(h http.Header) int64 {
	var n int64
	for k, vs := range h {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 4)
		}
	}
	return n
}

func stripPort(host string) string {
	if ap, err := netip.ParseAddrPort(host); err == nil {
		return ap.Addr().String()
	}
	if i := strings.LastIndexByte(host, ':'); i > 0 && !strings.Contains(host[i:], "]") {
		return host[:i]
	}
	return host
}

// Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Transfer-Encoding", "Upgrade"}

func removeHopHeaders(h http.Header) {
	for _, f := range h.Values("Connection") {
		for _, name := range strings.Split(f, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
	if te := h.Get("Te"); te != "" && !strings.EqualFold(strings.TrimSpace(te), "trailers") {
		h.Del("Te")
	}
}

// respWriter records what was answered.
type respWriter struct {
	w      http.ResponseWriter
	status int
	bytes  int64
	wrote  bool
}

func (w *respWriter) Header() http.Header { return w.w.Header() }

func (w *respWriter) WriteHeader(code int) {
	if w.wrote {
		return
	}
	w.wrote, w.status = true, code
	w.w.WriteHeader(code)
}

func (w *respWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.w.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *respWriter) Flush() {
	if f, ok := w.w.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *respWriter) grpcStatus() string {
	h := w.w.Header()
	if v := h.Get("Grpc-Status"); v != "" {
		return v
	}
	if v := h.Get(http.TrailerPrefix + "Grpc-Status"); v != "" {
		return v
	}
	return ""
}

var _ = slog.LevelInfo
var _ context.Context
