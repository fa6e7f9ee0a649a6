package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/waypoint/config"
	"github.com/meshlite/meshlite/waypoint/retry"
	"github.com/meshlite/meshlite/waypoint/route"
)

// transportKey: upstream connections are pooled per original source IP,
// because the tunnel's Forwarded header names that source for the
// destination's policy, per protocol, and per requests-per-connection limit
// (circuitBreaker.maxRequestsPerConnection, 0: none).
type transportKey struct {
	src    netip.Addr
	h2     bool
	maxReq uint32
}

const (
	maxTransports       = 1024
	upstreamIdleTimeout = 90 * time.Second
)

func (p *Proxy) transport(src netip.Addr, h2 bool, maxReq uint32) http.RoundTripper {
	k := transportKey{src, h2, maxReq}
	p.upMu.Lock()
	defer p.upMu.Unlock()
	if t := p.transports[k]; t != nil {
		return t
	}
	if len(p.transports) >= maxTransports {
		for old, t := range p.transports {
			if c, ok := t.(interface{ CloseIdleConnections() }); ok {
				c.CloseIdleConnections()
			}
			delete(p.transports, old)
			if len(p.transports) < maxTransports*9/10 {
				break
			}
		}
	}
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) { return p.dialEndpoint(ctx, src, addr) }
	tr := &http.Transport{
		DialContext:         dial,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     upstreamIdleTimeout,
		DisableCompression:  true,
		Protocols:           new(http.Protocols),
	}
	if h2 {
		// HTTP/2 with prior knowledge over the tunnel (gRPC needs it).
		tr.Protocols.SetUnencryptedHTTP2(true)
		tr.HTTP2 = &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 10 * time.Second}
	} else {
		tr.Protocols.SetHTTP1(true)
	}
	var t http.RoundTripper = tr
	if maxReq > 0 {
		t = newLimitedPool(tr, h2, maxReq, upstreamIdleTimeout)
	}
	p.transports[k] = t
	return t
}

// errConnect marks failures to reach an endpoint (before any response).
var errConnect = errors.New("upstream connect failed")

// dialEndpoint opens a connection to addr (an endpoint "<pod ip>:<port>"):
// an HBONE tunnel to its ztunnel with the waypoint's identity when the
// endpoint speaks HBONE, else plain TCP.
func (p *Proxy) dialEndpoint(ctx context.Context, src netip.Addr, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("%w: endpoint %q: %v", errConnect, addr, err)
	}
	w := p.cfg.Store.Snapshot().WorkloadByIP(ap.Addr())
	if w == nil {
		return nil, fmt.Errorf("%w: endpoint %s is no longer known", errConnect, ap)
	}
	ep, ok := p.cfg.Store.Snapshot().EndpointOf(w, ap.Port())
	if !ok {
		return nil, fmt.Errorf("%w: endpoint %s has no usable identity", errConnect, ap)
	}
	return p.dialTo(ctx, src, ep)
}

func (p *Proxy) dialTo(ctx context.Context, src netip.Addr, ep config.Endpoint) (net.Conn, error) {
	if !ep.HBONE {
		c, err := p.cfg.DialTCP(ctx, ep.Addr)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errConnect, err)
		}
		return c, nil
	}
	req := hbone.DialRequest{
		Transport: p.cfg.UpstreamTransport,
		Endpoint:  netip.AddrPortFrom(ep.Addr.Addr(), p.cfg.HBONEPort),
		Target:    ep.Addr,
		Source:    p.cfg.SVID,
		PeerIDs:   []spiffeid.ID{ep.Identity},
	}
	if src.IsValid() {
		req.Forwarded = netip.AddrPortFrom(src, 0)
	}
	c, err := p.cfg.Tunnels.Dial(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("%w: hbone to %s: %v", errConnect, ep.Addr, err)
	}
	return c, nil
}

// pick chooses an endpoint of b by round robin, skipping ejected ones and,
// when others remain, the ones already tried. dk is b.destKey().
func (p *Proxy) pick(b backend, dk string, tried []netip.AddrPort) (config.Endpoint, bool) {
	if len(b.endpoints) == 0 {
		return config.Endpoint{}, false
	}
	// The common case (nothing ejected, first try) allocates nothing.
	candidates := b.endpoints
	if p.outliers.AnyEjected() {
		var healthy []config.Endpoint
		for _, e := range b.endpoints {
			if !p.outliers.Ejected(dk, e.Key()) {
				healthy = append(healthy, e)
			}
		}
		// Everything ejected: better to try than to fail for sure.
		if len(healthy) > 0 {
			candidates = healthy
		}
	}
	if len(tried) > 0 {
		if fresh := slices.DeleteFunc(slices.Clone(candidates), func(e config.Endpoint) bool { return slices.Contains(tried, e.Addr) }); len(fresh) > 0 {
			candidates = fresh
		}
	}
	ctr, ok := p.rr.Load(dk)
	if !ok {
		ctr, _ = p.rr.LoadOrStore(dk, new(atomic.Uint64))
	}
	n := ctr.(*atomic.Uint64).Add(1) - 1
	return candidates[n%uint64(len(candidates))], true
}

