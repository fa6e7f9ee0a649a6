package proxy

import (
	"context"
	"net"
	"net/netip"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/waypoint/authz"
	"github.com/meshlite/meshlite/waypoint/config"
	"github.com/meshlite/meshlite/waypoint/telemetry"
)

// serveTCP relays an opaque stream to an endpoint of the Service after the
// L4 part of its authorization policies.
func (p *Proxy) serveTCP(ctx context.Context, c *tunnelConn, ci *connInfo, svc *config.Service) {
	defer c.Close()
	snap := p.cfg.Store.Snapshot()
	labels := telemetry.Labels{SourcePrincipal: "spiffe://" + ci.peer, SourceNamespace: ci.peerNS, SecurityPolicy: "mutual_tls"}
	if w := snap.WorkloadByIP(ci.src.Addr()); w != nil {
		labels.SourceWorkload, labels.SourceNamespace = w.GetWorkloadName(), w.GetNamespace()
	}
	var dest backend
	if svc != nil {
		cfg := svc.Config
		labels.DestService, labels.DestServiceName, labels.DestServiceNamespace = cfg.GetHostname(), cfg.GetName(), cfg.GetNamespace()
		d := svc.Authz.Evaluate(&authz.Attributes{Principal: ci.peer, Namespace: ci.peerNS, SourceIP: ci.src.Addr(), DestPort: ci.svcPort})
		if !d.Allowed {
			p.log.Info("connection denied", "src.identity", ci.peer, "src.addr", ci.src.String(), "dst.service", svc.Key,
				"policy", d.Policy, "rule", d.Rule, "reason", d.Reason, "protocol", "tcp")
			_ = c.Conn.Reset()
			return
		}
		dest = backend{key: svc.Key, port: ci.svcPort, endpoints: snap.Endpoints(svc.Key, ci.svcPort)}
	}
	if ci.direct != nil {
		if ep, ok := snap.EndpointOf(ci.direct, ci.target.Port()); ok {
			dest = backend{key: "pod/" + ep.Addr.String(), endpoints: []config.Endpoint{ep}}
		}
	}
	var up net.Conn
	var tried []netip.AddrPort
	dk := dest.destKey()
	for i := 0; i < 3 && i < len(dest.endpoints); i++ {
		ep, ok := p.pick(dest, dk, tried)
		if !ok {
			break
		}
		tried = append(tried, ep.Addr)
		var err error
		up, err = p.dialTo(ctx, ci.src.Addr(), ep)
		if err == nil {
			labels.DestWorkload, labels.DestNamespace, labels.DestPrincipal = ep.Name, ep.Namespace, ep.Identity.String()
			break
		}
		p.log.Info("tcp upstream connect failed", "upstream", ep.Addr, "error", err)
		up = nil
	}
	if up == nil {
		labels.ResponseFlags = "UF"
		p.cfg.Metrics.TCPOpened(&labels)
		p.cfg.Metrics.TCPClosed(&labels, 0, 0)
		_ = c.Conn.Reset()
		return
	}
	p.cfg.Metrics.TCPOpened(&labels)
	in, outN, err := hbone.Relay(c, up)
	p.cfg.Metrics.TCPClosed(&labels, in, outN)
	p.log.Debug("tcp relay done", "src.identity", ci.peer, "upstream", up.RemoteAddr(), "sent", in, "received", outN, "error", err)
}
