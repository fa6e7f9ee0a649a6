package model

import (
	"net/netip"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/meshlite/meshlite/proto/workload"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

var ambientNS = map[string]string{"istio.io/dataplane-mode": "ambient"}

func TestPodWorkload_AllFieldsOfADeploymentPod(t *testing.T) {
	p := pod("shop", "cart-7d9f8-abcde", "10.1.0.5",
		withLabels("app", "cart", "version", "v2", "pod-template-hash", "7d9f8"),
		annotations("ambient.istio.io/redirection", "enabled"))
	p.GenerateName = "cart-7d9f8-"
	p.OwnerReferences = []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "cart-7d9f8", Controller: ptr.To(true)}}
	p.Status.PodIPs = []corev1.PodIP{{IP: "10.1.0.5"}, {IP: "fd00::5"}}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{
		"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-1",
	}}}
	svc := service("shop", "cart", "10.96.0.10", map[string]string{"app": "cart"},
		port(80, intstr.FromString("http")), port(9090, intstr.FromInt32(9091)), port(81, intstr.FromString("metrics")))
	other := service("shop", "other", "10.96.0.11", map[string]string{"app": "other"}, port(80, intstr.FromInt32(80)))
	b := world(t, Config{}, ns("shop", ambientNS), node, p, svc, other)

	got := b.PodWorkload(p)
	want := &workload.Workload{
		Uid:               "Kubernetes//Pod/shop/cart-7d9f8-abcde",
		Name:              "cart-7d9f8-abcde",
		Namespace:         "shop",
		Addresses:         [][]byte{ip("10.1.0.5"), ip("fd00::5")},
		TunnelProtocol:    workload.TunnelProtocol_HBONE,
		ServiceAccount:    "sa-cart-7d9f8-abcde",
		Node:              "node-a",
		CanonicalName:     "cart",
		CanonicalRevision: "v2",
		WorkloadType:      workload.WorkloadType_POD,
		WorkloadName:      "cart",
		ClusterId:         "Kubernetes",
		Status:            workload.WorkloadStatus_HEALTHY,
		Locality:          &workload.Locality{Region: "eu", Zone: "eu-1"},
		Services: map[string]*workload.PortList{
			// "metrics" is not a port of the pod: left out.
			"shop/cart.shop.svc.cluster.local": {Ports: []*workload.Port{
				{ServicePort: 80, TargetPort: 8080}, {ServicePort: 9090, TargetPort: 9091},
			}},
		},
	}
	assertProto(t, "workload", got.Workload, want)
	if got.WaypointKey != "" {
		t.Errorf("WaypointKey = %q, want none", got.WaypointKey)
	}
}

func TestPodWorkload_Skipped(t *testing.T) {
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
	}{
		{"succeeded", pod("a", "p", "10.0.0.1", func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded })},
		{"failed", pod("a", "p", "10.0.0.1", func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed })},
		{"no IP yet", pod("a", "p", "", func(p *corev1.Pod) { p.Status.PodIPs = nil; p.Status.Phase = corev1.PodPending })},
		{"garbage IP", pod("a", "p", "10.0.0.300")},
	} {
		b := world(t, Config{}, tc.pod)
		if got := b.PodWorkload(tc.pod); got.Workload != nil {
			t.Errorf("%s: got a workload %v, want none", tc.name, got.Workload)
		}
	}
}

