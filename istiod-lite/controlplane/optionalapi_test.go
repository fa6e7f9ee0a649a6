package controlplane

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/e2e/cluster"
	ixds "github.com/meshlite/meshlite/internal/xds"
	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/istiod-lite/registry"
	"github.com/meshlite/meshlite/proto/l7"
)

// onClusterWithout starts a second Kubernetes control plane without the
// CRDs of groups and an istiod-lite on it, and points env (clients, the
// istiod-lite the helpers dial) at them until the test's cleanups have run;
// the package's tests do not run in parallel, so nothing else sees it.
func onClusterWithout(t *testing.T, groups ...string) {
	t.Helper()
	istiodT() // the shared istiod-lite is started on the shared cluster first
	saved := env
	t.Cleanup(func() { env = saved }) // runs last: after the helpers' cleanups
	bin, _ := filepath.Abs(filepath.Join("..", "..", ".cache", "kube", cluster.KubeVersion))
	ctx := ctxT(t, 3*time.Minute)
	l, err := cluster.Start(ctx, cluster.Config{
		Dir: t.TempDir(), BinDir: bin, HostIP: netip.MustParseAddr("127.0.0.1"),
		ServiceCIDR: netip.MustParsePrefix("10.96.0.0/16"), ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16"),
		APIServerPort: freePort(), EtcdClientPort: freePort(), EtcdPeerPort: freePort(),
		SkipCRDGroups: groups,
	})
	t.Cleanup(func() { _ = cluster.Stop(l) })
	if err != nil {
		t.Fatalf("start a control plane without %v: %v", groups, err)
	}
	env.layout = l
	if env.rc, err = cluster.RESTConfig(l.AdminKubeconfig); err != nil {
		t.Fatal(err)
	}
	env.kc = kubernetes.NewForConfigOrDie(env.rc)
	env.gc = gatewayclient.NewForConfigOrDie(env.rc)
	env.dc = dynamic.NewForConfigOrDie(env.rc)
	if env.saKey, err = readECKey(l.PKI.ServiceAccountKey); err != nil {
		t.Fatal(err)
	}
	if _, err := env.kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := env.kc.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cp, err := New(ctx, Config{
		RESTConfig: env.rc, Namespace: "istio-system", ServiceAccount: "istiod",
		GRPCAddr: "127.0.0.1:0", TrustedNodeAccounts: []string{"istio-system/ztunnel"}, Log: env.log,
	})
	if err != nil {
		t.Fatal(err)
	}
	env.cp = cp
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cp.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("istiod-lite on the cluster without %v: %v", groups, err)
		}
	})
}

