package workloadapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/netip"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
	istioworkload "istio.io/istio/pkg/workloadapi"
	istiosecurity "istio.io/istio/pkg/workloadapi/security"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"

	ixds "github.com/meshlite/meshlite/internal/xds"
)

const ns = "interop"

var (
	gatewayGVR  = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}
	authzGVR    = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	peerAuthGVR = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"}
)

// TestLinksOnlyIstiosWorkloadTypes guards the premise of this package: the
// names istio.workload.* and istio.security.* resolve to Istio's generated
// Go types, so none of meshlite's proto packages was linked in (they would
// register the same names; see the package doc).
func TestLinksOnlyIstiosWorkloadTypes(t *testing.T) {
	for name, want := range map[protoreflect.FullName]proto.Message{
		"istio.workload.Address":       &istioworkload.Address{},
		"istio.workload.Workload":      &istioworkload.Workload{},
		"istio.security.Authorization": &istiosecurity.Authorization{},
	} {
		mt, err := protoregistry.GlobalTypes.FindMessageByName(name)
		if err != nil {
			t.Errorf("%s not registered: %v", name, err)
			continue
		}
		if got := reflect.TypeOf(mt.Zero().Interface()); got != reflect.TypeOf(want) {
			t.Errorf("%s is registered by %v, want Istio's %T", name, got, want)
		}
	}
}

// held is what the client holds: the raw Any of every resource.
type held struct {
	mu      sync.Mutex
	raw     map[string]map[string][]byte // type URL -> name -> Any.value
	badType []string
	changed chan struct{}
}

func (h *held) Apply(typeURL string, res []*discovery.Resource, removed []string) error {
	h.mu.Lock()
	defer func() {
		h.mu.Unlock()
		select {
		case h.changed <- struct{}{}:
		default:
		}
	}()
	m := h.raw[typeURL]
	if m == nil {
		m = map[string][]byte{}
		h.raw[typeURL] = m
	}
	for _, r := range res {
		if got := r.GetResource().GetTypeUrl(); got != typeURL {
			h.badType = append(h.badType, fmt.Sprintf("%s: Any type %q in a %s response", r.GetName(), got, typeURL))
		}
		m[r.GetName()] = r.GetResource().GetValue()
	}
	for _, n := range removed {
		delete(m, n)
	}
	return nil
}

// decode turns the held bytes into Istio's messages.
func (h *held) decode() (map[string]*istioworkload.Address, map[string]*istiosecurity.Authorization, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	addrs := map[string]*istioworkload.Address{}
	for n, b := range h.raw[ixds.TypeAddress] {
		a := &istioworkload.Address{}
		if err := proto.Unmarshal(b, a); err != nil {
			return nil, nil, fmt.Errorf("Istio's Address cannot decode %s: %w", n, err)
		}
		addrs[n] = a
	}
	pols := map[string]*istiosecurity.Authorization{}
	for n, b := range h.raw[ixds.TypeAuthorization] {
		p := &istiosecurity.Authorization{}
		if err := proto.Unmarshal(b, p); err != nil {
			return nil, nil, fmt.Errorf("Istio's Authorization cannot decode %s: %w", n, err)
		}
		pols[n] = p
	}
	return addrs, pols, nil
}

