package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// ServeOutbound serves a pod's outbound capture listener (15001) until ctx
// ends: each connection goes where its original destination resolves to.
func (p *Proxy) ServeOutbound(ctx context.Context, ln net.Listener, uid string) error {
	t := tracker{drain: p.cfg.DrainTimeout}
	log := p.log.With("pod", uid, "direction", "outbound")
	return t.serve(ctx, ln, log, func(ctx context.Context, c net.Conn) { p.outbound(ctx, c, uid, log) })
}

func (p *Proxy) outbound(ctx context.Context, c net.Conn, uid string, log *slog.Logger) {
	start := time.Now()
	src, err := identity.AddrPort(c.RemoteAddr())
	if err != nil {
		log.Warn("outbound: bad source address", "error", err)
		reset(c)
		return
	}
	dst, err := p.cfg.OriginalDst(c)
	if err != nil {
		log.Warn("outbound: no original destination; refusing", "src", src, "error", err)
		p.metrics.refuse(Outbound, refusedBad)
		reset(c)
		return
	}
	if local, _ := identity.AddrPort(c.LocalAddr()); local == dst {
		// Sent to the capture port itself, not redirected: would loop.
		log.Info("outbound: connection addressed to the capture port; refusing", "src", src)
		p.metrics.refuse(Outbound, refusedBad)
		reset(c)
		return
	}
	pod := p.pod(uid)
	if pod == nil {
		log.Warn("outbound: pod not served; refusing", "src", src, "dst", dst)
		p.metrics.refuse(Outbound, refusedNoPod)
		reset(c)
		return
	}
	p.learnSrcIP(src.Addr(), pod)
	srcWl := p.cfg.State.Workload(uid)
	up, err := p.cfg.State.Resolve(srcWl, p.cfg.Network, dst)
	if err == nil && up.Kind == state.Passthrough && up.Workload == nil && up.Service == nil && p.cfg.Lookup != nil {
		// Unknown destination: it may be a pod or Service istiod-lite has
		// not pushed yet. Ask, briefly, before deciding on passthrough.
		lctx, cancel := context.WithTimeout(ctx, p.cfg.LookupTimeout)
		p.cfg.Lookup(lctx, dst.Addr())
		cancel()
		up, err = p.cfg.State.Resolve(srcWl, p.cfg.Network, dst)
	}
	if err != nil {
		log.Info("outbound: no route; refusing", "src", src, "dst", dst, "error", err)
		p.metrics.refuse(Outbound, refusedNoRoute)
		reset(c)
		return
	}
	dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	upstream, peer, tr, err := p.connectUpstream(dctx, pod, src, up)
	cancel()
	if err != nil {
		lvl, reason := slog.LevelWarn, refusedUpstream
		if errors.Is(err, hbone.ErrDenied) {
			lvl, reason = slog.LevelInfo, refusedPolicy
		}
		p.metrics.refuse(Outbound, reason)
		log.Log(ctx, lvl, "outbound: upstream refused", "src", src, "dst", dst, "route", up.Kind.String(), "error", err)
		reset(c)
		return
	}
	srcID, _ := state.Identity(srcWl, p.cfg.TrustDomain)
	t := p.track(connLabels{dir: Outbound, pod: uid, src: src, dst: dst, srcWl: srcWl, dstWl: up.Workload,
		srcID: srcID, dstID: peer, svc: up.Service, mtls: up.Kind != state.Passthrough, transport: tr, route: up.Kind.String()})
	received, sent, rerr := hbone.Relay(&countedConn{Conn: c, t: t, clientSide: true}, upstream)
	t.finish()
	attrs := []slog.Attr{
		slog.String("src", src.String()), slog.String("dst", dst.String()),
		slog.String("route", up.Kind.String()), slog.String("transport", tr),
		slog.Int64("bytes_sent", sent), slog.Int64("bytes_received", received), // to, from the app
		slog.Duration("duration", time.Since(start)),
	}
	if !peer.IsZero() {
		attrs = append(attrs, slog.String("dst.identity", peer.String()))
	}
	if up.Workload != nil {
		attrs = append(attrs, slog.String("dst.workload", up.Workload.GetNamespace()+"/"+up.Workload.GetName()))
	}
	if rerr != nil {
		attrs = append(attrs, slog.String("error", rerr.Error()))
	}
	log.LogAttrs(ctx, slog.LevelInfo, "connection complete", attrs...)
}

