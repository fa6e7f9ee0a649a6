// Package state is ztunnel's in-memory copy of the Workload API: Workloads,
// Services and Authorizations as received over Delta ADS, indexed by uid,
// by network/IP, by Service VIP and by "<namespace>/<hostname>".
//
// It owns applying pushes atomically (a push is validated completely, then
// applied under one write lock, so a reader never sees half of it) and the
// lookups the proxy makes: destination resolution with endpoint selection,
// waypoints, and the policies that apply to a workload. Received protos are
// never modified; lookups return them shared and callers must not modify
// them either. It does no I/O.
package state

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/policy"
)

type netKey struct {
	network string
	ip      netip.Addr
}

type serviceEntry struct {
	svc *workload.Service
	key string
	// rr advances on every pick; kept across updates of the service.
	rr *atomic.Uint32
}

// Store holds the state. The zero value is not usable; use New.
type Store struct {
	log *slog.Logger

	mu        sync.RWMutex
	workloads map[string]*workload.Workload // uid
	byAddr    map[netKey]*workload.Workload
	services  map[string]*serviceEntry   // "<ns>/<hostname>"
	byVIP     map[netKey][]*serviceEntry // sorted by key
	// endpoints: service key -> workloads that list it in services, sorted
	// by uid (kept even while the service itself is unknown).
	endpoints map[string][]*workload.Workload
	// names maps an Address resource name to what it created, so a removal
	// by name finds it.
	names map[string]addrRef

	policies   map[string]*policy.Policy          // "<ns>/<name>"
	authzs     map[string]*security.Authorization // as received, by the same key
	nsPolicies map[string][]*policy.Policy        // NAMESPACE scope, by namespace, sorted by key
	global     []*policy.Policy                   // GLOBAL scope, sorted by key

	version atomic.Uint64
}

type addrRef struct {
	service bool
	key     string
}

// New returns an empty store.
func New(log *slog.Logger) *Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{
		log:        log,
		workloads:  map[string]*workload.Workload{},
		byAddr:     map[netKey]*workload.Workload{},
		services:   map[string]*serviceEntry{},
		byVIP:      map[netKey][]*serviceEntry{},
		endpoints:  map[string][]*workload.Workload{},
		names:      map[string]addrRef{},
		policies:   map[string]*policy.Policy{},
		authzs:     map[string]*security.Authorization{},
		nsPolicies: map[string][]*policy.Policy{},
	}
}

// Version counts applied pushes; it changes whenever the state does.
func (s *Store) Version() uint64 { return s.version.Load() }

// ServiceKey is a Service's key: "<namespace>/<hostname>".
func ServiceKey(svc *workload.Service) string { return svc.GetNamespace() + "/" + svc.GetHostname() }

// Apply applies one Delta ADS response of typeURL; it implements
// xds.Handler. Every resource is decoded and checked before anything
// changes; any bad resource rejects the whole response (the client NACKs it
// and the previous state stays).
func (s *Store) Apply(typeURL string, resources []*discovery.Resource, removed []string) error {
	switch typeURL {
	case xds.TypeAddress:
		addrs := make([]NamedAddress, 0, len(resources))
		for _, r := range resources {
			a := &workload.Address{}
			if err := unmarshal(r, xds.TypeAddress, a); err != nil {
				return err
			}
			addrs = append(addrs, NamedAddress{Name: r.GetName(), Address: a})
		}
		return s.ApplyAddresses(addrs, removed)
	case xds.TypeAuthorization:
		auths := make([]*security.Authorization, 0, len(resources))
		for _, r := range resources {
			a := &security.Authorization{}
			if err := unmarshal(r, xds.TypeAuthorization, a); err != nil {
				return err
			}
			auths = append(auths, a)
		}
		return s.ApplyAuthorizations(auths, removed)
	default:
		return fmt.Errorf("apply: unexpected type %s", typeURL)
	}
}

func unmarshal(r *discovery.Resource, typeURL string, m proto.Message) error {
	if r.GetResource() == nil {
		return fmt.Errorf("resource %q has no body", r.GetName())
	}
	if got := r.GetResource().GetTypeUrl(); got != typeURL {
		return fmt.Errorf("resource %q: type %s, want %s", r.GetName(), got, typeURL)
	}
	if err := proto.Unmarshal(r.GetResource().GetValue(), m); err != nil {
		return fmt.Errorf("decode resource %q: %w", r.GetName(), err)
	}
	return nil
}

