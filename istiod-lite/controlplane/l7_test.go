package controlplane

import (
	"context"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	ixds "github.com/meshlite/meshlite/internal/xds"
	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/istiod-lite/model"
	"github.com/meshlite/meshlite/proto/l7"
)

// l7rec keeps the ServiceConfigs a client holds.
type l7rec struct {
	mu        sync.Mutex
	responses int
	configs   map[string]*l7.ServiceConfig
	changed   chan struct{}
}

func newL7Rec() *l7rec {
	return &l7rec{configs: map[string]*l7.ServiceConfig{}, changed: make(chan struct{}, 1)}
}

func (r *l7rec) Apply(typeURL string, res []*discovery.Resource, removed []string) error {
	r.mu.Lock()
	defer func() {
		r.mu.Unlock()
		select {
		case r.changed <- struct{}{}:
		default:
		}
	}()
	if typeURL != l7.TypeURL {
		return nil
	}
	r.responses++
	for _, x := range res {
		sc := &l7.ServiceConfig{}
		if err := x.GetResource().UnmarshalTo(sc); err != nil {
			return err
		}
		r.configs[x.GetName()] = sc
	}
	for _, n := range removed {
		delete(r.configs, n)
	}
	return nil
}

func (r *l7rec) waitFor(t *testing.T, what string, timeout time.Duration, cond func(map[string]*l7.ServiceConfig) bool) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		ok := cond(r.configs)
		r.mu.Unlock()
		if ok {
			t.Logf("%s: %s", what, time.Since(start).Round(time.Millisecond))
			return time.Since(start)
		}
		select {
		case <-r.changed:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("timed out after %s waiting for %s; holds %v", timeout, what, keys(r.configs))
		}
	}
}

func (r *l7rec) names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return keys(r.configs)
}

func waypointNode(ns, sa, gw string) *corev3.Node {
	md, _ := structpb.NewStruct(map[string]any{
		ixds.MetadataNamespace: ns, ixds.MetadataServiceAccount: sa, ixds.MetadataName: gw + "-pod",
		ixds.MetadataClusterID: "Kubernetes", l7.MetadataGatewayName: gw,
	})
	return &corev3.Node{Id: "waypoint~10.244.9.9~" + gw + "-pod." + ns + "~" + ns + ".svc.cluster.local", Metadata: md}
}

