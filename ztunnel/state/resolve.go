package state

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/proto/workload"
)

// DefaultHBONEPort is a gateway's HBONE port when it names none.
const DefaultHBONEPort = 15008

// Errors Resolve returns; callers branch on them to refuse the connection.
var (
	ErrNoHealthyEndpoint = errors.New("service has no healthy endpoint for the port")
	ErrUnknownPort       = errors.New("service does not have the port")
	ErrNoWaypoint        = errors.New("waypoint cannot be resolved")
)

// Identity is the SPIFFE ID of w: empty trust domain means defaultTD,
// empty service account "default".
func Identity(w *workload.Workload, defaultTD string) (spiffeid.ID, error) {
	td := w.GetTrustDomain()
	if td == "" {
		td = defaultTD
	}
	sa := w.GetServiceAccount()
	if sa == "" {
		sa = "default"
	}
	t, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity of %s: %w", w.GetUid(), err)
	}
	id, err := spiffeid.FromSegments(t, "ns", w.GetNamespace(), "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity of %s: %w", w.GetUid(), err)
	}
	return id, nil
}

// Kind is how the proxy reaches an upstream.
type Kind uint8

const (
	// Passthrough: plain TCP to Addr (target outside the mesh or unknown).
	Passthrough Kind = iota
	// Direct: HBONE to Addr's IP on 15008 with target Addr, to Workload.
	Direct
	// ViaWaypoint: HBONE to Waypoint with the original destination as target.
	ViaWaypoint
)

func (k Kind) String() string {
	switch k {
	case Direct:
		return "direct"
	case ViaWaypoint:
		return "waypoint"
	default:
		return "passthrough"
	}
}

// Upstream is where a connection goes.
type Upstream struct {
	Kind Kind
	// Service is set when the destination was a Service VIP.
	Service *workload.Service
	// Workload is the chosen destination workload (nil when unknown, and
	// for ViaWaypoint).
	Workload *workload.Workload
	// Addr is the destination workload's IP and target port; the original
	// destination for ViaWaypoint (the tunnel's target) and for an unknown
	// destination or a PASSTHROUGH service.
	Addr netip.AddrPort
	// Waypoint is set for ViaWaypoint.
	Waypoint *Gateway
}

// Gateway is one resolved waypoint instance.
type Gateway struct {
	Workload *workload.Workload
	// HBONE is the instance's IP and HBONE port.
	HBONE netip.AddrPort
}

// Resolve decides where a connection from src (nil if the source is not a
// known workload) in network to the original destination dst goes.
func (s *Store) Resolve(src *workload.Workload, network string, dst netip.AddrPort) (Upstream, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	s.mu.RLock()
	defer s.mu.RUnlock()
	if e := s.serviceByVIPLocked(network, dst.Addr(), src.GetNamespace()); e != nil {
		svc := e.svc
		if wp := svc.GetWaypoint(); wp != nil {
			gw, self, err := s.gatewayLocked(wp, src, network, dst.Addr())
			if err != nil {
				return Upstream{}, fmt.Errorf("service %s: %w", e.key, err)
			}
			if !self {
				return Upstream{Kind: ViaWaypoint, Service: svc, Addr: dst, Waypoint: gw}, nil
			}
		}
		if svc.GetLoadBalancing().GetMode() == workload.LoadBalancing_PASSTHROUGH {
			return Upstream{Kind: Passthrough, Service: svc, Addr: dst}, nil
		}
		w, port, err := s.pickLocked(e, src, network, dst.Port(), false)
		if err != nil {
			return Upstream{}, fmt.Errorf("service %s port %d: %w", e.key, dst.Port(), err)
		}
		up := Upstream{Kind: Passthrough, Service: svc, Workload: w,
			Addr: netip.AddrPortFrom(pickIP(w, dst.Addr()), port)}
		if w.GetTunnelProtocol() == workload.TunnelProtocol_HBONE {
			up.Kind = Direct
		}
		return up, nil
	}
	w := s.byAddr[netKey{network, dst.Addr()}]
	if w == nil {
		return Upstream{Kind: Passthrough, Addr: dst}, nil
	}
	if wp := w.GetWaypoint(); wp != nil {
		gw, self, err := s.gatewayLocked(wp, src, network, dst.Addr())
		if err != nil {
			return Upstream{}, fmt.Errorf("workload %s: %w", w.GetUid(), err)
		}
		if !self {
			return Upstream{Kind: ViaWaypoint, Addr: dst, Waypoint: gw}, nil
		}
	}
	up := Upstream{Kind: Passthrough, Workload: w, Addr: dst}
	if w.GetTunnelProtocol() == workload.TunnelProtocol_HBONE {
		up.Kind = Direct
	}
	return up, nil
}