func TestPodWorkload_StatusAndIdentityFields(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cfg    Config
		pod    *corev1.Pod
		check  func(*workload.Workload) bool
		expect string
	}{
		{"not ready", Config{}, pod("a", "p", "10.0.0.1", func(p *corev1.Pod) {
			p.Status.Conditions[0].Status = corev1.ConditionFalse
		}), func(w *workload.Workload) bool { return w.Status == workload.WorkloadStatus_UNHEALTHY }, "UNHEALTHY"},
		{"pending with IP", Config{}, pod("a", "p", "10.0.0.1", func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending }),
			func(w *workload.Workload) bool { return w != nil && w.Status == workload.WorkloadStatus_UNHEALTHY }, "an UNHEALTHY workload"},
		{"terminating", Config{}, pod("a", "p", "10.0.0.1", func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{Time: epoch} }),
			func(w *workload.Workload) bool { return w.Status == workload.WorkloadStatus_UNHEALTHY }, "UNHEALTHY"},
		{"default trust domain is left empty", Config{TrustDomain: "cluster.local"}, pod("a", "p", "10.0.0.1"),
			func(w *workload.Workload) bool { return w.TrustDomain == "" }, `trust_domain ""`},
		{"other trust domain is set", Config{TrustDomain: "example.org"}, pod("a", "p", "10.0.0.1"),
			func(w *workload.Workload) bool { return w.TrustDomain == "example.org" }, "trust_domain example.org"},
		{"cluster id in uid", Config{ClusterID: "east"}, pod("a", "p", "10.0.0.1"),
			func(w *workload.Workload) bool { return w.Uid == "east//Pod/a/p" && w.ClusterId == "east" }, "uid east//Pod/a/p"},
		{"network", Config{Network: "net1"}, pod("a", "p", "10.0.0.1"),
			func(w *workload.Workload) bool { return w.Network == "net1" }, "network net1"},
		{"host network", Config{}, pod("a", "p", "10.0.0.1", func(p *corev1.Pod) { p.Spec.HostNetwork = true }),
			func(w *workload.Workload) bool { return w.NetworkMode == workload.NetworkMode_HOST_NETWORK }, "HOST_NETWORK"},
		{"canonical labels win", Config{}, pod("a", "p", "10.0.0.1", withLabels(
			"service.istio.io/canonical-name", "cn", "app.kubernetes.io/name", "an", "app", "x",
			"service.istio.io/canonical-revision", "cr", "app.kubernetes.io/version", "av", "version", "v")),
			func(w *workload.Workload) bool { return w.CanonicalName == "cn" && w.CanonicalRevision == "cr" }, "cn/cr"},
		{"k8s recommended labels next", Config{}, pod("a", "p", "10.0.0.1", withLabels(
			"app.kubernetes.io/name", "an", "app", "x", "app.kubernetes.io/version", "av", "version", "v")),
			func(w *workload.Workload) bool { return w.CanonicalName == "an" && w.CanonicalRevision == "av" }, "an/av"},
		{"no labels: workload name and latest", Config{}, pod("a", "p", "10.0.0.1"),
			func(w *workload.Workload) bool { return w.CanonicalName == "p" && w.CanonicalRevision == "latest" }, "p/latest"},
		{"cronjob name", Config{}, pod("a", "nightly-28000000-xyz", "10.0.0.1", func(p *corev1.Pod) {
			p.GenerateName = "nightly-28000000-"
			p.OwnerReferences = []metav1.OwnerReference{{Kind: "Job", Name: "nightly-28000000", Controller: ptr.To(true)}}
		}), func(w *workload.Workload) bool { return w.WorkloadName == "nightly" }, "workload_name nightly"},
		{"workload-name label", Config{}, pod("a", "p", "10.0.0.1", withLabels("service.istio.io/workload-name", "wn")),
			func(w *workload.Workload) bool { return w.WorkloadName == "wn" && w.CanonicalName == "wn" }, "workload_name wn"},
		{"node without topology labels", Config{}, pod("a", "p", "10.0.0.1"),
			func(w *workload.Workload) bool { return w.Locality == nil }, "no locality"},
	} {
		b := world(t, tc.cfg, tc.pod)
		w := b.PodWorkload(tc.pod).Workload
		if w == nil || !tc.check(w) {
			t.Errorf("%s: want %s, got %v", tc.name, tc.expect, w)
		}
	}
}

func TestPodWorkload_TunnelProtocolNeedsEnrollmentAndRedirection(t *testing.T) {
	redirected := annotations("ambient.istio.io/redirection", "enabled")
	for _, tc := range []struct {
		name     string
		nsLabels map[string]string
		pod      *corev1.Pod
		want     workload.TunnelProtocol
	}{
		{"plain pod", nil, pod("a", "p", "10.0.0.1"), workload.TunnelProtocol_NONE},
		{"ambient namespace, not yet redirected", ambientNS, pod("a", "p", "10.0.0.1"), workload.TunnelProtocol_NONE},
		{"ambient namespace, redirected", ambientNS, pod("a", "p", "10.0.0.1", redirected), workload.TunnelProtocol_HBONE},
		{"pod label, redirected", nil, pod("a", "p", "10.0.0.1", redirected, withLabels("istio.io/dataplane-mode", "ambient")), workload.TunnelProtocol_HBONE},
		{"pod opted out, stale annotation", ambientNS, pod("a", "p", "10.0.0.1", redirected, withLabels("istio.io/dataplane-mode", "none")), workload.TunnelProtocol_NONE},
		{"annotation without enrollment", nil, pod("a", "p", "10.0.0.1", redirected), workload.TunnelProtocol_NONE},
		{"annotation not enabled", ambientNS, pod("a", "p", "10.0.0.1", annotations("ambient.istio.io/redirection", "disabled")), workload.TunnelProtocol_NONE},
	} {
		b := world(t, Config{}, ns("a", tc.nsLabels), tc.pod)
		if got := b.PodWorkload(tc.pod).Workload.TunnelProtocol; got != tc.want {
			t.Errorf("%s: tunnel_protocol = %v, want %v", tc.name, got, tc.want)
		}
	}
	// A waypoint proxy speaks HBONE itself.
	wp := pod("a", "waypoint-1", "10.0.0.9", withLabels("networking.istio.io/tunnel", "http"))
	w := world(t, Config{}, ns("a", nil), wp).PodWorkload(wp).Workload
	if w.TunnelProtocol != workload.TunnelProtocol_HBONE || !w.NativeTunnel {
		t.Errorf("native tunnel pod: tunnel_protocol %v native %v, want HBONE true", w.TunnelProtocol, w.NativeTunnel)
	}
}