func createGateway(t *testing.T, ns, name string) {
	t.Helper()
	if _, err := env.gc.GatewayV1().Gateways(ns).Create(ctxT(t, 10*time.Second), &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// waitSA waits for the waypoint controller to create a Gateway's
// ServiceAccount (the waypoint's identity) and returns a token of it.
func waypointToken(t *testing.T, ns, sa string) string {
	t.Helper()
	poll(t, 10*time.Second, "service account "+sa, func(ctx context.Context) error {
		_, err := env.kc.CoreV1().ServiceAccounts(ns).Get(ctx, sa, metav1.GetOptions{})
		return err
	})
	return token(t, ns, sa, nil, "istio-ca")
}

func TestL7_EachWaypointGetsItsOwnServicesIncrementally(t *testing.T) {
	istiodT()
	ns := "l7"
	namespace(t, ns, map[string]string{"istio.io/use-waypoint": "waypoint"})
	createGateway(t, ns, "waypoint")
	createGateway(t, ns, "other")
	svcs := env.kc.CoreV1().Services(ns)
	for name, lbl := range map[string]map[string]string{"web": nil, "api": {"istio.io/use-waypoint": "other"}} {
		if _, err := svcs.Create(ctxT(t, 10*time.Second), &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: lbl},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	web, api := ns+"/web."+ns+".svc.cluster.local", ns+"/api."+ns+".svc.cluster.local"

	wpRec, otherRec := newL7Rec(), newL7Rec()
	xdsClient(t, waypointToken(t, ns, "waypoint"), waypointNode(ns, "waypoint", "waypoint"), wpRec,
		ixds.Subscription{TypeURL: l7.TypeURL}, ixds.Subscription{TypeURL: ixds.TypeAddress})
	xdsClient(t, waypointToken(t, ns, "other"), waypointNode(ns, "other", "other"), otherRec, ixds.Subscription{TypeURL: l7.TypeURL})

	wpRec.waitFor(t, "waypoint holds web's configuration", 10*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		return m[web] != nil && m[web].GetWaypoint() == ns+"/waypoint"
	})
	otherRec.waitFor(t, "other holds api's configuration", 10*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		return m[api] != nil && m[api].GetWaypoint() == ns+"/other"
	})
	if n := wpRec.names(); len(n) != 1 {
		t.Errorf("waypoint holds %v, want only %s", n, web)
	}
	if n := otherRec.names(); len(n) != 1 {
		t.Errorf("other holds %v, want only %s", n, api)
	}

	// An HTTPRoute on web reaches its waypoint only.
	// GAMMA: group "" (the CRD defaults an omitted group to the Gateway
	// API's, which is not a Service).
	kind, core := gatewayv1.Kind("Service"), gatewayv1.Group("")
	port := gatewayv1.PortNumber(80)
	if _, err := env.gc.GatewayV1().HTTPRoutes(ns).Create(ctxT(t, 10*time.Second), &gatewayv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "web-split"},
		Spec: gatewayv1.HTTPRouteSpec{
			CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Group: &core, Kind: &kind, Name: "web"}}},
			Rules: []gatewayv1.HTTPRouteRule{{BackendRefs: []gatewayv1.HTTPBackendRef{
				{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Name: "api", Port: &port}, Weight: ptrTo[int32](10)}},
			}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	took := wpRec.waitFor(t, "the route pushed to web's waypoint", 5*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		rts := m[web].GetHttpRoutes()
		return len(rts) == 1 && rts[0].GetRules()[0].GetBackendRefs()[0].GetWeight() == 10
	})
	if took > 2*time.Second {
		t.Errorf("route push took %s", took)
	}

	// A TrafficPolicy on web: its rate limit arrives.
	tp := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "policy.meshlite.io/v1alpha1", "kind": "TrafficPolicy",
		"metadata": map[string]any{"name": "web-limit", "namespace": ns},
		"spec": map[string]any{
			"targetRefs": []any{map[string]any{"kind": "Service", "name": "web"}},
			"rateLimit":  map[string]any{"requestsPerSecond": int64(10)},
		},
	}}
	if _, err := env.dc.Resource(policyv1alpha1.Resource).Namespace(ns).Create(ctxT(t, 10*time.Second), tp, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wpRec.waitFor(t, "the rate limit pushed", 5*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		return m[web].GetResilience().GetRateLimit().GetRequestsPerSecond() == 10
	})
	// The CRD refuses a policy without any part.
	bad := tp.DeepCopy()
	bad.SetName("empty")
	delete(bad.Object["spec"].(map[string]any), "rateLimit")
	if _, err := env.dc.Resource(policyv1alpha1.Resource).Namespace(ns).Create(ctxT(t, 10*time.Second), bad, metav1.CreateOptions{}); err == nil {
		t.Error("a TrafficPolicy setting nothing was accepted")
	}

	// An L7 AuthorizationPolicy targeting the Gateway applies to web.
	ap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "deny-admin", "namespace": ns},
		"spec": map[string]any{
			"targetRefs": []any{map[string]any{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}},
			"action":     "DENY",
			"rules":      []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"paths": []any{"/admin"}}}}}},
		},
	}}
	if _, err := env.dc.Resource(model.AuthorizationPolicyGVR).Namespace(ns).Create(ctxT(t, 10*time.Second), ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wpRec.waitFor(t, "the L7 policy pushed", 5*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		p := m[web].GetAuthorizationPolicies()
		return len(p) == 1 && p[0].GetName() == "deny-admin" && p[0].GetRules()[0].GetTo()[0].GetPaths()[0] == "/admin"
	})

	// web moves to the other waypoint: removed from one, sent to the other.
	patch := []byte(`{"metadata":{"labels":{"istio.io/use-waypoint":"other"}}}`)
	if _, err := svcs.Patch(ctxT(t, 10*time.Second), "web", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	wpRec.waitFor(t, "web removed from its old waypoint", 5*time.Second, func(m map[string]*l7.ServiceConfig) bool { return m[web] == nil })
	otherRec.waitFor(t, "web sent to its new waypoint", 5*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		return m[web] != nil && m[web].GetWaypoint() == ns+"/other" && len(m[web].GetHttpRoutes()) == 1
	})

	// A ztunnel asking for the type gets nothing of it.
	zt, _ := ztunnelToken(t, "node-a", "ztunnel-l7", "10.244.9.200")
	zrec := newL7Rec()
	c := xdsClient(t, zt, node("ztunnel~l7", "istio-system", "ztunnel"), zrec, ixds.Subscription{TypeURL: l7.TypeURL})
	<-c.Synced()
	if n := zrec.names(); len(n) != 0 {
		t.Errorf("a ztunnel received waypoint configuration %v", n)
	}
}

// A waypoint may only ask for its own Gateway's configuration: the token
// must be the Gateway's service account.
func TestL7_WaypointOfAnotherGatewayIsRefused(t *testing.T) {
	istiodT()
	ns := "l7-authn"
	namespace(t, ns, nil)
	createGateway(t, ns, "waypoint")
	serviceAccount(t, ns, "impostor")
	tok := token(t, ns, "impostor", nil, "istio-ca")
	err := rawWaypointStream(t, tok, waypointNode(ns, "impostor", "waypoint"))
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("impostor claiming Gateway waypoint: %v, want PermissionDenied", err)
	}
	md, _ := structpb.NewStruct(map[string]any{ixds.MetadataNamespace: ns, ixds.MetadataServiceAccount: "impostor"})
	err = rawWaypointStream(t, tok, &corev3.Node{Id: "waypoint~10.0.0.1~x." + ns + "~" + ns + ".svc.cluster.local", Metadata: md})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("waypoint without GATEWAY_NAME: %v, want InvalidArgument", err)
	}
	if err := rawWaypointStream(t, waypointToken(t, ns, "waypoint"), waypointNode(ns, "waypoint", "waypoint")); err != nil {
		t.Errorf("the Gateway's own waypoint refused: %v", err)
	}
}

func rawWaypointStream(t *testing.T, tok string, n *corev3.Node) error {
	t.Helper()
	cc, err := grpc.NewClient(istiodT().GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(clientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := metadata.AppendToOutgoingContext(ctxT(t, 10*time.Second), "authorization", "Bearer "+tok)
	st, err := discovery.NewAggregatedDiscoveryServiceClient(cc).DeltaAggregatedResources(ctx)
	if err != nil {
		return err
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: l7.TypeURL, Node: n}); err != nil {
		_, err = st.Recv()
		return err
	}
	_, err = st.Recv()
	return err
}