func TestDeltaADS_DecodesFieldByFieldWithIstiosTypes(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	objs := createScenario(t, ctx)
	wantAddrs, wantPols := expected(objs)

	h := &held{raw: map[string]map[string][]byte{}, changed: make(chan struct{}, 1)}
	pool := x509.NewCertPool()
	pool.AddCert(env.root)
	tok := token(t, "istio-system", "ztunnel")
	md, _ := structpb.NewStruct(map[string]any{"NAMESPACE": "istio-system", "SERVICE_ACCOUNT": "ztunnel", "CLUSTER_ID": "Kubernetes"})
	c, err := ixds.NewClient(ixds.ClientConfig{
		Target:        env.grpcAddr,
		TLS:           &tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS13},
		Token:         func(context.Context) (string, error) { return tok, nil },
		Node:          &corev3.Node{Id: "ztunnel~10.0.0.10~ztunnel-interop.istio-system~istio-system.svc.cluster.local", Metadata: md},
		Subscriptions: []ixds.Subscription{{TypeURL: ixds.TypeAddress}, {TypeURL: ixds.TypeAuthorization}},
		Handler:       h,
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(runCtx) }()
	defer func() { stop(); <-done }()

	// Wait until the client holds the final form of every resource (the
	// objects were created moments ago; their pushes may still come).
	var addrs map[string]*istioworkload.Address
	var pols map[string]*istiosecurity.Authorization
	diff := func() string {
		var out []string
		for n, w := range wantAddrs {
			if d := cmp.Diff(w, addrs[n], protocmp.Transform()); d != "" {
				out = append(out, fmt.Sprintf("Address %s (-want +got):\n%s", n, d))
			}
		}
		for n, w := range wantPols {
			if d := cmp.Diff(w, pols[n], protocmp.Transform()); d != "" {
				out = append(out, fmt.Sprintf("Authorization %s (-want +got):\n%s", n, d))
			}
		}
		sort.Strings(out)
		return strings.Join(out, "\n")
	}
	deadline := time.After(15 * time.Second)
	for {
		addrs, pols, err = h.decode()
		if err != nil {
			t.Fatal(err)
		}
		d := diff()
		if d == "" {
			break
		}
		select {
		case <-h.changed:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatalf("decoded with Istio's types, the resources differ from what Kubernetes says:\n%s", d)
		}
	}

	// Every resource held, ours or the cluster's, decodes without a field
	// Istio does not know, and carries its own type URL.
	h.mu.Lock()
	for _, b := range h.badType {
		t.Error(b)
	}
	h.mu.Unlock()
	for n, a := range addrs {
		for _, u := range unknownFields(a.ProtoReflect(), "Address") {
			t.Errorf("%s: field unknown to Istio at %s", n, u)
		}
		// The resource name is what Istio names it.
		switch x := a.GetType().(type) {
		case *istioworkload.Address_Workload:
			if n != x.Workload.GetUid() {
				t.Errorf("workload %s sent under name %s", x.Workload.GetUid(), n)
			}
		case *istioworkload.Address_Service:
			if want := x.Service.GetNamespace() + "/" + x.Service.GetHostname(); n != want {
				t.Errorf("service %s sent under name %s", want, n)
			}
		default:
			t.Errorf("%s: Address with neither a workload nor a service", n)
		}
	}
	for n, p := range pols {
		for _, u := range unknownFields(p.ProtoReflect(), "Authorization") {
			t.Errorf("%s: field unknown to Istio at %s", n, u)
		}
		if want := p.GetNamespace() + "/" + p.GetName(); n != want {
			t.Errorf("policy %s sent under name %s", want, n)
		}
	}
	t.Logf("%d addresses and %d policies decoded with Istio's types; %d of them checked field by field",
		len(addrs), len(pols), len(wantAddrs)+len(wantPols))
}

// unknownFields lists the paths of messages that carry unknown fields.
func unknownFields(m protoreflect.Message, path string) []string {
	var out []string
	if len(m.GetUnknown()) > 0 {
		out = append(out, path)
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		p := path + "." + string(fd.Name())
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					out = append(out, unknownFields(mv.Message(), p+"["+k.String()+"]")...)
					return true
				})
			}
		case fd.IsList():
			if fd.Message() != nil {
				for i := 0; i < v.List().Len(); i++ {
					out = append(out, unknownFields(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", p, i))...)
				}
			}
		case fd.Message() != nil:
			out = append(out, unknownFields(v.Message(), p)...)
		}
		return true
	})
	return out
}

// scenario is the Kubernetes objects as the API stored them.
type scenario struct {
	pods     map[string]*corev1.Pod
	services map[string]*corev1.Service
}

