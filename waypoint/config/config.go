// Package config owns the waypoint's view of the mesh: the ServiceConfigs
// istiod-lite pushes for the Services bound to this waypoint and the
// Workload API addresses (Services and Workloads) used to resolve targets
// and backendRefs to endpoints. It applies Delta ADS responses
// (xds.Handler), compiles routes and policies once per push, and publishes
// immutable snapshots that requests read without locks. It sends nothing.
package config

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/waypoint/authz"
	"github.com/meshlite/meshlite/waypoint/route"
)

// Service is one bound Service with its compiled configuration.
type Service struct {
	// Key is "<namespace>/<hostname>".
	Key    string
	Config *l7.ServiceConfig
	Routes *route.Table
	Authz  *authz.Engine
}

// Port returns the ServicePort p, or nil.
func (s *Service) Port(p uint32) *l7.ServicePort {
	for _, sp := range s.Config.GetPorts() {
		if sp.GetPort() == p {
			return sp
		}
	}
	return nil
}

// Endpoint is one backend instance of a Service port.
type Endpoint struct {
	UID       string
	Name      string // workload name (Deployment etc.), else the pod name
	Pod       string
	Namespace string
	Addr      netip.AddrPort // pod IP and target port
	HBONE     bool
	Identity  spiffeid.ID

	// Addr as text, made once with the endpoint: every request names
	// its upstream.
	key string
}

// Key names the endpoint for outlier detection and logs ("ip:port").
func (e Endpoint) Key() string {
	if e.key != "" {
		return e.key
	}
	return e.Addr.String()
}

// Snapshot is an immutable view; safe to share.
type Snapshot struct {
	services    map[string]*Service
	byVIP       map[netip.Addr]*Service
	addrSvcs    map[string]*workload.Service
	addrByVIP   map[netip.Addr]*workload.Service
	workloads   map[string]*workload.Workload
	byIP        map[netip.Addr]*workload.Workload
	endpoints   map[string][]*workload.Workload
	trustDomain string
	// epCache memoizes Endpoints (the snapshot never changes): every
	// request asks, and building one Endpoint parses its SPIFFE ID.
	epCache sync.Map // epKey -> []Endpoint
}

type epKey struct {
	svc  string
	port uint32
}

// Store applies pushes and publishes snapshots.
type Store struct {
	log         *slog.Logger
	trustDomain string

	mu      sync.Mutex
	configs map[string]*l7.ServiceConfig
	addrs   map[string]*workload.Address
	cur     atomic.Pointer[Snapshot]
}

// NewStore returns an empty store; trustDomain is the default for
// workloads that name none.
func NewStore(trustDomain string, log *slog.Logger) *Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Store{log: log, trustDomain: trustDomain, configs: map[string]*l7.ServiceConfig{}, addrs: map[string]*workload.Address{}}
	s.cur.Store(s.build())
	return s
}

// Snapshot returns the current view.
func (s *Store) Snapshot() *Snapshot { return s.cur.Load() }

// Apply implements xds.Handler. A response with a resource that does not
// decode is rejected whole (NACK) and changes nothing.
func (s *Store) Apply(typeURL string, resources []*discovery.Resource, removed []string) error {
	switch typeURL {
	case l7.TypeURL:
		decoded := make(map[string]*l7.ServiceConfig, len(resources))
		for _, r := range resources {
			sc := &l7.ServiceConfig{}
			if err := r.GetResource().UnmarshalTo(sc); err != nil {
				return fmt.Errorf("decode ServiceConfig %q: %w", r.GetName(), err)
			}
			decoded[r.GetName()] = sc
		}
		s.mu.Lock()
		for _, n := range removed {
			delete(s.configs, n)
		}
		for n, sc := range decoded {
			s.configs[n] = sc
		}
	case xds.TypeAddress:
		decoded := make(map[string]*workload.Address, len(resources))
		for _, r := range resources {
			a := &workload.Address{}
			if err := r.GetResource().UnmarshalTo(a); err != nil {
				return fmt.Errorf("decode Address %q: %w", r.GetName(), err)
			}
			decoded[r.GetName()] = a
		}
		s.mu.Lock()
		for _, n := range removed {
			delete(s.addrs, n)
		}
		for n, a := range decoded {
			s.addrs[n] = a
		}
	default:
		return fmt.Errorf("unexpected type %s", typeURL)
	}
	snap := s.build()
	s.cur.Store(snap)
	s.mu.Unlock()
	return nil
}

// SetServiceConfigs and SetAddresses replace everything of one kind; for
// tests and tools that feed the store without xDS.
func (s *Store) SetServiceConfigs(cfgs ...*l7.ServiceConfig) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.configs = map[string]*l7.ServiceConfig{}
	for _, c := range cfgs {
		s.configs[l7.ResourceName(c.GetNamespace(), c.GetHostname())] = proto.Clone(c).(*l7.ServiceConfig)
	}
	s.cur.Store(s.build())
}

