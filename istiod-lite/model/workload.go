package model

import (
	"net/netip"
	"regexp"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/proto/workload"
)

// labelTunnel marks workloads that speak HBONE themselves (waypoints);
// "http" is Istio's value for HBONE.
const labelTunnel = "networking.istio.io/tunnel"

// WorkloadInfo is a pod's Workload and what it was computed from.
type WorkloadInfo struct {
	Workload *workload.Workload
	// WaypointKey is the waypoint Gateway ("<ns>/<name>") looked up for the
	// pod, found or not; empty when none was named.
	WaypointKey string
}

// PodWorkload computes the Workload of a pod, as istiod does: nil for a pod
// that has finished or has no valid IP yet.
func (b *Builder) PodWorkload(p *corev1.Pod) WorkloadInfo {
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return WorkloadInfo{}
	}
	addrs := podAddresses(p)
	if len(addrs) == 0 {
		return WorkloadInfo{}
	}
	w := &workload.Workload{
		Uid:            b.cfg.PodUID(p.Namespace, p.Name),
		Name:           p.Name,
		Namespace:      p.Namespace,
		Addresses:      addrs,
		Network:        b.cfg.Network,
		ServiceAccount: p.Spec.ServiceAccountName,
		Node:           p.Spec.NodeName,
		TrustDomain:    b.cfg.workloadTrustDomain(),
		ClusterId:      b.cfg.ClusterID,
		Status:         workload.WorkloadStatus_HEALTHY,
		WorkloadType:   workload.WorkloadType_POD,
		Services:       b.podServices(p),
		Locality:       b.locality(p.Spec.NodeName),
	}
	if !podReady(p) || p.DeletionTimestamp != nil {
		w.Status = workload.WorkloadStatus_UNHEALTHY
	}
	if p.Spec.HostNetwork {
		w.NetworkMode = workload.NetworkMode_HOST_NETWORK
	}
	w.WorkloadName = workloadName(p)
	w.CanonicalName, w.CanonicalRevision = canonicalService(p.Labels, w.WorkloadName)
	w.AuthorizationPolicies = b.workloadPolicies(p.Namespace, p.Labels)

	info := WorkloadInfo{Workload: w}
	// A waypoint's own pods are not sent to a waypoint.
	if gw := p.Labels[kube.LabelGatewayName]; gw == "" || b.Waypoint(p.Namespace, gw) == nil {
		var wp *Waypoint
		wp, info.WaypointKey = b.waypointFor(p.ObjectMeta, kube.WaypointForWorkload)
		if wp != nil {
			w.Waypoint = wp.Address
		}
	} else {
		info.WaypointKey = p.Namespace + "/" + gw
	}

	// HBONE only once the CNI has confirmed redirection, and only for a pod
	// that is enrolled (a stale annotation on an opted-out pod must not make
	// peers tunnel to a pod nobody terminates HBONE for).
	if p.Annotations[kube.AnnotationRedirection] == kube.RedirectionEnabled && !p.Spec.HostNetwork {
		var nsLabels map[string]string
		if ns := b.store.Namespace(p.Namespace); ns != nil {
			nsLabels = ns.Labels
		}
		if kube.AmbientEnrolled(nsLabels, p.Labels) {
			w.TunnelProtocol = workload.TunnelProtocol_HBONE
		}
	}
	if strings.Contains(p.Labels[labelTunnel], "http") {
		w.TunnelProtocol = workload.TunnelProtocol_HBONE
		w.NativeTunnel = true
	}
	return info
}

func podAddresses(p *corev1.Pod) [][]byte {
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	out := make([][]byte, 0, len(ips))
	for _, ip := range ips {
		a, err := netip.ParseAddr(ip.IP)
		if err != nil {
			return nil // garbage in the status: not a usable workload
		}
		out = append(out, a.Unmap().AsSlice())
	}
	return out
}

func podReady(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (b *Builder) locality(node string) *workload.Locality {
	n := b.store.Node(node)
	if n == nil {
		return nil
	}
	l := &workload.Locality{
		Region:  n.Labels[corev1.LabelTopologyRegion],
		Zone:    n.Labels[corev1.LabelTopologyZone],
		Subzone: n.Labels[kube.LabelTopologySubzone],
	}
	if l.Region == "" && l.Zone == "" && l.Subzone == "" {
		return nil
	}
	return l
}

var cronJobName = regexp.MustCompile(`^(.+)-\d{8,10}$`)

// workloadName derives the owning workload's name the way Istio does: the
// workload-name label, else the Deployment behind a ReplicaSet, the CronJob
// behind a Job, the controller, or the pod itself.
func workloadName(p *corev1.Pod) string {
	if n, ok := p.Labels[kube.LabelWorkloadName]; ok {
		return n
	}
	if p.GenerateName == "" {
		return p.Name
	}
	for _, ref := range p.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		switch {
		case ref.Kind == "ReplicaSet" && p.Labels["pod-template-hash"] != "" &&
			strings.HasSuffix(ref.Name, p.Labels["pod-template-hash"]):
			return strings.TrimSuffix(ref.Name, "-"+p.Labels["pod-template-hash"])
		case ref.Kind == "Job":
			if m := cronJobName.FindStringSubmatch(ref.Name); len(m) == 2 {
				return m[1]
			}
		}
		if ref.Name != "" {
			return ref.Name
		}
		break
	}
	return p.Name
}

