package model

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/meshlite/meshlite/proto/workload"
)

func TestService_Translation(t *testing.T) {
	base := func(mut ...func(*corev1.Service)) *corev1.Service {
		s := service("shop", "cart", "10.96.0.10", map[string]string{"app": "cart"},
			port(80, intstr.FromString("http")), port(9090, intstr.FromInt32(9091)))
		for _, m := range mut {
			m(s)
		}
		return s
	}
	ports := []*workload.Port{{ServicePort: 80}, {ServicePort: 9090, TargetPort: 9091}}
	zone := &workload.LoadBalancing{Mode: workload.LoadBalancing_FAILOVER, RoutingPreference: []workload.LoadBalancing_Scope{
		workload.LoadBalancing_NETWORK, workload.LoadBalancing_REGION, workload.LoadBalancing_ZONE}}
	for _, tc := range []struct {
		name string
		ns   *corev1.Namespace
		svc  *corev1.Service
		want *workload.Service
	}{
		{"cluster IP", ns("shop", nil), base(), &workload.Service{
			Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: ports,
			IpFamilies: workload.IPFamilies_IPV4_ONLY, Canonical: true}},
		{"dual stack", ns("shop", nil), base(func(s *corev1.Service) {
			s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"}
			s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}
		}), &workload.Service{
			Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}, {Address: ip("fd00:96::10")}}, Ports: ports,
			IpFamilies: workload.IPFamilies_DUAL, Canonical: true}},
		{"headless", ns("shop", nil), base(func(s *corev1.Service) {
			s.Spec.ClusterIP, s.Spec.ClusterIPs = "None", []string{"None"}
		}), &workload.Service{
			Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{}, Ports: ports, IpFamilies: workload.IPFamilies_IPV4_ONLY, Canonical: true}},
		{"internal traffic policy local, not-ready published", ns("shop", nil), base(func(s *corev1.Service) {
			s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
			s.Spec.PublishNotReadyAddresses = true
		}), &workload.Service{
			Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: ports,
			IpFamilies: workload.IPFamilies_IPV4_ONLY, Canonical: true,
			LoadBalancing: &workload.LoadBalancing{Mode: workload.LoadBalancing_STRICT,
				RoutingPreference: []workload.LoadBalancing_Scope{workload.LoadBalancing_NODE},
				HealthPolicy:      workload.LoadBalancing_ALLOW_ALL}}},
		{"traffic distribution PreferClose", ns("shop", nil), base(func(s *corev1.Service) {
			s.Spec.TrafficDistribution = ptr.To("PreferClose")
		}), &workload.Service{
			Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: ports,
			IpFamilies: workload.IPFamilies_IPV4_ONLY, Canonical: true, LoadBalancing: zone}},
		{"traffic distribution from namespace annotation", func() *corev1.Namespace {
			n := ns("shop", nil)
			n.Annotations = map[string]string{"networking.istio.io/traffic-distribution": "PreferSameZone"}
			return n
		}(), base(), &workload.Service{
			Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: ports,
			IpFamilies: workload.IPFamilies_IPV4_ONLY, Canonical: true, LoadBalancing: zone}},
		{"service waypoint from namespace, ingress label", ns("shop", map[string]string{"istio.io/use-waypoint": "waypoint"}),
			base(func(s *corev1.Service) { s.Labels = map[string]string{"istio.io/ingress-use-waypoint": "true"} }),
			&workload.Service{
				Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
				Addresses: []*workload.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: ports,
				IpFamilies: workload.IPFamilies_IPV4_ONLY, Canonical: true, IngressUseWaypoint: true,
				Waypoint: &workload.GatewayAddress{HboneMtlsPort: 15008, Destination: &workload.GatewayAddress_Hostname{
					Hostname: &workload.NamespacedHostname{Namespace: "shop", Hostname: "waypoint.shop.svc.cluster.local"}}}}},
	} {
		b := world(t, Config{}, tc.ns, tc.svc, waypointGW("shop", "waypoint", "", "waypoint.shop.svc.cluster.local"))
		got, err := b.Service(tc.svc)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		assertProto(t, tc.name, got.Service, tc.want)
	}
}