// SetAddresses: see SetServiceConfigs. Keys follow the Workload API.
func (s *Store) SetAddresses(addrs ...*workload.Address) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addrs = map[string]*workload.Address{}
	for _, a := range addrs {
		var k string
		if w := a.GetWorkload(); w != nil {
			k = w.GetUid()
		} else {
			k = a.GetService().GetNamespace() + "/" + a.GetService().GetHostname()
		}
		s.addrs[k] = proto.Clone(a).(*workload.Address)
	}
	s.cur.Store(s.build())
}

func ipOf(b []byte) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(b)
	return a.Unmap(), ok
}

// build derives the indices; called with mu held. O(size) per push, which
// is fine for what one waypoint sees.
func (s *Store) build() *Snapshot {
	snap := &Snapshot{
		services: map[string]*Service{}, byVIP: map[netip.Addr]*Service{},
		addrSvcs: map[string]*workload.Service{}, addrByVIP: map[netip.Addr]*workload.Service{},
		workloads: map[string]*workload.Workload{}, byIP: map[netip.Addr]*workload.Workload{},
		endpoints: map[string][]*workload.Workload{}, trustDomain: s.trustDomain,
	}
	for _, a := range s.addrs {
		if svc := a.GetService(); svc != nil {
			k := svc.GetNamespace() + "/" + svc.GetHostname()
			snap.addrSvcs[k] = svc
			for _, na := range svc.GetAddresses() {
				if ip, ok := ipOf(na.GetAddress()); ok {
					snap.addrByVIP[ip] = svc
				}
			}
		}
		if w := a.GetWorkload(); w != nil {
			snap.workloads[w.GetUid()] = w
			for _, b := range w.GetAddresses() {
				if ip, ok := ipOf(b); ok {
					snap.byIP[ip] = w
				}
			}
			for k := range w.GetServices() {
				snap.endpoints[k] = append(snap.endpoints[k], w)
			}
		}
	}
	for k := range snap.endpoints {
		slices.SortFunc(snap.endpoints[k], func(a, b *workload.Workload) int { return strings.Compare(a.GetUid(), b.GetUid()) })
	}
	for name, sc := range s.configs {
		svc := &Service{Key: name, Config: sc}
		var errs []error
		svc.Routes, errs = route.Compile(sc)
		for _, err := range errs {
			s.log.Warn("route match left out", "service", name, "error", err)
		}
		svc.Authz, errs = authz.Compile(sc.GetAuthorizationPolicies())
		for _, err := range errs {
			s.log.Warn("authorization policy problem", "service", name, "error", err)
		}
		snap.services[name] = svc
		vips := sc.GetAddresses()
		if len(vips) == 0 {
			if as := snap.addrSvcs[name]; as != nil {
				for _, na := range as.GetAddresses() {
					if ip, ok := ipOf(na.GetAddress()); ok {
						snap.byVIP[ip] = svc
					}
				}
			}
		}
		for _, v := range vips {
			if ip, err := netip.ParseAddr(v); err == nil {
				snap.byVIP[ip.Unmap()] = svc
			} else {
				s.log.Warn("service address is not an IP", "service", name, "address", v)
			}
		}
	}
	return snap
}