// NamedAddress is an Address resource with its xDS name.
type NamedAddress struct {
	Name    string
	Address *workload.Address
}

func checkIP(b []byte) (netip.Addr, error) {
	ip, ok := netip.AddrFromSlice(b)
	if !ok {
		return netip.Addr{}, fmt.Errorf("address of %d bytes", len(b))
	}
	return ip.Unmap(), nil
}

func checkWorkload(w *workload.Workload) error {
	if w.GetUid() == "" {
		return errors.New("workload without uid")
	}
	for i, a := range w.GetAddresses() {
		if _, err := checkIP(a); err != nil {
			return fmt.Errorf("workload %s address %d: %w", w.GetUid(), i, err)
		}
	}
	for _, g := range []*workload.GatewayAddress{w.GetWaypoint(), w.GetNetworkGateway()} {
		if err := checkGateway(g); err != nil {
			return fmt.Errorf("workload %s: %w", w.GetUid(), err)
		}
	}
	return nil
}

func checkGateway(g *workload.GatewayAddress) error {
	if g == nil {
		return nil
	}
	switch d := g.GetDestination().(type) {
	case *workload.GatewayAddress_Hostname:
		if d.Hostname.GetHostname() == "" {
			return errors.New("gateway with an empty hostname")
		}
	case *workload.GatewayAddress_Address:
		if _, err := checkIP(d.Address.GetAddress()); err != nil {
			return fmt.Errorf("gateway address: %w", err)
		}
	default:
		return errors.New("gateway without destination")
	}
	if g.GetHboneMtlsPort() > 65535 {
		return fmt.Errorf("gateway port %d out of range", g.GetHboneMtlsPort())
	}
	return nil
}

func checkService(svc *workload.Service) error {
	if svc.GetHostname() == "" {
		return errors.New("service without hostname")
	}
	for i, a := range svc.GetAddresses() {
		if _, err := checkIP(a.GetAddress()); err != nil {
			return fmt.Errorf("service %s address %d: %w", ServiceKey(svc), i, err)
		}
	}
	for _, p := range svc.GetPorts() {
		if p.GetServicePort() > 65535 || p.GetTargetPort() > 65535 {
			return fmt.Errorf("service %s: port %d->%d out of range", ServiceKey(svc), p.GetServicePort(), p.GetTargetPort())
		}
	}
	if err := checkGateway(svc.GetWaypoint()); err != nil {
		return fmt.Errorf("service %s: %w", ServiceKey(svc), err)
	}
	return nil
}