// Waypoint resolves a gateway address to one instance.
func (s *Store) Waypoint(g *workload.GatewayAddress, network string) (*Gateway, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	gw, _, err := s.gatewayLocked(g, nil, network, netip.Addr{})
	return gw, err
}

// IsWaypointOf reports whether a caller with identity id at ip is an
// instance of gateway g (the inbound waypoint rule).
func (s *Store) IsWaypointOf(g *workload.GatewayAddress, network string, id spiffeid.ID, ip netip.Addr, defaultTD string) bool {
	ip = ip.Unmap()
	s.mu.RLock()
	defer s.mu.RUnlock()
	match := func(w *workload.Workload) bool {
		if !hasIP(w, ip) {
			return false
		}
		wid, err := Identity(w, defaultTD)
		return err == nil && wid == id
	}
	for _, w := range s.gatewayWorkloadsLocked(g, network) {
		if match(w) {
			return true
		}
	}
	return false
}

// gatewayWorkloadsLocked lists the workloads behind g: the endpoints of
// its service, or the workload at its address.
func (s *Store) gatewayWorkloadsLocked(g *workload.GatewayAddress, network string) []*workload.Workload {
	switch d := g.GetDestination().(type) {
	case *workload.GatewayAddress_Hostname:
		return s.endpoints[d.Hostname.GetNamespace()+"/"+d.Hostname.GetHostname()]
	case *workload.GatewayAddress_Address:
		ip, err := checkIP(d.Address.GetAddress())
		if err != nil {
			return nil
		}
		k := netKey{d.Address.GetNetwork(), ip}
		if list := s.byVIP[k]; len(list) > 0 {
			return s.endpoints[list[0].key]
		}
		if w := s.byAddr[k]; w != nil {
			return []*workload.Workload{w}
		}
	}
	return nil
}

// gatewayLocked picks an instance of g. self reports that src is itself an
// instance of g (a waypoint does not send to itself).
func (s *Store) gatewayLocked(g *workload.GatewayAddress, src *workload.Workload, network string, family netip.Addr) (*Gateway, bool, error) {
	port := uint16(g.GetHboneMtlsPort())
	if port == 0 {
		port = DefaultHBONEPort
	}
	if src != nil {
		for _, w := range s.gatewayWorkloadsLocked(g, network) {
			if w.GetUid() == src.GetUid() {
				return nil, true, nil
			}
		}
	}
	var e *serviceEntry
	switch d := g.GetDestination().(type) {
	case *workload.GatewayAddress_Hostname:
		e = s.services[d.Hostname.GetNamespace()+"/"+d.Hostname.GetHostname()]
	case *workload.GatewayAddress_Address:
		ip, err := checkIP(d.Address.GetAddress())
		if err != nil {
			return nil, false, fmt.Errorf("%w: %v", ErrNoWaypoint, err)
		}
		k := netKey{d.Address.GetNetwork(), ip}
		if list := s.byVIP[k]; len(list) > 0 {
			e = list[0]
		} else if w := s.byAddr[k]; w != nil {
			return &Gateway{Workload: w, HBONE: netip.AddrPortFrom(ip, port)}, false, nil
		}
	}
	if e == nil {
		return nil, false, fmt.Errorf("%w: %s", ErrNoWaypoint, gatewayString(g))
	}
	w, _, err := s.pickLocked(e, src, network, port, true)
	if err != nil {
		return nil, false, fmt.Errorf("%w: %s: %v", ErrNoWaypoint, gatewayString(g), err)
	}
	if !family.IsValid() {
		family = netip.IPv4Unspecified()
	}
	return &Gateway{Workload: w, HBONE: netip.AddrPortFrom(pickIP(w, family), port)}, false, nil
}

func gatewayString(g *workload.GatewayAddress) string {
	switch d := g.GetDestination().(type) {
	case *workload.GatewayAddress_Hostname:
		return d.Hostname.GetNamespace() + "/" + d.Hostname.GetHostname()
	case *workload.GatewayAddress_Address:
		ip, _ := checkIP(d.Address.GetAddress())
		return d.Address.GetNetwork() + "/" + ip.String()
	}
	return "<empty gateway>"
}

func hasIP(w *workload.Workload, ip netip.Addr) bool {
	for _, a := range w.GetAddresses() {
		if x, err := checkIP(a); err == nil && x == ip {
			return true
		}
	}
	return false
}

// pickIP returns w's address of the same family as like, else its first.
func pickIP(w *workload.Workload, like netip.Addr) netip.Addr {
	var first netip.Addr
	for _, a := range w.GetAddresses() {
		ip, err := checkIP(a)
		if err != nil {
			continue
		}
		if ip.Is4() == like.Is4() {
			return ip
		}
		if !first.IsValid() {
			first = ip
		}
	}
	return first
}

