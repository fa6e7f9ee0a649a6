package model

import (
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/proto/workload"
)

// Waypoint is a waypoint Gateway as the translation sees it.
type Waypoint struct {
	Namespace, Name string
	// Address peers tunnel to: the Gateway's status hostname (preferred) or IP.
	Address *workload.GatewayAddress
	// TrafficType is istio.io/waypoint-for: service, workload, all or none.
	TrafficType string
	// Which namespaces may bind to it (the HBONE listener's allowedRoutes).
	from     gatewayv1.FromNamespaces
	selector labels.Selector
}

// Key is "<namespace>/<name>".
func (w *Waypoint) Key() string { return w.Namespace + "/" + w.Name }

// WaypointSource is what waypoint binding reads: namespaces (their labels)
// and Gateways. *Store is one; so are informer listers.
type WaypointSource interface {
	Namespace(name string) *corev1.Namespace
	Gateway(ns, name string) *gatewayv1.Gateway
}

// Waypoint returns the waypoint Gateway ns/name, or nil when there is no
// such Gateway of class istio-waypoint, or it has no address in its status
// yet (as in Istio: a waypoint is usable once its controller has published
// where it is).
func (b *Builder) Waypoint(ns, name string) *Waypoint { return waypointOf(b.cfg, b.store, ns, name) }

func waypointOf(cfg Config, src WaypointSource, ns, name string) *Waypoint {
	gw := src.Gateway(ns, name)
	if gw == nil || string(gw.Spec.GatewayClassName) != kube.WaypointGatewayClass {
		return nil
	}
	addr := gatewayAddress(cfg, gw)
	if addr == nil {
		return nil
	}
	w := &Waypoint{
		Namespace:   ns,
		Name:        name,
		Address:     addr,
		TrafficType: kube.WaypointForService,
		from:        gatewayv1.NamespacesFromSame,
	}
	if tt, ok := gw.Labels[kube.LabelWaypointFor]; ok {
		w.TrafficType = tt
	}
	for _, l := range gw.Spec.Listeners {
		if l.Protocol == "HBONE" && l.Port == kube.WaypointHBONEPort {
			if ar := l.AllowedRoutes; ar != nil && ar.Namespaces != nil {
				if ar.Namespaces.From != nil {
					w.from = *ar.Namespaces.From
				}
				if ar.Namespaces.Selector != nil {
					if sel, err := metav1.LabelSelectorAsSelector(ar.Namespaces.Selector); err == nil {
						w.selector = sel
					} else {
						w.selector = labels.Nothing()
					}
				}
			}
			break
		}
	}
	return w
}

func gatewayAddress(cfg Config, gw *gatewayv1.Gateway) *workload.GatewayAddress {
	for _, a := range gw.Status.Addresses {
		if a.Type != nil && *a.Type == gatewayv1.HostnameAddressType && a.Value != "" {
			return &workload.GatewayAddress{
				Destination: &workload.GatewayAddress_Hostname{Hostname: &workload.NamespacedHostname{
					Namespace: gw.Namespace, Hostname: a.Value,
				}},
				HboneMtlsPort: kube.WaypointHBONEPort,
			}
		}
	}
	for _, a := range gw.Status.Addresses {
		if a.Type == nil || *a.Type == gatewayv1.IPAddressType {
			ip, err := netip.ParseAddr(a.Value)
			if err != nil {
				continue
			}
			return &workload.GatewayAddress{
				Destination: &workload.GatewayAddress_Address{Address: &workload.NetworkAddress{
					Network: cfg.Network, Address: ip.AsSlice(),
				}},
				HboneMtlsPort: kube.WaypointHBONEPort,
			}
		}
	}
	return nil
}

// allowsFrom reports whether objects of namespace ns may bind to w.
func allowsFrom(src WaypointSource, w *Waypoint, ns string) bool {
	switch w.from {
	case gatewayv1.NamespacesFromAll:
		return true
	case gatewayv1.NamespacesFromSelector:
		if w.selector == nil {
			return false
		}
		n := src.Namespace(ns)
		if n == nil {
			return false
		}
		return w.selector.Matches(labels.Set(n.Labels))
	default:
		return w.Namespace == ns
	}
}

// useWaypoint reads istio.io/use-waypoint from meta: the waypoint key
// ("<ns>/<name>") it names, or none=true for an explicit opt-out.
func useWaypoint(meta metav1.ObjectMeta, defaultNS string) (key string, none bool) {
	v, ok := meta.Labels[kube.LabelUseWaypoint]
	if !ok || v == "" {
		return "", false
	}
	if v == kube.UseWaypointNone {
		return "", true
	}
	ns := defaultNS
	if o, ok := meta.Labels[kube.LabelUseWaypointNamespace]; ok && o != "" {
		ns = o
	}
	if n, name, found := strings.Cut(v, "/"); found {
		ns, v = n, name
	}
	return ns + "/" + v, false
}

// waypointFor finds the waypoint bound to an object (its own label, else its
// namespace's) that accepts traffic of kind want (service or workload). It
// also returns the waypoint key it looked up, found or not, so callers can
// recompute the object when that Gateway changes.
func (b *Builder) waypointFor(meta metav1.ObjectMeta, want string) (*Waypoint, string) {
	return waypointFor(b.cfg, b.store, meta, want)
}

func waypointFor(cfg Config, src WaypointSource, meta metav1.ObjectMeta, want string) (*Waypoint, string) {
	key, none := useWaypoint(meta, meta.Namespace)
	if none {
		return nil, ""
	}
	if key == "" {
		ns := src.Namespace(meta.Namespace)
		if ns == nil {
			return nil, ""
		}
		key, _ = useWaypoint(ns.ObjectMeta, meta.Namespace)
		if key == "" {
			return nil, ""
		}
	}
	wns, wname, _ := strings.Cut(key, "/")
	w := waypointOf(cfg, src, wns, wname)
	if w == nil || !allowsFrom(src, w, meta.Namespace) {
		return nil, key
	}
	if w.TrafficType != want && w.TrafficType != kube.WaypointForAll {
		return nil, key
	}
	return w, key
}

// ServiceWaypoint finds the waypoint that applies svc's HTTPRoutes and
// GRPCRoutes (the one its L7 configuration goes to), reading src: nil when
// none does. key is the waypoint its istio.io/use-waypoint label (or its
// namespace's) names, found or not ("" when it names none, or the Service
// cannot have a waypoint: ExternalName Services and waypoints' own).
func ServiceWaypoint(cfg Config, src WaypointSource, svc *corev1.Service) (wp *Waypoint, key string) {
	if svc.Spec.Type == corev1.ServiceTypeExternalName || svc.Labels[kube.LabelGatewayManaged] == kube.ManagedMeshController {
		return nil, ""
	}
	return waypointFor(cfg.WithDefaults(), src, svc.ObjectMeta, kube.WaypointForService)
}
