package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/policy"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// Reasons for inbound refusals that are not policy decisions.
const (
	reasonWaypointBypass = "destination requires its waypoint"
	reasonTargetMismatch = "target is not the destination pod"
)

// inbound is the HBONE handler: the CONNECT target must be the local pod
// the connection arrived at; a destination bound to a waypoint accepts only
// that waypoint; then L4 policy; then the app, with the caller's IP kept.
func (p *Proxy) inbound(ctx context.Context, r *hbone.Request) (net.Conn, error) {
	pod, dstWl := p.podByIP(r.LocalAddr.Addr())
	if pod == nil {
		return nil, fmt.Errorf("%w: no local pod at %s", hbone.ErrUpstream, r.LocalAddr.Addr())
	}
	if r.Target.Addr().Unmap() != r.LocalAddr.Addr().Unmap() {
		p.log.Info("inbound refused", "reason", reasonTargetMismatch, "src.identity", r.PeerID.String(),
			"dst", r.Target, "pod", pod.UID)
		return nil, fmt.Errorf("%w: target %s is not this pod", hbone.ErrBadRequest, r.Target)
	}
	srcIP := r.RemoteAddr.Addr().Unmap()
	src := netip.AddrPortFrom(srcIP, r.RemoteAddr.Port())
	fromWaypoint := false
	if wp := dstWl.GetWaypoint(); wp != nil {
		fromWaypoint = p.cfg.State.IsWaypointOf(wp, p.cfg.Network, r.PeerID, srcIP, p.cfg.TrustDomain)
		if !fromWaypoint {
			c := policy.NewConn(srcIP, r.Target, r.PeerID)
			policy.Log(p.log, &c, workloadName(dstWl), policy.Decision{Rule: -1, Reason: reasonWaypointBypass})
			return nil, fmt.Errorf("%w: %s", hbone.ErrDenied, reasonWaypointBypass)
		}
		// Only a waypoint may say who the original client was.
		if r.Forwarded.IsValid() {
			srcIP = r.Forwarded.Addr().Unmap()
			src = netip.AddrPortFrom(srcIP, r.Forwarded.Port())
		}
	} else if fwd := r.Forwarded; fwd.IsValid() && fwd.Port() != 0 && fwd.Addr().Unmap() == srcIP {
		// A peer's ztunnel names its app's port (the tunnel's own source
		// port is the pooled connection's); the IP must be the peer's own.
		src = netip.AddrPortFrom(srcIP, fwd.Port())
	}
	if err := p.authorize(srcIP, r.Target, r.PeerID, dstWl); err != nil {
		return nil, err
	}
	up, err := p.dialApp(ctx, pod, srcIP, r.Target)
	if err != nil {
		return nil, errors.Join(hbone.ErrUpstream, err)
	}
	dstID, _ := state.Identity(dstWl, p.cfg.TrustDomain)
	t := p.track(connLabels{dir: Inbound, pod: pod.UID, src: src, dst: r.Target,
		srcWl: p.cfg.State.WorkloadByIP(p.cfg.Network, srcIP), dstWl: dstWl, srcID: r.PeerID, dstID: dstID,
		mtls: true, transport: r.Transport.String()})
	// The HBONE server relays and closes it; closing finishes the record.
	return &countedConn{Conn: up, t: t}, nil
}

// countRefusals counts the inbound handler's refusals by kind.
func (p *Proxy) countRefusals(h hbone.Handler) hbone.Handler {
	return func(ctx context.Context, r *hbone.Request) (net.Conn, error) {
		c, err := h(ctx, r)
		if err != nil {
			reason := refusedUpstream
			switch {
			case errors.Is(err, hbone.ErrDenied):
				reason = refusedPolicy
			case errors.Is(err, hbone.ErrBadRequest):
				reason = refusedBad
			}
			p.metrics.refuse(Inbound, reason)
		}
		return c, err
	}
}

// authorize evaluates L4 policy for a connection to dstWl and logs the
// decision; a denial returns an error wrapping hbone.ErrDenied.
func (p *Proxy) authorize(src netip.Addr, dst netip.AddrPort, peer spiffeid.ID, dstWl *workload.Workload) error {
	c := policy.NewConn(src, dst, peer)
	var buf [8]*policy.Policy
	pols, missing := p.cfg.State.Policies(buf[:0], dstWl)
	d := policy.Evaluate(p.log, &c, pols, missing)
	policy.Log(p.log, &c, workloadName(dstWl), d)
	if !d.Allow {
		return fmt.Errorf("%w: policy %q rule %d: %s", hbone.ErrDenied, d.Policy, d.Rule, d.Reason)
	}
	return nil
}

