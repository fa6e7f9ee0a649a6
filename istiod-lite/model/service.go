package model

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/proto/workload"
)

// Kubernetes trafficDistribution values (PreferClose is the older name of
// PreferSameZone).
const (
	trafficPreferClose    = "PreferClose"
	trafficPreferSameZone = "PreferSameZone"
	trafficPreferSameNode = "PreferSameNode"
)

// ServiceInfo is a Service resource and what it was computed from.
type ServiceInfo struct {
	Service *workload.Service
	// WaypointKey is the waypoint Gateway looked up, found or not.
	WaypointKey string
}

// Service computes the Workload API Service of a Kubernetes Service, as
// istiod does. ExternalName services have none; a Service whose cluster IPs
// do not parse has none either, and err says why.
func (b *Builder) Service(svc *corev1.Service) (ServiceInfo, error) {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return ServiceInfo{}, nil
	}
	addrs := make([]*workload.NetworkAddress, 0, 2)
	for _, vip := range serviceVIPs(svc) {
		ip, err := netip.ParseAddr(vip)
		if err != nil {
			return ServiceInfo{}, fmt.Errorf("service %s/%s: cluster IP %q: %w", svc.Namespace, svc.Name, vip, err)
		}
		addrs = append(addrs, &workload.NetworkAddress{Network: b.cfg.Network, Address: ip.Unmap().AsSlice()})
	}
	ports := make([]*workload.Port, 0, len(svc.Spec.Ports))
	for _, p := range svc.Spec.Ports {
		// A named target port is resolved per pod (Workload.services); here it is 0.
		ports = append(ports, &workload.Port{ServicePort: uint32(p.Port), TargetPort: uint32(p.TargetPort.IntVal),
			AppProtocol: appProtocol(p)})
	}
	s := &workload.Service{
		Name:       svc.Name,
		Namespace:  svc.Namespace,
		Hostname:   b.cfg.Hostname(svc.Namespace, svc.Name),
		Addresses:  addrs,
		Ports:      ports,
		IpFamilies: ipFamilies(svc),
		// A Kubernetes Service owns its hostname.
		Canonical: true,
	}
	var nsMeta *corev1.Namespace
	if ns := b.store.Namespace(svc.Namespace); ns != nil {
		nsMeta = ns
	}
	s.LoadBalancing = loadBalancing(svc, nsMeta)

	info := ServiceInfo{Service: s}
	// The waypoint's own Service never points at a waypoint.
	if svc.Labels[kube.LabelGatewayManaged] != kube.ManagedMeshController {
		var wp *Waypoint
		wp, info.WaypointKey = b.waypointFor(svc.ObjectMeta, kube.WaypointForService)
		if wp != nil {
			s.Waypoint = wp.Address
			s.IngressUseWaypoint = ingressUseWaypoint(svc.Labels, nsLabels(nsMeta))
		}
	}
	return info, nil
}

func nsLabels(ns *corev1.Namespace) map[string]string {
	if ns == nil {
		return nil
	}
	return ns.Labels
}

func serviceVIPs(svc *corev1.Service) []string {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	out := make([]string, 0, len(ips))
	for _, ip := range ips {
		if ip != "" && ip != corev1.ClusterIPNone {
			out = append(out, ip)
		}
	}
	return out
}

func ipFamilies(svc *corev1.Service) workload.IPFamilies {
	switch len(svc.Spec.IPFamilies) {
	case 2:
		return workload.IPFamilies_DUAL
	case 1:
		if svc.Spec.IPFamilies[0] == corev1.IPv4Protocol {
			return workload.IPFamilies_IPV4_ONLY
		}
		return workload.IPFamilies_IPV6_ONLY
	}
	return workload.IPFamilies_AUTOMATIC
}