func endpointKeys(eps []config.Endpoint) []string {
	out := make([]string, len(eps))
	for i, e := range eps {
		out[i] = e.Key()
	}
	return out
}

// forward sends out to dest with the retry policy and streams the answer.
func (p *Proxy) forward(w *respWriter, in, out *http.Request, st *reqState, dest backend, pol retry.Policy, rule *route.Rule, res *l7.ResiliencePolicy, respMods []*l7.HeaderModifier) {
	ctx := in.Context()
	var reqTimeout, tryTimeout time.Duration
	if rule != nil {
		reqTimeout = rule.Timeouts.GetRequest().AsDuration()
		tryTimeout = rule.Timeouts.GetBackendRequest().AsDuration()
	}
	if reqTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, reqTimeout)
		defer cancel()
	}
	if len(dest.endpoints) == 0 {
		st.flag(flagNoHealthy)
		p.localReply(w, st, http.StatusServiceUnavailable, "no healthy upstream")
		return
	}
	h2 := in.ProtoMajor == 2
	od := res.GetOutlierDetection()
	var rt http.RoundTripper
	if st.upgrade != "" {
		rt = &upgradeTransport{p: p, src: st.ci.src.Addr()}
	} else {
		rt = p.transport(st.ci.src.Addr(), h2, res.GetCircuitBreaker().GetMaxRequestsPerConnection())
	}
	dk := dest.destKey()
	var allKeys []string
	if od.GetConsecutive_5Xx() > 0 {
		allKeys = endpointKeys(dest.endpoints)
	}
	// The headers are the same on every try: set once on out (a clone of
	// the client's request already), and each try shares them.
	if out.Host == "" {
		out.Host = in.Host
	}
	out.Header.Set("Traceparent", st.span.Context.String())
	if out.Header.Get("X-Request-Id") == "" {
		out.Header.Set("X-Request-Id", st.traceID())
	}
	out.Header.Set("X-Forwarded-Proto", "http")
	var tried []netip.AddrPort
	for try := 0; ; try++ {
		ep, _ := p.pick(dest, dk, tried)
		tried = append(tried, ep.Addr)
		upstream := ep.Key()
		st.access.Upstream, st.access.UpstreamPrincipal, st.access.Attempts = upstream, ep.Identity.String(), try+1
		st.labels.DestWorkload, st.labels.DestNamespace, st.labels.DestCanonical = ep.Name, ep.Namespace, ep.Name
		if !ep.Identity.IsZero() {
			st.labels.DestPrincipal = st.access.UpstreamPrincipal
		}
		tctx, tcancel := ctx, context.CancelFunc(func() {})
		if tryTimeout > 0 {
			tctx, tcancel = context.WithTimeout(ctx, tryTimeout)
		}
		// A shallow copy per try: its own context, URL and body; the
		// transport does not change the request.
		req := out.WithContext(tctx)
		u := *out.URL
		u.Scheme, u.Host = "http", upstream
		req.URL = &u
		if try > 0 && out.GetBody != nil {
			b, _ := out.GetBody()
			req.Body = b
		}
		resp, err := rt.RoundTrip(req)
		if err != nil {
			tcancel()
			timedOut := errors.Is(tctx.Err(), context.DeadlineExceeded)
			if ctx.Err() != nil && !timedOut {
				return // the client went away
			}
			if ctx.Err() != nil { // request timeout: no more tries
				st.flag(flagTimeout)
				p.localReply(w, st, http.StatusGatewayTimeout, "upstream request timeout")
				return
			}
			p.outliers.Report(od, dk, ep.Key(), allKeys, true)
			canRetry := out.GetBody != nil || out.Body == nil || out.Body == http.NoBody
			if timedOut {
				if canRetry && pol.RetryStatus(try, http.StatusGatewayTimeout) {
					p.sleep(ctx, pol.Backoff(try+1))
					continue
				}
				st.flag(flagTimeout)
				p.localReply(w, st, http.StatusGatewayTimeout, "upstream request timeout")
				return
			}
			if canRetry && pol.RetryConnect(try) {
				p.log.Debug("retrying after connect failure", "upstream", ep.Addr, "error", err, "try", try)
				p.sleep(ctx, pol.Backoff(try+1))
				continue
			}
			p.log.Info("upstream request failed", "upstream", ep.Addr, "dst.service", dest.key, "error", err)
			st.flag(flagConnectFailure)
			p.localReply(w, st, http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers")
			return
		}
		p.outliers.Report(od, dk, ep.Key(), allKeys, resp.StatusCode >= 500)
		if pol.RetryStatus(try, resp.StatusCode) && (out.GetBody != nil || out.Body == nil || out.Body == http.NoBody) {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			tcancel()
			p.sleep(ctx, pol.Backoff(try+1))
			if ctx.Err() != nil {
				st.flag(flagTimeout)
				p.localReply(w, st, http.StatusGatewayTimeout, "upstream request timeout")
				return
			}
			continue
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			// The upgraded stream outlives the request's timeouts.
			tcancel()
			p.switchProtocols(w, resp, respMods, st)
			return
		}
		p.writeResponse(w, resp, respMods, st)
		resp.Body.Close()
		tcancel()
		return
	}
}