// dialApp connects to the app inside the pod. When the caller is a mesh
// workload of this network, the connection keeps its IP (IP_TRANSPARENT;
// the in-pod rules route the replies back to this socket).
func (p *Proxy) dialApp(ctx context.Context, pod *Pod, src netip.Addr, target netip.AddrPort) (net.Conn, error) {
	transparent := src.IsValid() && p.cfg.State.WorkloadByIP(p.cfg.Network, src) != nil
	var bind netip.Addr
	if transparent {
		bind = src
	}
	dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	c, err := pod.Net.DialTCP(dctx, bind, target, transparent)
	if err != nil {
		return nil, err
	}
	return c, nil
}

func workloadName(w *workload.Workload) string {
	if w == nil {
		return ""
	}
	return w.GetNamespace() + "/" + w.GetName()
}

// ServePlaintext serves a pod's inbound plaintext capture listener (15006)
// until ctx ends. A connection has no identity, so it passes only where
// policy allows it (PERMISSIVE: istiod-lite sends a DENY for peers without
// identity when STRICT) and never to a destination bound to a waypoint.
func (p *Proxy) ServePlaintext(ctx context.Context, ln net.Listener, uid string) error {
	t := tracker{drain: p.cfg.DrainTimeout}
	log := p.log.With("pod", uid, "direction", "inbound-plaintext")
	return t.serve(ctx, ln, log, func(ctx context.Context, c net.Conn) { p.plaintext(ctx, c, uid, log) })
}

func (p *Proxy) plaintext(ctx context.Context, c net.Conn, uid string, log *slog.Logger) {
	src, err := identity.AddrPort(c.RemoteAddr())
	if err != nil {
		reset(c)
		return
	}
	dst, err := p.cfg.OriginalDst(c)
	if err != nil {
		log.Warn("inbound plaintext: no original destination; refusing", "src", src, "error", err)
		reset(c)
		return
	}
	refuse := func(reason string) {
		p.metrics.refuse(InboundPlaintext, reason)
		reset(c)
	}
	pod := p.pod(uid)
	dstWl := p.cfg.State.Workload(uid)
	if pod == nil || dstWl == nil {
		log.Warn("inbound plaintext: pod unknown; refusing", "src", src, "dst", dst)
		refuse(refusedNoPod)
		return
	}
	if w := p.cfg.State.WorkloadByIP(p.cfg.Network, dst.Addr()); w == nil || w.GetUid() != uid {
		log.Info("inbound plaintext refused", "reason", reasonTargetMismatch, "src", src, "dst", dst)
		refuse(refusedBad)
		return
	}
	if dst.Port() == p.cfg.HBONEPort {
		// HBONE port reached without TLS on it: nothing to forward to.
		refuse(refusedBad)
		return
	}
	if dstWl.GetWaypoint() != nil {
		pc := policy.NewConn(src.Addr(), dst, spiffeid.ID{})
		policy.Log(log, &pc, workloadName(dstWl), policy.Decision{Rule: -1, Reason: reasonWaypointBypass})
		refuse(refusedPolicy)
		return
	}
	if err := p.authorize(src.Addr(), dst, spiffeid.ID{}, dstWl); err != nil {
		refuse(refusedPolicy)
		return
	}
	up, err := p.dialApp(ctx, pod, src.Addr(), dst)
	if err != nil {
		log.Info("inbound plaintext: app refused", "src", src, "dst", dst, "error", err)
		refuse(refusedUpstream)
		return
	}
	dstID, _ := state.Identity(dstWl, p.cfg.TrustDomain)
	t := p.track(connLabels{dir: InboundPlaintext, pod: uid, src: src, dst: dst,
		srcWl: p.cfg.State.WorkloadByIP(p.cfg.Network, src.Addr()), dstWl: dstWl, dstID: dstID, transport: "tcp"})
	_, _, rerr := hbone.Relay(c, &countedConn{Conn: up, t: t})
	if rerr != nil {
		log.Debug("plaintext connection aborted", "src", src, "dst", dst, "error", rerr)
	}
}