// ApplyAddresses applies upserts and removals (by resource name) of
// Address resources atomically.
func (s *Store) ApplyAddresses(upserts []NamedAddress, removed []string) error {
	for _, na := range upserts {
		switch t := na.Address.GetType().(type) {
		case *workload.Address_Workload:
			if err := checkWorkload(t.Workload); err != nil {
				return fmt.Errorf("address %q: %w", na.Name, err)
			}
		case *workload.Address_Service:
			if err := checkService(t.Service); err != nil {
				return fmt.Errorf("address %q: %w", na.Name, err)
			}
		default:
			return fmt.Errorf("address %q: neither workload nor service", na.Name)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	touched := map[string]struct{}{} // service keys whose endpoint lists changed
	for _, name := range removed {
		ref, ok := s.names[name]
		if !ok {
			// Not seen under that name: try it as a uid, then a service key.
			if _, isWl := s.workloads[name]; isWl {
				ref = addrRef{key: name}
			} else if _, isSvc := s.services[name]; isSvc {
				ref = addrRef{service: true, key: name}
			} else {
				continue
			}
		}
		delete(s.names, name)
		if ref.service {
			s.removeServiceLocked(ref.key)
		} else {
			s.removeWorkloadLocked(ref.key, touched)
		}
	}
	for _, na := range upserts {
		switch t := na.Address.GetType().(type) {
		case *workload.Address_Workload:
			s.removeWorkloadLocked(t.Workload.GetUid(), touched)
			s.addWorkloadLocked(t.Workload, touched)
			if na.Name != "" {
				s.names[na.Name] = addrRef{key: t.Workload.GetUid()}
			}
		case *workload.Address_Service:
			key := ServiceKey(t.Service)
			s.addServiceLocked(t.Service)
			if na.Name != "" {
				s.names[na.Name] = addrRef{service: true, key: key}
			}
		}
	}
	for key := range touched {
		eps := s.endpoints[key]
		slices.SortFunc(eps, func(a, b *workload.Workload) int { return strings.Compare(a.GetUid(), b.GetUid()) })
		if len(eps) == 0 {
			delete(s.endpoints, key)
		}
	}
	s.version.Add(1)
	return nil
}

func (s *Store) addWorkloadLocked(w *workload.Workload, touched map[string]struct{}) {
	s.workloads[w.GetUid()] = w
	if w.GetNetworkMode() != workload.NetworkMode_HOST_NETWORK {
		for _, a := range w.GetAddresses() {
			ip, _ := checkIP(a)
			k := netKey{w.GetNetwork(), ip}
			if old, ok := s.byAddr[k]; ok && old.GetUid() != w.GetUid() {
				s.log.Warn("two workloads claim one address; the newer wins",
					"address", ip, "network", w.GetNetwork(), "old", old.GetUid(), "new", w.GetUid())
			}
			s.byAddr[k] = w
		}
	}
	for key := range w.GetServices() {
		s.endpoints[key] = append(s.endpoints[key], w)
		touched[key] = struct{}{}
	}
}

func (s *Store) removeWorkloadLocked(uid string, touched map[string]struct{}) {
	w, ok := s.workloads[uid]
	if !ok {
		return
	}
	delete(s.workloads, uid)
	for _, a := range w.GetAddresses() {
		ip, _ := checkIP(a)
		k := netKey{w.GetNetwork(), ip}
		if cur := s.byAddr[k]; cur == w {
			delete(s.byAddr, k)
		}
	}
	for key := range w.GetServices() {
		s.endpoints[key] = slices.DeleteFunc(s.endpoints[key], func(x *workload.Workload) bool { return x.GetUid() == uid })
		touched[key] = struct{}{}
	}
}

func (s *Store) addServiceLocked(svc *workload.Service) {
	key := ServiceKey(svc)
	e := &serviceEntry{svc: svc, key: key, rr: new(atomic.Uint32)}
	if old, ok := s.services[key]; ok {
		e.rr = old.rr
		s.removeServiceLocked(key)
	}
	s.services[key] = e
	for _, a := range svc.GetAddresses() {
		ip, _ := checkIP(a.GetAddress())
		k := netKey{a.GetNetwork(), ip}
		list := append(s.byVIP[k], e)
		slices.SortFunc(list, func(a, b *serviceEntry) int { return strings.Compare(a.key, b.key) })
		s.byVIP[k] = list
	}
}

func (s *Store) removeServiceLocked(key string) {
	e, ok := s.services[key]
	if !ok {
		return
	}
	delete(s.services, key)
	for _, a := range e.svc.GetAddresses() {
		ip, _ := checkIP(a.GetAddress())
		k := netKey{a.GetNetwork(), ip}
		list := slices.DeleteFunc(s.byVIP[k], func(x *serviceEntry) bool { return x == e })
		if len(list) == 0 {
			delete(s.byVIP, k)
		} else {
			s.byVIP[k] = list
		}
	}
}

// ApplyAuthorizations applies upserts and removals (by "<ns>/<name>") of
// Authorization resources atomically.
func (s *Store) ApplyAuthorizations(upserts []*security.Authorization, removed []string) error {
	compiled := make([]*policy.Policy, 0, len(upserts))
	for _, a := range upserts {
		p, err := policy.Compile(a)
		if err != nil {
			return err
		}
		compiled = append(compiled, p)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, key := range removed {
		delete(s.policies, key)
		delete(s.authzs, key)
	}
	for i, p := range compiled {
		s.policies[p.Key] = p
		s.authzs[p.Key] = upserts[i]
	}
	// Rebuild the scope indexes; policies are few compared to connections.
	s.global = s.global[:0]
	clear(s.nsPolicies)
	for _, p := range s.policies {
		switch p.Scope {
		case security.Scope_GLOBAL:
			s.global = append(s.global, p)
		case security.Scope_NAMESPACE:
			s.nsPolicies[p.Namespace] = append(s.nsPolicies[p.Namespace], p)
		}
	}
	byKey := func(a, b *policy.Policy) int { return strings.Compare(a.Key, b.Key) }
	slices.SortFunc(s.global, byKey)
	for _, l := range s.nsPolicies {
		slices.SortFunc(l, byKey)
	}
	s.version.Add(1)
	return nil
}

// Workload returns the workload with uid, or nil.
func (s *Store) Workload(uid string) *workload.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[uid]
}

// WorkloadByIP returns the workload with ip in network, or nil.
func (s *Store) WorkloadByIP(network string, ip netip.Addr) *workload.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byAddr[netKey{network, ip.Unmap()}]
}

// Service returns the service with key "<namespace>/<hostname>", or nil.
func (s *Store) Service(key string) *workload.Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if e := s.services[key]; e != nil {
		return e.svc
	}
	return nil
}