func createScenario(t *testing.T, ctx context.Context) scenario {
	t.Helper()
	kc := env.kc
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
		Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, sa := range []string{"web", "host"} {
		if _, err := kc.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	apply := func(gvr schema.GroupVersionResource, o map[string]any) *unstructured.Unstructured {
		t.Helper()
		u, err := env.dc.Resource(gvr).Namespace(o["metadata"].(map[string]any)["namespace"].(string)).
			Create(ctx, &unstructured.Unstructured{Object: o}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create %s: %v", gvr.Resource, err)
		}
		return u
	}

	// A waypoint with an address, for the service that asks for it.
	gw := apply(gatewayGVR, map[string]any{
		"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
		"metadata": map[string]any{"name": "waypoint", "namespace": ns},
		"spec": map[string]any{"gatewayClassName": "istio-waypoint",
			"listeners": []any{map[string]any{"name": "mesh", "port": int64(15008), "protocol": "HBONE"}}},
	})
	gw.Object["status"] = map[string]any{"addresses": []any{map[string]any{"type": "Hostname", "value": "waypoint." + ns + ".svc.cluster.local"}}}
	if _, err := env.dc.Resource(gatewayGVR).Namespace(ns).UpdateStatus(ctx, gw, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Policies: a selector ALLOW with every L4 attribute, an ALLOW with
	// only an HTTP attribute (so it never matches), a namespace DENY, a
	// mesh-wide DENY, and namespace-wide STRICT mTLS.
	apply(authzGVR, map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "allow-front", "namespace": ns},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "web"}},
			"rules": []any{map[string]any{
				"from": []any{map[string]any{"source": map[string]any{
					"principals": []any{"cluster.local/ns/front/sa/front"}, "namespaces": []any{"front*"},
					"ipBlocks": []any{"10.0.0.0/8", "192.168.1.1"}, "notPrincipals": []any{"*/sa/banned"},
				}}},
				"to": []any{
					map[string]any{"operation": map[string]any{"ports": []any{"80", "8080"}}},
					map[string]any{"operation": map[string]any{"notPorts": []any{"9090"}}},
				},
				"when": []any{
					map[string]any{"key": "source.namespace", "values": []any{"front"}},
					map[string]any{"key": "destination.port", "notValues": []any{"22"}},
				},
			}},
		},
	})
	apply(authzGVR, map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "l7-only", "namespace": ns},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "web"}},
			"rules":    []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"methods": []any{"GET"}}}}}},
		},
	})
	apply(authzGVR, map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "deny-ns", "namespace": ns},
		"spec": map[string]any{
			"action": "DENY",
			"rules": []any{map[string]any{"from": []any{
				map[string]any{"source": map[string]any{"notNamespaces": []any{ns}}},
				map[string]any{"source": map[string]any{"serviceAccounts": []any{"web", "other/sa"}}},
			}}},
		},
	})
	apply(authzGVR, map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "mesh-deny", "namespace": "istio-system"},
		"spec": map[string]any{
			"action": "DENY",
			"rules": []any{map[string]any{
				"to":   []any{map[string]any{"operation": map[string]any{"ports": []any{"9999"}}}},
				"from": []any{map[string]any{"source": map[string]any{"notIpBlocks": []any{"fd00::/8"}}}},
			}},
		},
	})
	apply(peerAuthGVR, map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
		"metadata": map[string]any{"name": "default", "namespace": ns},
		"spec":     map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
	})

	s := scenario{pods: map[string]*corev1.Pod{}, services: map[string]*corev1.Service{}}
	ports := []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}
	for _, p := range []struct {
		pod   *corev1.Pod
		ip    string
		ready bool
	}{
		// Enrolled (namespace label) and confirmed by the CNI: HBONE.
		{&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "web-1",
				Labels:      map[string]string{"app": "web", "version": "v1", "service.istio.io/workload-name": "web-deploy"},
				Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"}},
			Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "web", Containers: []corev1.Container{{Name: "app", Image: "app", Ports: ports}}},
		}, "10.244.1.10", true},
		// Not confirmed and not ready.
		{&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "web-2", Labels: map[string]string{"app": "web",
				"service.istio.io/canonical-name": "webapp", "service.istio.io/canonical-revision": "v2"}},
			Spec: corev1.PodSpec{NodeName: "node-b", ServiceAccountName: "web", Containers: []corev1.Container{{Name: "app", Image: "app", Ports: ports}}},
		}, "10.244.2.10", false},
		// Host network (the CNI never captures these).
		{&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "host", Labels: map[string]string{"app": "host"}},
			Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "host", HostNetwork: true,
				Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{{Name: "https", ContainerPort: 8443}}}}},
		}, "10.0.0.11", true},
	} {
		got, err := kc.CoreV1().Pods(ns).Create(ctx, p.pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ready := corev1.ConditionFalse
		if p.ready {
			ready = corev1.ConditionTrue
		}
		got.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.ip, PodIPs: []corev1.PodIP{{IP: p.ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: ready}}}
		if got, err = kc.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		s.pods[got.Name] = got
	}

	preferClose := corev1.ServiceTrafficDistributionPreferClose
	local := corev1.ServiceInternalTrafficPolicyLocal
	for _, svc := range []*corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "web"}, Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"}, TrafficDistribution: &preferClose,
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
				{Name: "tcp", Port: 9090, TargetPort: intstr.FromInt32(9090)},
			}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "local"}, Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "host"}, InternalTrafficPolicy: &local, PublishNotReadyAddresses: true,
			Ports: []corev1.ServicePort{{Name: "https", Port: 8443, TargetPort: intstr.FromInt32(8443)}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "bound", Labels: map[string]string{"istio.io/use-waypoint": "waypoint", "istio.io/ingress-use-waypoint": "true"}},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "nothing"},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}},
		// No selector: its endpoint comes from a hand-made EndpointSlice.
		{ObjectMeta: metav1.ObjectMeta{Name: "ext"}, Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "pg", Port: 5432, TargetPort: intstr.FromInt32(5432)}}}},
	} {
		got, err := kc.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.services[got.Name] = got
	}
	tcp := corev1.ProtocolTCP
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "ext-1", Labels: map[string]string{discoveryv1.LabelServiceName: "ext"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"192.168.50.5"}, Conditions: discoveryv1.EndpointConditions{Ready: ptrTo(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptrTo("pg"), Port: ptrTo[int32](5432), Protocol: &tcp}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return s
}

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func exact(s string) *istiosecurity.StringMatch {
	return &istiosecurity.StringMatch{MatchType: &istiosecurity.StringMatch_Exact{Exact: s}}
}

