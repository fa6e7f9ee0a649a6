package model

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
)

// world builds a Builder over a Store holding objs.
func world(t *testing.T, cfg Config, objs ...any) *Builder {
	t.Helper()
	s := NewStore()
	for _, o := range objs {
		switch o := o.(type) {
		case *corev1.Namespace:
			s.SetNamespace(o)
		case *corev1.Node:
			s.SetNode(o)
		case *corev1.Pod:
			s.SetPod(o)
		case *corev1.Service:
			s.SetService(o)
		case *discoveryv1.EndpointSlice:
			s.SetEndpointSlice(o)
		case *gatewayv1.Gateway:
			s.SetGateway(o)
		case *AuthorizationPolicy:
			s.SetAuthorizationPolicy(o)
		case *PeerAuthentication:
			s.SetPeerAuthentication(o)
		case *gatewayv1.HTTPRoute:
			s.SetHTTPRoute(o)
		case *gatewayv1.GRPCRoute:
			s.SetGRPCRoute(o)
		case *policyv1alpha1.TrafficPolicy:
			s.SetTrafficPolicy(o)
		case *gatewayv1beta1.ReferenceGrant:
			s.SetReferenceGrant(o)
		default:
			t.Fatalf("world: unsupported object %T", o)
		}
	}
	return NewBuilder(cfg, s)
}

func ns(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

type podOpt func(*corev1.Pod)

func pod(ns, name, ip string, opts ...podOpt) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name)},
		Spec: corev1.PodSpec{
			NodeName:           "node-a",
			ServiceAccountName: "sa-" + name,
			Containers: []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP},
			}}},
		},
		Status: corev1.PodStatus{
			Phase:      corev1.PodRunning,
			PodIP:      ip,
			PodIPs:     []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

func withLabels(kv ...string) podOpt {
	return func(p *corev1.Pod) {
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Labels[kv[i]] = kv[i+1]
		}
	}
}

func annotations(kv ...string) podOpt {
	return func(p *corev1.Pod) {
		if p.Annotations == nil {
			p.Annotations = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Annotations[kv[i]] = kv[i+1]
		}
	}
}

func service(ns, name, vip string, selector map[string]string, ports ...corev1.ServicePort) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  vip,
			ClusterIPs: []string{vip},
			Selector:   selector,
			Ports:      ports,
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
		},
	}
	return s
}

func port(p int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: fmt.Sprintf("p%d", p), Port: p, TargetPort: target, Protocol: corev1.ProtocolTCP}
}

func waypointGW(ns, name, trafficFor, statusHost string) *gatewayv1.Gateway {
	gw := &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gatewayv1.GatewaySpec{
			GatewayClassName: "istio-waypoint",
			Listeners:        []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	}
	if trafficFor != "" {
		gw.Labels = map[string]string{"istio.io/waypoint-for": trafficFor}
	}
	if statusHost != "" {
		ht := gatewayv1.HostnameAddressType
		gw.Status.Addresses = []gatewayv1.GatewayStatusAddress{{Type: &ht, Value: statusHost}}
	}
	return gw
}

func authzPolicy(ns, name string, spec *securityv1beta1.AuthorizationPolicy) *AuthorizationPolicy {
	return &AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: spec}
}

var epoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

func peerAuth(ns, name string, age int, sel map[string]string, mode string, ports map[uint32]string) *PeerAuthentication {
	spec := &securityv1beta1.PeerAuthentication{}
	if sel != nil {
		spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: sel}
	}
	if mode != "" {
		spec.Mtls = &securityv1beta1.PeerAuthentication_MutualTLS{Mode: securityv1beta1.PeerAuthentication_MutualTLS_Mode(securityv1beta1.PeerAuthentication_MutualTLS_Mode_value[mode])}
	}
	if ports != nil {
		spec.PortLevelMtls = map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{}
		for p, m := range ports {
			spec.PortLevelMtls[p] = &securityv1beta1.PeerAuthentication_MutualTLS{Mode: securityv1beta1.PeerAuthentication_MutualTLS_Mode(securityv1beta1.PeerAuthentication_MutualTLS_Mode_value[m])}
		}
	}
	return &PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, CreationTimestamp: metav1.NewTime(epoch.Add(time.Duration(age) * time.Minute))},
		Spec:       spec,
	}
}

func assertProto(t *testing.T, what string, got, want proto.Message) {
	t.Helper()
	if !proto.Equal(got, want) {
		t.Errorf("%s differs\n got: %s\nwant: %s", what, prototext.Format(got), prototext.Format(want))
	}
}

type (
	gatewayAllowedRoutes   = gatewayv1.AllowedRoutes
	gatewayRouteNamespaces = gatewayv1.RouteNamespaces
)

var gatewayFromAll = gatewayv1.NamespacesFromAll