func TestService_PortAppProtocolAsIstioReadsIt(t *testing.T) {
	for _, tc := range []struct {
		name string
		port corev1.ServicePort
		want workload.AppProtocol
	}{
		{"http name", corev1.ServicePort{Name: "http", Port: 80}, workload.AppProtocol_HTTP11},
		{"http- prefix", corev1.ServicePort{Name: "http-web", Port: 8080}, workload.AppProtocol_HTTP11},
		{"case-insensitive", corev1.ServicePort{Name: "GRPC-api", Port: 9000}, workload.AppProtocol_GRPC},
		{"http2", corev1.ServicePort{Name: "http2", Port: 81}, workload.AppProtocol_HTTP2},
		{"https is TLS", corev1.ServicePort{Name: "https", Port: 443}, workload.AppProtocol_TLS},
		{"tls", corev1.ServicePort{Name: "tls-db", Port: 5433}, workload.AppProtocol_TLS},
		{"tcp", corev1.ServicePort{Name: "tcp", Port: 9090}, workload.AppProtocol_TCP},
		{"grpc-web has no value", corev1.ServicePort{Name: "grpc-web", Port: 8081}, workload.AppProtocol_UNKNOWN},
		{"unnamed", corev1.ServicePort{Port: 8080}, workload.AppProtocol_UNKNOWN},
		{"unknown name", corev1.ServicePort{Name: "pg", Port: 5432}, workload.AppProtocol_UNKNOWN},
		{"well-known port, unknown name", corev1.ServicePort{Name: "db", Port: 3306}, workload.AppProtocol_TCP},
		{"well-known port, known name without value", corev1.ServicePort{Name: "mysql", Port: 3306}, workload.AppProtocol_UNKNOWN},
		{"appProtocol wins over the name", corev1.ServicePort{Name: "http", Port: 80, AppProtocol: ptr.To("grpc")}, workload.AppProtocol_GRPC},
		{"kubernetes.io/h2c", corev1.ServicePort{Name: "web", Port: 80, AppProtocol: ptr.To("kubernetes.io/h2c")}, workload.AppProtocol_HTTP2},
		{"kubernetes.io/ws", corev1.ServicePort{Port: 80, AppProtocol: ptr.To("kubernetes.io/ws")}, workload.AppProtocol_HTTP11},
		{"kubernetes.io/wss", corev1.ServicePort{Port: 443, AppProtocol: ptr.To("kubernetes.io/wss")}, workload.AppProtocol_TLS},
		{"UDP never has one", corev1.ServicePort{Name: "http", Port: 53, Protocol: corev1.ProtocolUDP}, workload.AppProtocol_UNKNOWN},
	} {
		if got := appProtocol(tc.port); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
	// And it reaches the Service's ports.
	svc := service("shop", "cart", "10.96.0.10", nil,
		corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}, port(9090, intstr.FromInt32(9090)))
	got, err := world(t, Config{}, ns("shop", nil), svc).Service(svc)
	if err != nil {
		t.Fatal(err)
	}
	if p := got.Service.GetPorts(); len(p) != 2 || p[0].GetAppProtocol() != workload.AppProtocol_HTTP11 || p[1].GetAppProtocol() != workload.AppProtocol_UNKNOWN {
		t.Errorf("service ports %v, want HTTP11 for port http and nothing for p9090", p)
	}
}

func TestService_WaypointExclusionsAndErrors(t *testing.T) {
	wpNS := ns("shop", map[string]string{"istio.io/use-waypoint": "waypoint"})
	gw := waypointGW("shop", "waypoint", "", "waypoint.shop.svc.cluster.local")

	own := service("shop", "waypoint", "10.96.0.99", nil, port(15008, intstr.FromInt32(15008)))
	own.Labels = map[string]string{"gateway.istio.io/managed": "istio.io-mesh-controller"}
	optOut := service("shop", "opt", "10.96.0.98", nil)
	optOut.Labels = map[string]string{"istio.io/use-waypoint": "none"}
	workloadOnly := waypointGW("shop", "wl", "workload", "wl.shop.svc.cluster.local")
	toWorkloadOnly := service("shop", "w", "10.96.0.97", nil)
	toWorkloadOnly.Labels = map[string]string{"istio.io/use-waypoint": "wl"}

	b := world(t, Config{}, wpNS, gw, workloadOnly, own, optOut, toWorkloadOnly)
	for _, s := range []*corev1.Service{own, optOut, toWorkloadOnly} {
		got, err := b.Service(s)
		if err != nil || got.Service.Waypoint != nil {
			t.Errorf("service %s: waypoint %v err %v, want none", s.Name, got.Service.GetWaypoint(), err)
		}
	}
	ext := service("shop", "ext", "", nil)
	ext.Spec.Type = corev1.ServiceTypeExternalName
	if got, err := b.Service(ext); err != nil || got.Service != nil {
		t.Errorf("ExternalName: got %v %v, want nothing", got.Service, err)
	}
	bad := service("shop", "bad", "10.96.0.300", nil)
	if got, err := b.Service(bad); err == nil || got.Service != nil {
		t.Errorf("bad cluster IP: got %v, err %v; want an error", got.Service, err)
	}
}