func TestPodWorkload_ServicesWithoutSelectorThroughEndpointSlices(t *testing.T) {
	p := pod("a", "db-0", "10.0.0.7")
	svc := service("a", "db", "10.96.0.20", nil, port(5432, intstr.FromString("http")))
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "a", Name: "db-x", Labels: map[string]string{"kubernetes.io/service-name": "db"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.7"},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "a", Name: "db-0", UID: p.UID}}},
	}
	b := world(t, Config{}, p, svc, es)
	got := b.PodWorkload(p).Workload.Services
	want := &workload.PortList{Ports: []*workload.Port{{ServicePort: 5432, TargetPort: 8080}}}
	if len(got) != 1 {
		t.Fatalf("services = %v, want only a/db", got)
	}
	assertProto(t, "db ports", got["a/db.a.svc.cluster.local"], want)
	// A slice address that is not a pod becomes its own workload.
	es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{"192.168.9.9"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false)}})
	es.Ports = []discoveryv1.EndpointPort{{Name: ptr.To("p5432"), Port: ptr.To[int32](5433), Protocol: ptr.To(corev1.ProtocolTCP)}}
	ws := b.SliceWorkloads(es)
	if len(ws) != 1 {
		t.Fatalf("slice workloads = %d, want 1", len(ws))
	}
	assertProto(t, "slice workload", ws[0], &workload.Workload{
		Uid: "Kubernetes/discovery.k8s.io/EndpointSlice/a/db-x/192.168.9.9", Name: "db-x", Namespace: "a",
		Addresses: [][]byte{ip("192.168.9.9")}, ClusterId: "Kubernetes", Status: workload.WorkloadStatus_UNHEALTHY,
		NetworkMode: workload.NetworkMode_HOST_NETWORK,
		Services:    map[string]*workload.PortList{"a/db.a.svc.cluster.local": {Ports: []*workload.Port{{ServicePort: 5432, TargetPort: 5433}}}},
	})
}