// Without the Gateway API and TrafficPolicy CRDs istiod-lite still syncs
// and serves the Workload API; once they are installed, without a restart,
// a waypoint Gateway is deployed, a route gets its status and a
// TrafficPolicy reaches the waypoint.
func TestOptionalAPIs_GatewayAPIAndTrafficPolicyInstalledLater(t *testing.T) {
	onClusterWithout(t, cluster.GatewayAPIGroup, cluster.TrafficPolicyGroup)
	ns := "late"
	namespace(t, ns, map[string]string{"istio.io/use-waypoint": "waypoint"})
	serviceAccount(t, ns, "web")
	runPod(t, podSpec{ns: ns, name: "web-1", sa: "web", node: "node-a", ip: "10.244.3.1", labels: map[string]string{"app": "web"}})
	if _, err := env.kc.CoreV1().Services(ns).Create(ctxT(t, 10*time.Second), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	tok, _ := ztunnelToken(t, "node-a", "ztunnel-late", "10.244.3.200")
	rec := newRecorder()
	xdsClient(t, tok, node("ztunnel~10.244.3.200~ztunnel-late.istio-system~istio-system.svc.cluster.local", "istio-system", "ztunnel"), rec)
	uid := "Kubernetes//Pod/" + ns + "/web-1"
	rec.waitFor(t, "the pod's Workload pushed without the Gateway API", 20*time.Second, func(r *recorder) bool {
		return r.addresses[uid] != nil
	})
	for _, a := range []registry.API{registry.GatewayAPI, registry.TrafficPolicies} {
		if env.cp.informers.Served(a) {
			t.Fatalf("%s served before its CRDs are installed", a)
		}
	}

	ctx := ctxT(t, 2*time.Minute)
	if err := cluster.InstallCRDGroups(ctx, env.rc, env.log, cluster.GatewayAPIGroup, cluster.TrafficPolicyGroup); err != nil {
		t.Fatal(err)
	}
	took := poll(t, 20*time.Second, "the new APIs taken up", func(context.Context) error {
		for _, a := range []registry.API{registry.GatewayAPI, registry.TrafficPolicies} {
			if !env.cp.informers.Served(a) {
				return fmt.Errorf("%s not served", a)
			}
		}
		return nil
	})
	t.Logf("APIs taken up %s after their CRDs were established", took.Round(time.Millisecond))

	// A waypoint created now is deployed and programmed.
	createGateway(t, ns, "waypoint")
	poll(t, 20*time.Second, "waypoint Deployment, Service and status", func(ctx context.Context) error {
		if _, err := env.kc.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{}); err != nil {
			return err
		}
		if _, err := env.kc.CoreV1().Services(ns).Get(ctx, "waypoint", metav1.GetOptions{}); err != nil {
			return err
		}
		gw, err := env.gc.GatewayV1().Gateways(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if c := condition(gw.Status.Conditions, "Accepted"); c == nil || c.Status != metav1.ConditionTrue {
			return fmt.Errorf("Accepted = %+v", c)
		}
		if len(gw.Status.Addresses) == 0 {
			return fmt.Errorf("no address in status %+v", gw.Status)
		}
		return nil
	})

	// A route on web gets its status and reaches the waypoint.
	kind, core := gatewayv1.Kind("Service"), gatewayv1.Group("")
	port := gatewayv1.PortNumber(80)
	if _, err := env.gc.GatewayV1().HTTPRoutes(ns).Create(ctx, &gatewayv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: gatewayv1.HTTPRouteSpec{
			CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Group: &core, Kind: &kind, Name: "web"}}},
			Rules: []gatewayv1.HTTPRouteRule{{BackendRefs: []gatewayv1.HTTPBackendRef{
				{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Name: "web", Port: &port}}},
			}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	poll(t, 20*time.Second, "the route's status", func(ctx context.Context) error {
		_, conds, err := routeConds(ctx, ns, "web", "web")
		if err != nil {
			return err
		}
		if err := wantCond(conds, "Accepted", metav1.ConditionTrue, "Accepted"); err != nil {
			return err
		}
		return wantCond(conds, "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")
	})
	wpRec := newL7Rec()
	xdsClient(t, waypointToken(t, ns, "waypoint"), waypointNode(ns, "waypoint", "waypoint"), wpRec, ixds.Subscription{TypeURL: l7.TypeURL})
	web := ns + "/web." + ns + ".svc.cluster.local"
	wpRec.waitFor(t, "the route pushed to the waypoint", 10*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		return len(m[web].GetHttpRoutes()) == 1
	})

	// A TrafficPolicy on web reaches the waypoint.
	tp := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "policy.meshlite.io/v1alpha1", "kind": "TrafficPolicy",
		"metadata": map[string]any{"name": "web-limit", "namespace": ns},
		"spec": map[string]any{
			"targetRefs": []any{map[string]any{"kind": "Service", "name": "web"}},
			"rateLimit":  map[string]any{"requestsPerSecond": int64(7)},
		},
	}}
	if _, err := env.dc.Resource(policyv1alpha1.Resource).Namespace(ns).Create(ctx, tp, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wpRec.waitFor(t, "the TrafficPolicy pushed to the waypoint", 10*time.Second, func(m map[string]*l7.ServiceConfig) bool {
		return m[web].GetResilience().GetRateLimit().GetRequestsPerSecond() == 7
	})
}