// expected is what Istio's ambient model says the scenario's objects are,
// written from the Kubernetes objects with Istio's types: Workload per pod
// (and per non-pod EndpointSlice address), Service per Service,
// Authorization per L4 AuthorizationPolicy, plus the static STRICT policy.
func expected(s scenario) (map[string]*istioworkload.Address, map[string]*istiosecurity.Authorization) {
	host := func(svc string) string { return svc + "." + ns + ".svc.cluster.local" }
	key := func(svc string) string { return ns + "/" + host(svc) }
	uid := func(pod string) string { return "Kubernetes//Pod/" + ns + "/" + pod }
	vip := func(svc string) []*istioworkload.NetworkAddress {
		return []*istioworkload.NetworkAddress{{Address: ip(s.services[svc].Spec.ClusterIP)}}
	}
	nodeA := &istioworkload.Locality{Region: "region-1", Zone: "zone-1a", Subzone: "rack-7"}
	strict := "istio-system/istio_converted_static_strict"
	webPorts := &istioworkload.PortList{Ports: []*istioworkload.Port{{ServicePort: 80, TargetPort: 8080}, {ServicePort: 9090, TargetPort: 9090}}}
	webPolicies := []string{ns + "/allow-front", ns + "/l7-only", strict}

	wl := func(w *istioworkload.Workload) *istioworkload.Address {
		w.Namespace, w.ClusterId = ns, "Kubernetes"
		return &istioworkload.Address{Type: &istioworkload.Address_Workload{Workload: w}}
	}
	sv := func(svc *istioworkload.Service) *istioworkload.Address {
		svc.Namespace, svc.Hostname, svc.IpFamilies, svc.Canonical = ns, host(svc.Name), istioworkload.IPFamilies_IPV4_ONLY, true
		svc.Addresses = vip(svc.Name)
		return &istioworkload.Address{Type: &istioworkload.Address_Service{Service: svc}}
	}
	addrs := map[string]*istioworkload.Address{
		uid("web-1"): wl(&istioworkload.Workload{
			Uid: uid("web-1"), Name: "web-1", Addresses: [][]byte{ip("10.244.1.10")},
			ServiceAccount: "web", Node: "node-a", Locality: nodeA,
			CanonicalName: "web", CanonicalRevision: "v1", WorkloadName: "web-deploy", WorkloadType: istioworkload.WorkloadType_POD,
			Status: istioworkload.WorkloadStatus_HEALTHY, TunnelProtocol: istioworkload.TunnelProtocol_HBONE,
			Services: map[string]*istioworkload.PortList{key("web"): webPorts}, AuthorizationPolicies: webPolicies,
		}),
		uid("web-2"): wl(&istioworkload.Workload{
			Uid: uid("web-2"), Name: "web-2", Addresses: [][]byte{ip("10.244.2.10")},
			ServiceAccount: "web", Node: "node-b",
			CanonicalName: "webapp", CanonicalRevision: "v2", WorkloadName: "web-2", WorkloadType: istioworkload.WorkloadType_POD,
			Status: istioworkload.WorkloadStatus_UNHEALTHY, TunnelProtocol: istioworkload.TunnelProtocol_NONE,
			Services: map[string]*istioworkload.PortList{key("web"): webPorts}, AuthorizationPolicies: webPolicies,
		}),
		uid("host"): wl(&istioworkload.Workload{
			Uid: uid("host"), Name: "host", Addresses: [][]byte{ip("10.0.0.11")},
			ServiceAccount: "host", Node: "node-a", Locality: nodeA, NetworkMode: istioworkload.NetworkMode_HOST_NETWORK,
			CanonicalName: "host", CanonicalRevision: "latest", WorkloadName: "host", WorkloadType: istioworkload.WorkloadType_POD,
			Status: istioworkload.WorkloadStatus_HEALTHY, TunnelProtocol: istioworkload.TunnelProtocol_NONE,
			Services:              map[string]*istioworkload.PortList{key("local"): {Ports: []*istioworkload.Port{{ServicePort: 8443, TargetPort: 8443}}}},
			AuthorizationPolicies: []string{strict},
		}),
		"Kubernetes/discovery.k8s.io/EndpointSlice/" + ns + "/ext-1/192.168.50.5": wl(&istioworkload.Workload{
			Uid: "Kubernetes/discovery.k8s.io/EndpointSlice/" + ns + "/ext-1/192.168.50.5", Name: "ext-1",
			Addresses: [][]byte{ip("192.168.50.5")}, Status: istioworkload.WorkloadStatus_HEALTHY,
			NetworkMode: istioworkload.NetworkMode_HOST_NETWORK,
			Services:    map[string]*istioworkload.PortList{key("ext"): {Ports: []*istioworkload.Port{{ServicePort: 5432, TargetPort: 5432}}}},
		}),
		key("web"): sv(&istioworkload.Service{Name: "web",
			// A named target port resolves per workload; the service says 0.
			// The application protocol comes from the port name's prefix.
			Ports: []*istioworkload.Port{{ServicePort: 80, TargetPort: 0, AppProtocol: istioworkload.AppProtocol_HTTP11},
				{ServicePort: 9090, TargetPort: 9090, AppProtocol: istioworkload.AppProtocol_TCP}},
			LoadBalancing: &istioworkload.LoadBalancing{
				RoutingPreference: []istioworkload.LoadBalancing_Scope{istioworkload.LoadBalancing_NETWORK, istioworkload.LoadBalancing_REGION, istioworkload.LoadBalancing_ZONE},
				Mode:              istioworkload.LoadBalancing_FAILOVER,
			},
		}),
		key("local"): sv(&istioworkload.Service{Name: "local",
			Ports: []*istioworkload.Port{{ServicePort: 8443, TargetPort: 8443, AppProtocol: istioworkload.AppProtocol_TLS}},
			LoadBalancing: &istioworkload.LoadBalancing{
				RoutingPreference: []istioworkload.LoadBalancing_Scope{istioworkload.LoadBalancing_NODE},
				Mode:              istioworkload.LoadBalancing_STRICT,
				HealthPolicy:      istioworkload.LoadBalancing_ALLOW_ALL,
			},
		}),
		key("bound"): sv(&istioworkload.Service{Name: "bound",
			Ports: []*istioworkload.Port{{ServicePort: 80, TargetPort: 8080, AppProtocol: istioworkload.AppProtocol_HTTP11}},
			Waypoint: &istioworkload.GatewayAddress{
				Destination: &istioworkload.GatewayAddress_Hostname{Hostname: &istioworkload.NamespacedHostname{
					Namespace: ns, Hostname: "waypoint." + ns + ".svc.cluster.local"}},
				HboneMtlsPort: 15008,
			},
			IngressUseWaypoint: true,
		}),
		// "pg" names no protocol Istio knows.
		key("ext"): sv(&istioworkload.Service{Name: "ext",
			Ports: []*istioworkload.Port{{ServicePort: 5432, TargetPort: 5432}}}),
	}

	presence := &istiosecurity.StringMatch{MatchType: &istiosecurity.StringMatch_Presence{Presence: &emptypb.Empty{}}}
	rules := func(ms ...*istiosecurity.Match) *istiosecurity.Rules { return &istiosecurity.Rules{Matches: ms} }
	pols := map[string]*istiosecurity.Authorization{
		ns + "/allow-front": {Name: "allow-front", Namespace: ns, Scope: istiosecurity.Scope_WORKLOAD_SELECTOR, Action: istiosecurity.Action_ALLOW,
			Groups: []*istiosecurity.Group{{Rules: []*istiosecurity.Rules{
				rules(&istiosecurity.Match{DestinationPorts: []uint32{80, 8080}}, &istiosecurity.Match{NotDestinationPorts: []uint32{9090}}),
				rules(&istiosecurity.Match{
					SourceIps:     []*istiosecurity.Address{{Address: ip("10.0.0.0"), Length: 8}, {Address: ip("192.168.1.1"), Length: 32}},
					Namespaces:    []*istiosecurity.StringMatch{{MatchType: &istiosecurity.StringMatch_Prefix{Prefix: "front"}}},
					Principals:    []*istiosecurity.StringMatch{exact("cluster.local/ns/front/sa/front")},
					NotPrincipals: []*istiosecurity.StringMatch{{MatchType: &istiosecurity.StringMatch_Suffix{Suffix: "/sa/banned"}}},
				}),
				rules(&istiosecurity.Match{Namespaces: []*istiosecurity.StringMatch{exact("front")}}),
				rules(&istiosecurity.Match{NotDestinationPorts: []uint32{22}}),
			}}}},
		// Its only rule needs HTTP: dropped, so the policy matches nothing.
		ns + "/l7-only": {Name: "l7-only", Namespace: ns, Scope: istiosecurity.Scope_WORKLOAD_SELECTOR, Action: istiosecurity.Action_ALLOW},
		ns + "/deny-ns": {Name: "deny-ns", Namespace: ns, Scope: istiosecurity.Scope_NAMESPACE, Action: istiosecurity.Action_DENY,
			Groups: []*istiosecurity.Group{{Rules: []*istiosecurity.Rules{rules(
				&istiosecurity.Match{NotNamespaces: []*istiosecurity.StringMatch{exact(ns)}},
				&istiosecurity.Match{ServiceAccounts: []*istiosecurity.ServiceAccountMatch{
					{Namespace: ns, ServiceAccount: "web"}, {Namespace: "other", ServiceAccount: "sa"}}},
			)}}}},
		"istio-system/mesh-deny": {Name: "mesh-deny", Namespace: "istio-system", Scope: istiosecurity.Scope_GLOBAL, Action: istiosecurity.Action_DENY,
			Groups: []*istiosecurity.Group{{Rules: []*istiosecurity.Rules{
				rules(&istiosecurity.Match{DestinationPorts: []uint32{9999}}),
				rules(&istiosecurity.Match{NotSourceIps: []*istiosecurity.Address{{Address: ip("fd00::"), Length: 8}}}),
			}}}},
		strict: {Name: "istio_converted_static_strict", Namespace: "istio-system", Scope: istiosecurity.Scope_WORKLOAD_SELECTOR,
			Action: istiosecurity.Action_DENY,
			Groups: []*istiosecurity.Group{{Rules: []*istiosecurity.Rules{rules(&istiosecurity.Match{NotPrincipals: []*istiosecurity.StringMatch{presence}})}}}},
	}
	return addrs, pols
}