// loadBalancing maps internalTrafficPolicy, trafficDistribution (field, then
// the service's, then the namespace's annotation) and
// publishNotReadyAddresses to endpoint selection, as istiod does.
func loadBalancing(svc *corev1.Service, ns *corev1.Namespace) *workload.LoadBalancing {
	var lb *workload.LoadBalancing
	if itp := svc.Spec.InternalTrafficPolicy; itp != nil && *itp == corev1.ServiceInternalTrafficPolicyLocal {
		lb = &workload.LoadBalancing{
			RoutingPreference: []workload.LoadBalancing_Scope{workload.LoadBalancing_NODE},
			Mode:              workload.LoadBalancing_STRICT,
		}
	} else {
		td := ""
		switch {
		case svc.Spec.TrafficDistribution != nil:
			td = *svc.Spec.TrafficDistribution
		case svc.Annotations[kube.AnnotationTrafficDistribution] != "":
			td = svc.Annotations[kube.AnnotationTrafficDistribution]
		case ns != nil:
			td = ns.Annotations[kube.AnnotationTrafficDistribution]
		}
		switch {
		case strings.EqualFold(td, trafficPreferClose), strings.EqualFold(td, trafficPreferSameZone):
			lb = &workload.LoadBalancing{
				RoutingPreference: []workload.LoadBalancing_Scope{
					workload.LoadBalancing_NETWORK, workload.LoadBalancing_REGION, workload.LoadBalancing_ZONE,
				},
				Mode: workload.LoadBalancing_FAILOVER,
			}
		case strings.EqualFold(td, trafficPreferSameNode):
			lb = &workload.LoadBalancing{
				RoutingPreference: []workload.LoadBalancing_Scope{
					workload.LoadBalancing_NETWORK, workload.LoadBalancing_REGION, workload.LoadBalancing_ZONE,
					workload.LoadBalancing_SUBZONE, workload.LoadBalancing_NODE,
				},
				Mode: workload.LoadBalancing_FAILOVER,
			}
		}
	}
	if svc.Spec.PublishNotReadyAddresses {
		if lb == nil {
			lb = &workload.LoadBalancing{}
		}
		lb.HealthPolicy = workload.LoadBalancing_ALLOW_ALL
	}
	return lb
}

// ingressUseWaypoint reads istio.io/ingress-use-waypoint from the service,
// then its namespace.
func ingressUseWaypoint(svcLabels, nsLabels map[string]string) bool {
	v, ok := svcLabels[kube.LabelIngressUseWaypoint]
	if !ok {
		v, ok = nsLabels[kube.LabelIngressUseWaypoint]
	}
	if !ok {
		return false
	}
	b, err := strconv.ParseBool(v)
	return err == nil && b
}

// wellKnownTCPPorts are taken as TCP when the port's name says nothing
// (SMTP, DNS, MySQL, MongoDB), as Istio does.
var wellKnownTCPPorts = map[int32]bool{25: true, 53: true, 3306: true, 27017: true}

// appProtocol is the application protocol of a Service port as istiod
// reads it: appProtocol if set (with Kubernetes' standard kubernetes.io/h2c,
// ws and wss names), else the port name's prefix before '-'; UDP ports and
// protocols ztunnel has no value for (grpc-web, mongo, redis, ...) are
// UNKNOWN.
func appProtocol(p corev1.ServicePort) workload.AppProtocol {
	if p.Protocol == corev1.ProtocolUDP {
		return workload.AppProtocol_UNKNOWN
	}
	name := p.Name
	if p.AppProtocol != nil {
		name = *p.AppProtocol
		switch name {
		case "kubernetes.io/h2c":
			return workload.AppProtocol_HTTP2
		case "kubernetes.io/ws":
			return workload.AppProtocol_HTTP11
		case "kubernetes.io/wss":
			return workload.AppProtocol_TLS
		}
	}
	if len(name) >= len("grpc-web") && strings.EqualFold(name[:len("grpc-web")], "grpc-web") {
		return workload.AppProtocol_UNKNOWN
	}
	if i := strings.IndexByte(name, '-'); i >= 0 {
		name = name[:i]
	}
	switch strings.ToLower(name) {
	case "http":
		return workload.AppProtocol_HTTP11
	case "http2":
		return workload.AppProtocol_HTTP2
	case "grpc":
		return workload.AppProtocol_GRPC
	case "https", "tls":
		return workload.AppProtocol_TLS
	case "tcp":
		return workload.AppProtocol_TCP
	case "udp", "grpc-web", "http_proxy", "mongo", "redis", "mysql":
		// Known to Istio, but with no Workload API value.
		return workload.AppProtocol_UNKNOWN
	}
	if wellKnownTCPPorts[p.Port] {
		return workload.AppProtocol_TCP
	}
	return workload.AppProtocol_UNKNOWN
}