// connectUpstream opens the upstream side for up: a tunnel or a plain TCP
// connection from the pod. Tunnels name the app's own address and port in
// Forwarded, since many tunnels share one pooled connection's source port.
func (p *Proxy) connectUpstream(ctx context.Context, pod *Pod, src netip.AddrPort, up state.Upstream) (net.Conn, spiffeid.ID, string, error) {
	if up.Kind == state.Direct || up.Kind == state.ViaWaypoint {
		if _, err := p.podSVID(ctx, pod); err != nil {
			return nil, spiffeid.ID{}, "", fmt.Errorf("source certificate: %w", err)
		}
	}
	switch up.Kind {
	case state.Direct:
		peer, err := state.Identity(up.Workload, p.cfg.TrustDomain)
		if err != nil {
			return nil, spiffeid.ID{}, "", err
		}
		ep := netip.AddrPortFrom(up.Addr.Addr(), p.cfg.HBONEPort)
		c, tr, err := p.tunnel(ctx, hbone.DialRequest{Endpoint: ep, Target: up.Addr, Source: pod.SVID,
			SourceAddr: src.Addr(), Forwarded: src, PeerIDs: []spiffeid.ID{peer}})
		return c, peer, tr, err
	case state.ViaWaypoint:
		peer, err := state.Identity(up.Waypoint.Workload, p.cfg.TrustDomain)
		if err != nil {
			return nil, spiffeid.ID{}, "", err
		}
		c, tr, err := p.tunnel(ctx, hbone.DialRequest{Endpoint: up.Waypoint.HBONE, Target: up.Addr, Source: pod.SVID,
			SourceAddr: src.Addr(), Forwarded: src, PeerIDs: []spiffeid.ID{peer}})
		return c, peer, tr, err
	default:
		c, err := pod.Net.DialTCP(ctx, netip.Addr{}, up.Addr, false)
		if err != nil {
			return nil, spiffeid.ID{}, "", err
		}
		return c, spiffeid.ID{}, "tcp", nil
	}
}

// tunnel dials with the configured transport; auto tries QUIC first unless
// the endpoint recently failed it, and falls back to HTTP/2.
func (p *Proxy) tunnel(ctx context.Context, req hbone.DialRequest) (net.Conn, string, error) {
	switch p.cfg.Tunnel {
	case TunnelQUIC:
		req.Transport = hbone.H3
	case TunnelAuto:
		if !p.preferH2(req.Endpoint) {
			qctx, cancel := context.WithTimeout(ctx, p.cfg.QUICAttemptTimeout)
			req.Transport = hbone.H3
			c, err := p.client.Dial(qctx, req)
			cancel()
			if err == nil {
				return c, hbone.H3.String(), nil
			}
			var se *hbone.StatusError
			if errors.As(err, &se) || ctx.Err() != nil {
				// The peer answered over QUIC (e.g. 401): not a transport failure.
				return nil, hbone.H3.String(), err
			}
			p.rememberH2(req.Endpoint)
			p.log.Info("QUIC to endpoint failed; using HTTP/2", "endpoint", req.Endpoint, "error", err,
				"for", p.cfg.FallbackTTL)
		}
		req.Transport = hbone.H2
	default:
		req.Transport = hbone.H2
	}
	c, err := p.client.Dial(ctx, req)
	if err != nil {
		return nil, req.Transport.String(), fmt.Errorf("hbone %s to %s for %s: %w", req.Transport, req.Endpoint, req.Target, err)
	}
	return c, req.Transport.String(), nil
}

func (p *Proxy) preferH2(ep netip.AddrPort) bool {
	p.fbMu.Lock()
	defer p.fbMu.Unlock()
	until, ok := p.fallback[ep]
	if ok && time.Now().After(until) {
		delete(p.fallback, ep)
		return false
	}
	return ok
}

func (p *Proxy) rememberH2(ep netip.AddrPort) {
	p.fbMu.Lock()
	defer p.fbMu.Unlock()
	// Bounded: forget the expired ones when the map grows.
	if len(p.fallback) > 4096 {
		now := time.Now()
		for k, v := range p.fallback {
			if now.After(v) {
				delete(p.fallback, k)
			}
		}
	}
	p.fallback[ep] = time.Now().Add(p.cfg.FallbackTTL)
}

// Fallback is an endpoint auto mode tunnels to over HTTP/2 after QUIC to
// it failed, until Until.
type Fallback struct {
	Endpoint string    `json:"endpoint"`
	Until    time.Time `json:"until"`
}

// Fallbacks lists the endpoints currently on HTTP/2 in auto mode.
func (p *Proxy) Fallbacks() []Fallback {
	p.fbMu.Lock()
	defer p.fbMu.Unlock()
	now := time.Now()
	out := []Fallback{}
	for ep, until := range p.fallback {
		if now.Before(until) {
			out = append(out, Fallback{Endpoint: ep.String(), Until: until})
		}
	}
	slices.SortFunc(out, func(a, b Fallback) int { return strings.Compare(a.Endpoint, b.Endpoint) })
	return out
}