// targetPort is the port on w for service port p of svc, ok=false when w
// cannot serve it. The endpoint's own mapping wins, then the service's
// target port; a named port (target 0) needs the endpoint's mapping.
func targetPort(svcKey string, svcTarget uint32, w *workload.Workload, p uint16) (uint16, bool) {
	if pl := w.GetServices()[svcKey]; pl != nil {
		for _, wp := range pl.GetPorts() {
			if wp.GetServicePort() == uint32(p) {
				if t := wp.GetTargetPort(); t != 0 && t <= 65535 {
					return uint16(t), true
				}
				if svcTarget != 0 {
					return uint16(svcTarget), true
				}
				return p, true
			}
		}
	}
	if svcTarget != 0 {
		return uint16(svcTarget), true
	}
	return 0, false
}

// rank scores w for src by the service's routing preferences, as Istio's
// ztunnel does: count the leading scopes that match; a leading NETWORK scope
// that matches lifts the rank above every non-matching network.
func rank(lb *workload.LoadBalancing, src, w *workload.Workload) (int, bool) {
	prefs := lb.GetRoutingPreference()
	networkFirst := len(prefs) > 0 && prefs[0] == workload.LoadBalancing_NETWORK
	r, adjust := 0, 0
	for _, scope := range prefs {
		var m bool
		switch scope {
		case workload.LoadBalancing_REGION:
			m = src.GetLocality().GetRegion() == w.GetLocality().GetRegion()
		case workload.LoadBalancing_ZONE:
			m = src.GetLocality().GetZone() == w.GetLocality().GetZone()
		case workload.LoadBalancing_SUBZONE:
			m = src.GetLocality().GetSubzone() == w.GetLocality().GetSubzone()
		case workload.LoadBalancing_NODE:
			m = src.GetNode() == w.GetNode()
		case workload.LoadBalancing_CLUSTER:
			m = src.GetClusterId() == w.GetClusterId()
		case workload.LoadBalancing_NETWORK:
			m = src.GetNetwork() == w.GetNetwork()
			if networkFirst {
				if !m {
					continue
				}
				adjust = len(prefs) - 1
			}
		default:
			m = true
		}
		if !m {
			break
		}
		r++
	}
	if lb.GetMode() == workload.LoadBalancing_STRICT && r != len(prefs) {
		return 0, false
	}
	return r + adjust, true
}

// pickLocked chooses an endpoint of e for service port p: healthy (unless
// the service allows all), reachable in network, serving the port, of the
// best locality rank; round robin among equals. waypoint mode does not
// require the service to list the port (a waypoint is reached on its HBONE
// port).
func (s *Store) pickLocked(e *serviceEntry, src *workload.Workload, network string, p uint16, waypoint bool) (*workload.Workload, uint16, error) {
	svc := e.svc
	var svcTarget uint32
	found := false
	for _, sp := range svc.GetPorts() {
		if sp.GetServicePort() == uint32(p) {
			svcTarget, found = sp.GetTargetPort(), true
			break
		}
	}
	if !found && !waypoint {
		return nil, 0, ErrUnknownPort
	}
	lb := svc.GetLoadBalancing()
	locality := lb != nil && lb.GetMode() != workload.LoadBalancing_UNSPECIFIED_MODE && src != nil
	allowAll := lb.GetHealthPolicy() == workload.LoadBalancing_ALLOW_ALL
	eligible := func(w *workload.Workload) (uint16, int, bool) {
		if w.GetStatus() != workload.WorkloadStatus_HEALTHY && !allowAll {
			return 0, 0, false
		}
		// Cross-network endpoints need a network gateway, which meshlite
		// does not implement; an endpoint without an address cannot be dialled.
		if w.GetNetwork() != network || len(w.GetAddresses()) == 0 {
			return 0, 0, false
		}
		port := p
		if !waypoint {
			var ok bool
			if port, ok = targetPort(e.key, svcTarget, w, p); !ok {
				return 0, 0, false
			}
		}
		r := 0
		if locality {
			var ok bool
			if r, ok = rank(lb, src, w); !ok {
				return 0, 0, false
			}
		}
		return port, r, true
	}
	eps := s.endpoints[e.key]
	best, count := -1, 0
	for _, w := range eps {
		if _, r, ok := eligible(w); ok {
			switch {
			case r > best:
				best, count = r, 1
			case r == best:
				count++
			}
		}
	}
	if count == 0 {
		return nil, 0, ErrNoHealthyEndpoint
	}
	n := int(e.rr.Add(1)-1) % count
	for _, w := range eps {
		if port, r, ok := eligible(w); ok && r == best {
			if n == 0 {
				return w, port, nil
			}
			n--
		}
	}
	return nil, 0, ErrNoHealthyEndpoint // unreachable: count > 0
}