// ServiceByVIP returns the service with VIP ip in network; when several
// share it, the one in srcNamespace, else the first by key.
func (s *Store) ServiceByVIP(network string, ip netip.Addr, srcNamespace string) *workload.Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if e := s.serviceByVIPLocked(network, ip, srcNamespace); e != nil {
		return e.svc
	}
	return nil
}

func (s *Store) serviceByVIPLocked(network string, ip netip.Addr, srcNamespace string) *serviceEntry {
	list := s.byVIP[netKey{network, ip.Unmap()}]
	if len(list) == 0 {
		return nil
	}
	for _, e := range list {
		if e.svc.GetNamespace() == srcNamespace {
			return e
		}
	}
	return list[0]
}

// Endpoints returns the workloads backing the service key (any health).
func (s *Store) Endpoints(key string) []*workload.Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.endpoints[key])
}

// Policies appends to dst the policies that apply to w, in Istio's order:
// the NAMESPACE policies of w's namespace, the GLOBAL ones, then the
// WORKLOAD_SELECTOR ones w lists. Listed keys the store does not hold are
// returned in missing (policy.Evaluate denies on them).
func (s *Store) Policies(dst []*policy.Policy, w *workload.Workload) (pols []*policy.Policy, missing []string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	dst = append(dst, s.nsPolicies[w.GetNamespace()]...)
	dst = append(dst, s.global...)
	for _, key := range w.GetAuthorizationPolicies() {
		p, ok := s.policies[key]
		if !ok {
			missing = append(missing, key)
			continue
		}
		if p.Scope == security.Scope_WORKLOAD_SELECTOR {
			dst = append(dst, p)
		}
	}
	return dst, missing
}

// Policy returns the policy with key, or nil.
func (s *Store) Policy(key string) *policy.Policy {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.policies[key]
}

// Snapshot is a consistent copy of the store's contents (for config dumps).
type Snapshot struct {
	Workloads []*workload.Workload
	Services  []*workload.Service
	Policies  []*policy.Policy
	// Authorizations are the policies as received, in Policies' order.
	Authorizations []*security.Authorization
}

// Snapshot returns the contents sorted by key.
func (s *Store) Snapshot() Snapshot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out Snapshot
	for _, w := range s.workloads {
		out.Workloads = append(out.Workloads, w)
	}
	for _, e := range s.services {
		out.Services = append(out.Services, e.svc)
	}
	for _, p := range s.policies {
		out.Policies = append(out.Policies, p)
	}
	slices.SortFunc(out.Workloads, func(a, b *workload.Workload) int { return strings.Compare(a.GetUid(), b.GetUid()) })
	slices.SortFunc(out.Services, func(a, b *workload.Service) int { return strings.Compare(ServiceKey(a), ServiceKey(b)) })
	slices.SortFunc(out.Policies, func(a, b *policy.Policy) int { return strings.Compare(a.Key, b.Key) })
	for _, p := range out.Policies {
		out.Authorizations = append(out.Authorizations, s.authzs[p.Key])
	}
	return out
}