// Services lists the bound Services, sorted by key.
func (s *Snapshot) Services() []*Service {
	out := make([]*Service, 0, len(s.services))
	for _, v := range s.services {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Service returns the bound Service key, or nil.
func (s *Snapshot) Service(key string) *Service { return s.services[key] }

// Resolve finds what a tunnel's target means: a bound Service by VIP, or a
// pod IP of a workload (then the bound Service it belongs to whose target
// port is the target's port, if any). port is the Service port.
func (s *Snapshot) Resolve(target netip.AddrPort) (svc *Service, port uint32, wl *workload.Workload) {
	ip := target.Addr().Unmap()
	if svc := s.byVIP[ip]; svc != nil {
		return svc, uint32(target.Port()), nil
	}
	wl = s.byIP[ip]
	if wl == nil {
		return nil, 0, nil
	}
	keys := make([]string, 0, len(wl.GetServices()))
	for k := range wl.GetServices() {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		bound := s.services[k]
		if bound == nil {
			continue
		}
		for _, p := range wl.GetServices()[k].GetPorts() {
			tp := p.GetTargetPort()
			if tp == 0 {
				tp = p.GetServicePort()
			}
			if tp == uint32(target.Port()) {
				return bound, p.GetServicePort(), wl
			}
		}
	}
	return nil, 0, wl
}

// WorkloadByIP returns the workload at ip, or nil.
func (s *Snapshot) WorkloadByIP(ip netip.Addr) *workload.Workload { return s.byIP[ip.Unmap()] }

// HasService reports whether the Workload API knows the Service key.
func (s *Snapshot) HasService(key string) bool {
	_, ok := s.addrSvcs[key]
	return ok || s.services[key] != nil
}

// Endpoints lists the healthy endpoints of Service key for Service port
// port, in a stable order. The slice is shared: callers must not modify it.
func (s *Snapshot) Endpoints(key string, port uint32) []Endpoint {
	k := epKey{key, port}
	if v, ok := s.epCache.Load(k); ok {
		return v.([]Endpoint)
	}
	out := s.endpointsOf(key, port)
	// Only answers with endpoints are kept: requests for made-up ports
	// or Service keys cannot grow the cache.
	if len(out) > 0 {
		s.epCache.Store(k, out)
	}
	return out
}

func (s *Snapshot) endpointsOf(key string, port uint32) []Endpoint {
	var out []Endpoint
	var svcTarget uint32
	if as := s.addrSvcs[key]; as != nil {
		for _, p := range as.GetPorts() {
			if p.GetServicePort() == port {
				svcTarget = p.GetTargetPort()
			}
		}
	}
	if svcTarget == 0 {
		if b := s.services[key]; b != nil {
			if sp := b.Port(port); sp != nil {
				svcTarget = sp.GetTargetPort()
			}
		}
	}
	for _, w := range s.endpoints[key] {
		if w.GetStatus() != workload.WorkloadStatus_HEALTHY {
			continue
		}
		tp := svcTarget
		found := false
		for _, p := range w.GetServices()[key].GetPorts() {
			if p.GetServicePort() == port {
				tp, found = p.GetTargetPort(), true
				break
			}
		}
		if !found && len(w.GetServices()[key].GetPorts()) > 0 {
			// The workload lists its ports for this Service and this one
			// is not among them.
			continue
		}
		if tp == 0 {
			tp = port
		}
		ep, ok := s.endpoint(w, uint16(tp))
		if ok {
			out = append(out, ep)
		}
	}
	return out
}

// EndpointOf describes workload w reached on port.
func (s *Snapshot) EndpointOf(w *workload.Workload, port uint16) (Endpoint, bool) {
	return s.endpoint(w, port)
}

func (s *Snapshot) endpoint(w *workload.Workload, port uint16) (Endpoint, bool) {
	if len(w.GetAddresses()) == 0 {
		return Endpoint{}, false
	}
	ip, ok := ipOf(w.GetAddresses()[0])
	if !ok {
		return Endpoint{}, false
	}
	td := w.GetTrustDomain()
	if td == "" {
		td = s.trustDomain
	}
	sa := w.GetServiceAccount()
	if sa == "" {
		sa = "default"
	}
	ep := Endpoint{UID: w.GetUid(), Name: w.GetWorkloadName(), Pod: w.GetName(), Namespace: w.GetNamespace(),
		Addr: netip.AddrPortFrom(ip, port), HBONE: w.GetTunnelProtocol() == workload.TunnelProtocol_HBONE}
	if ep.Name == "" {
		ep.Name = w.GetName()
	}
	if t, err := spiffeid.TrustDomainFromString(td); err == nil {
		if id, err := spiffeid.FromSegments(t, "ns", w.GetNamespace(), "sa", sa); err == nil {
			ep.Identity = id
		}
	}
	if ep.HBONE && ep.Identity.IsZero() {
		return Endpoint{}, false
	}
	ep.key = ep.Addr.String()
	return ep, true
}

// Dump is the admin /config_dump view.
type Dump struct {
	Services  []*l7.ServiceConfig         `json:"services"`
	Endpoints map[string][]DumpedEndpoint `json:"endpoints"`
}

// DumpedEndpoint is one endpoint in a Dump.
type DumpedEndpoint struct {
	Pod      string `json:"pod"`
	Address  string `json:"address"`
	HBONE    bool   `json:"hbone"`
	Identity string `json:"identity"`
}

// Dump returns the bound services and the endpoints of their ports.
func (s *Snapshot) Dump() Dump {
	d := Dump{Endpoints: map[string][]DumpedEndpoint{}}
	for _, svc := range s.Services() {
		d.Services = append(d.Services, svc.Config)
		for _, p := range svc.Config.GetPorts() {
			k := fmt.Sprintf("%s:%d", svc.Key, p.GetPort())
			d.Endpoints[k] = []DumpedEndpoint{}
			for _, e := range s.Endpoints(svc.Key, p.GetPort()) {
				d.Endpoints[k] = append(d.Endpoints[k], DumpedEndpoint{Pod: e.Namespace + "/" + e.Pod, Address: e.Addr.String(), HBONE: e.HBONE, Identity: e.Identity.String()})
			}
		}
	}
	return d
}