func TestPodWorkload_WaypointBinding(t *testing.T) {
	hostAddr := func(ns, h string) *workload.GatewayAddress {
		return &workload.GatewayAddress{HboneMtlsPort: 15008,
			Destination: &workload.GatewayAddress_Hostname{Hostname: &workload.NamespacedHostname{Namespace: ns, Hostname: h}}}
	}
	useWP := func(v string) map[string]string { return map[string]string{"istio.io/use-waypoint": v} }
	for _, tc := range []struct {
		name    string
		objs    []any
		pod     *corev1.Pod
		want    *workload.GatewayAddress
		wantKey string
	}{
		{"namespace label, workload waypoint", []any{ns("a", useWP("wp")), waypointGW("a", "wp", "workload", "wp.a.svc.cluster.local")},
			pod("a", "p", "10.0.0.1"), hostAddr("a", "wp.a.svc.cluster.local"), "a/wp"},
		{"namespace label, waypoint for all", []any{ns("a", useWP("wp")), waypointGW("a", "wp", "all", "wp.a.svc.cluster.local")},
			pod("a", "p", "10.0.0.1"), hostAddr("a", "wp.a.svc.cluster.local"), "a/wp"},
		{"service-only waypoint does not take workloads", []any{ns("a", useWP("wp")), waypointGW("a", "wp", "", "wp.a.svc.cluster.local")},
			pod("a", "p", "10.0.0.1"), nil, "a/wp"},
		{"pod label wins", []any{ns("a", useWP("wp")), waypointGW("a", "wp", "workload", "wp.a.svc.cluster.local"), waypointGW("a", "wp2", "workload", "wp2.a.svc.cluster.local")},
			pod("a", "p", "10.0.0.1", withLabels("istio.io/use-waypoint", "wp2")), hostAddr("a", "wp2.a.svc.cluster.local"), "a/wp2"},
		{"pod opts out", []any{ns("a", useWP("wp")), waypointGW("a", "wp", "workload", "wp.a.svc.cluster.local")},
			pod("a", "p", "10.0.0.1", withLabels("istio.io/use-waypoint", "none")), nil, ""},
		{"gateway without status address is not ready", []any{ns("a", nil), waypointGW("a", "wp", "workload", "")},
			pod("a", "p", "10.0.0.1", withLabels("istio.io/use-waypoint", "wp")), nil, "a/wp"},
		{"missing gateway", []any{ns("a", nil)}, pod("a", "p", "10.0.0.1", withLabels("istio.io/use-waypoint", "wp")), nil, "a/wp"},
		{"other namespace refused by default (Same)", []any{ns("a", nil), waypointGW("infra", "wp", "workload", "wp.infra.svc.cluster.local")},
			pod("a", "p", "10.0.0.1", withLabels("istio.io/use-waypoint", "wp", "istio.io/use-waypoint-namespace", "infra")), nil, "infra/wp"},
		{"other namespace allowed (All), ns/name form", []any{ns("a", nil), func() any {
			gw := waypointGW("infra", "wp", "workload", "wp.infra.svc.cluster.local")
			from := gatewayFromAll
			gw.Spec.Listeners[0].AllowedRoutes = &gatewayAllowedRoutes{Namespaces: &gatewayRouteNamespaces{From: &from}}
			return gw
		}()}, pod("a", "p", "10.0.0.1", withLabels("istio.io/use-waypoint", "infra/wp")), hostAddr("infra", "wp.infra.svc.cluster.local"), "infra/wp"},
	} {
		objs := append(tc.objs, tc.pod)
		b := world(t, Config{}, objs...)
		got := b.PodWorkload(tc.pod)
		assertProto(t, tc.name+": waypoint", got.Workload.GetWaypoint(), tc.want)
		if got.WaypointKey != tc.wantKey {
			t.Errorf("%s: WaypointKey = %q, want %q", tc.name, got.WaypointKey, tc.wantKey)
		}
	}
	// The waypoint's own pods never point at it.
	inst := pod("a", "wp-123", "10.0.0.2", withLabels("gateway.networking.k8s.io/gateway-name", "wp"))
	b := world(t, Config{}, ns("a", useWP("wp")), waypointGW("a", "wp", "all", "wp.a.svc.cluster.local"), inst)
	if w := b.PodWorkload(inst).Workload; w.Waypoint != nil {
		t.Errorf("waypoint instance got waypoint %v", w.Waypoint)
	}
}

func TestPodWorkload_AuthorizationPolicies(t *testing.T) {
	sel := func(kv ...string) *typev1beta1.WorkloadSelector {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return &typev1beta1.WorkloadSelector{MatchLabels: m}
	}
	p := pod("a", "p", "10.0.0.1", withLabels("app", "web"))
	b := world(t, Config{}, ns("a", nil), p,
		authzPolicy("a", "z-allow-web", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "web")}),
		authzPolicy("a", "b-deny-web", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "web"), Action: securityv1beta1.AuthorizationPolicy_DENY}),
		authzPolicy("a", "other-app", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "db")}),
		authzPolicy("a", "namespace-wide", &securityv1beta1.AuthorizationPolicy{}),
		authzPolicy("a", "custom", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "web"), Action: securityv1beta1.AuthorizationPolicy_CUSTOM}),
		authzPolicy("a", "for-waypoint", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "web"),
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Gateway", Group: "gateway.networking.k8s.io", Name: "wp"}}}),
		authzPolicy("istio-system", "mesh-web", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "web")}),
		authzPolicy("other", "web-elsewhere", &securityv1beta1.AuthorizationPolicy{Selector: sel("app", "web")}),
		peerAuth("a", "ns-strict", 0, nil, "STRICT", nil),
	)
	got := b.PodWorkload(p).Workload.AuthorizationPolicies
	want := []string{"a/b-deny-web", "a/z-allow-web", "istio-system/mesh-web", "istio-system/istio_converted_static_strict"}
	if len(got) != len(want) {
		t.Fatalf("authorization_policies = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("authorization_policies = %v, want %v", got, want)
		}
	}
}