// canonicalService returns the canonical service name and revision from the
// usual labels, falling back to the workload name and "latest".
func canonicalService(l map[string]string, workloadName string) (string, string) {
	name := workloadName
	for _, k := range []string{kube.LabelCanonicalName, "app.kubernetes.io/name", "app"} {
		if v, ok := l[k]; ok {
			name = v
			break
		}
	}
	rev := "latest"
	for _, k := range []string{kube.LabelCanonicalRevision, "app.kubernetes.io/version", "version"} {
		if v, ok := l[k]; ok {
			rev = v
			break
		}
	}
	return name, rev
}

// podServices is the Workload.services map: every Service of the pod's
// namespace whose (non-empty) selector matches the pod, plus services
// without selectors whose EndpointSlices point at the pod, each with the
// pod's port mapping. A named target port the pod does not declare leaves
// that port out.
func (b *Builder) podServices(p *corev1.Pod) map[string]*workload.PortList {
	out := map[string]*workload.PortList{}
	for _, svc := range b.store.Services(p.Namespace) {
		if svc.Spec.Type == corev1.ServiceTypeExternalName || len(svc.Spec.Selector) == 0 {
			continue
		}
		if !selects(svc.Spec.Selector, p.Labels) {
			continue
		}
		out[b.cfg.ServiceKey(svc.Namespace, svc.Name)] = servicePortsFor(p, svc)
	}
	// Services without selectors, through slices naming this pod.
	for _, svc := range b.store.Services(p.Namespace) {
		if len(svc.Spec.Selector) != 0 || svc.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		for _, es := range b.store.EndpointSlicesOf(svc.Namespace, svc.Name) {
			if sliceTargetsPod(es, p) {
				out[b.cfg.ServiceKey(svc.Namespace, svc.Name)] = servicePortsFor(p, svc)
				break
			}
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// selects reports whether every key=value of sel is in lbls (a Service
// selector's meaning), without building a labels.Selector per pod.
func selects(sel, lbls map[string]string) bool {
	for k, v := range sel {
		if w, ok := lbls[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func sliceTargetsPod(es *discoveryv1.EndpointSlice, p *corev1.Pod) bool {
	for _, ep := range es.Endpoints {
		r := ep.TargetRef
		if r != nil && r.Kind == "Pod" && r.Name == p.Name && (r.Namespace == "" || r.Namespace == p.Namespace) &&
			(r.UID == "" || r.UID == p.UID) {
			return true
		}
	}
	return false
}

func servicePortsFor(p *corev1.Pod, svc *corev1.Service) *workload.PortList {
	pl := &workload.PortList{Ports: make([]*workload.Port, 0, len(svc.Spec.Ports))}
	for _, sp := range svc.Spec.Ports {
		target := uint32(sp.TargetPort.IntVal)
		if sp.TargetPort.StrVal != "" {
			port, ok := findPortName(p, sp.TargetPort.StrVal)
			if !ok {
				continue
			}
			target = uint32(port)
		}
		pl.Ports = append(pl.Ports, &workload.Port{ServicePort: uint32(sp.Port), TargetPort: target})
	}
	return pl
}

func findPortName(p *corev1.Pod, name string) (int32, bool) {
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == name && (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) {
				return cp.ContainerPort, true
			}
		}
	}
	return 0, false
}

// SliceWorkloads computes the Workloads of an EndpointSlice's endpoints that
// are not pods (manually managed endpoints of a Service), as istiod does.
func (b *Builder) SliceWorkloads(es *discoveryv1.EndpointSlice) []*workload.Workload {
	svcName := es.Labels[discoveryv1.LabelServiceName]
	if svcName == "" || es.AddressType == discoveryv1.AddressTypeFQDN {
		return nil
	}
	svc := b.store.Service(es.Namespace, svcName)
	if svc == nil || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	pl := &workload.PortList{}
	for _, p := range es.Ports {
		if p.Name == nil || p.Port == nil || p.Protocol == nil || *p.Protocol != corev1.ProtocolTCP {
			continue
		}
		for _, sp := range svc.Spec.Ports {
			if sp.Name == *p.Name {
				pl.Ports = append(pl.Ports, &workload.Port{ServicePort: uint32(sp.Port), TargetPort: uint32(*p.Port)})
				break
			}
		}
	}
	key := b.cfg.ServiceKey(es.Namespace, svcName)
	var out []*workload.Workload
	seen := map[string]bool{}
	for _, ep := range es.Endpoints {
		if ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" {
			continue // the pod's own Workload covers it, with far more detail
		}
		if len(ep.Addresses) == 0 || seen[ep.Addresses[0]] {
			continue
		}
		seen[ep.Addresses[0]] = true
		addrs := make([][]byte, 0, len(ep.Addresses))
		ok := true
		for _, a := range ep.Addresses {
			ip, err := netip.ParseAddr(a)
			if err != nil {
				ok = false
				break
			}
			addrs = append(addrs, ip.Unmap().AsSlice())
		}
		if !ok {
			continue
		}
		status := workload.WorkloadStatus_UNHEALTHY
		if ep.Conditions.Ready == nil || *ep.Conditions.Ready {
			status = workload.WorkloadStatus_HEALTHY
		}
		out = append(out, &workload.Workload{
			Uid:         b.cfg.EndpointSliceUID(es.Namespace, es.Name, ep.Addresses[0]),
			Name:        es.Name,
			Namespace:   es.Namespace,
			Addresses:   addrs,
			Network:     b.cfg.Network,
			TrustDomain: b.cfg.workloadTrustDomain(),
			Services:    map[string]*workload.PortList{key: pl},
			Status:      status,
			ClusterId:   b.cfg.ClusterID,
			// Nothing says these addresses are unique to one workload.
			NetworkMode: workload.NetworkMode_HOST_NETWORK,
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Uid < out[j].Uid })
	return out
}