func (p *Proxy) sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// copyBufs are the response body copy buffers: one per request in flight
// instead of a fresh 32 KiB (and its clearing and GC) per request.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (p *Proxy) writeResponse(w *respWriter, resp *http.Response, mods []*l7.HeaderModifier, st *reqState) {
	h := w.Header()
	// The answer's header slices are handed over, not copied: nothing
	// reads resp.Header's values after this but Get, which an append
	// into spare capacity (Add below) does not change.
	for k, vs := range resp.Header {
		h[k] = vs
	}
	removeHopHeaders(h)
	for _, m := range mods {
		route.ApplyHeaders(h, m)
	}
	// Announce trailers so HTTP/1 chunked and HTTP/2 both carry them.
	for k := range resp.Trailer {
		h.Add("Trailer", k)
	}
	w.WriteHeader(resp.StatusCode)
	stream := resp.ContentLength < 0 || st.grpc || strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			if stream {
				w.Flush()
			}
		}
		if err != nil {
			if err != io.EOF {
				p.log.Debug("upstream body ended early", "upstream", st.access.Upstream, "error", err)
				// Abort the downstream stream so the client sees a broken
				// response instead of a truncated one that looks whole.
				panic(http.ErrAbortHandler)
			}
			break
		}
	}
	for k, vs := range resp.Trailer {
		h[http.TrailerPrefix+k] = vs
	}
	if st.grpc {
		if v := resp.Trailer.Get("Grpc-Status"); v != "" {
			st.labels.GRPCStatus = v
		} else if v := resp.Header.Get("Grpc-Status"); v != "" {
			st.labels.GRPCStatus = v
		}
	}
}

// mirror sends a copy of the request to m's backend and drops the answer.
// At most 64 mirrors are in flight; beyond that copies are skipped.
func (p *Proxy) mirror(snap *config.Snapshot, out *http.Request, body []byte, m *l7.RequestMirror, st *reqState) {
	if m.GetBackend().GetInvalid() != "" {
		return // nothing to mirror to
	}
	if pct := m.Percent; pct != nil && p.cfg.Rand()*100 >= *pct {
		return
	}
	dest := p.backendFor(snap, m.GetBackend(), st.ci.svcPort)
	ep, ok := p.pick(dest, dest.destKey(), nil)
	if !ok {
		return
	}
	select {
	case p.mirrors <- struct{}{}:
	default:
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(out.Context()), 10*time.Second)
	req := out.Clone(ctx)
	req.URL.Scheme, req.URL.Host = "http", ep.Addr.String()
	req.Host = shadowHost(out.Host)
	req.Body = io.NopCloser(strings.NewReader(string(body)))
	req.ContentLength = int64(len(body))
	rt := p.transport(st.ci.src.Addr(), out.ProtoMajor == 2, 0)
	if !p.track() {
		// The proxy is stopping: no new mirrors.
		cancel()
		<-p.mirrors
		return
	}
	go func() {
		defer p.wg.Done()
		defer func() { <-p.mirrors }()
		defer cancel()
		resp, err := rt.RoundTrip(req)
		if err != nil {
			p.log.Debug("mirror failed", "upstream", ep.Addr, "error", err)
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}()
}

// shadowHost marks mirrored requests as Envoy does ("<host>-shadow").
func shadowHost(host string) string {
	if h, port, ok := strings.Cut(host, ":"); ok && !strings.Contains(port, ":") {
		return h + "-shadow:" + port
	}
	return host + "-shadow"
}
