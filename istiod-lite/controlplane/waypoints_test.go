package controlplane

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/leader"
)

// poll calls f until it returns nil or timeout passes, then fails with
// f's last error.
func poll(t *testing.T, timeout time.Duration, what string, f func(ctx context.Context) error) time.Duration {
	t.Helper()
	start := time.Now()
	ctx := ctxT(t, timeout+10*time.Second)
	var err error
	for time.Since(start) < timeout {
		if err = f(ctx); err == nil {
			if testing.Verbose() {
				t.Logf("%s: %s", what, time.Since(start).Round(time.Millisecond))
			}
			return time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not after %s: %v", what, timeout, err)
	return 0
}

func condition(conds []metav1.Condition, typ string) *metav1.Condition {
	for i := range conds {
		if conds[i].Type == typ {
			return &conds[i]
		}
	}
	return nil
}

func ownedBy(m metav1.Object, gw *gatewayv1.Gateway) error {
	for _, r := range m.GetOwnerReferences() {
		if r.Kind == "Gateway" && r.APIVersion == "gateway.networking.k8s.io/v1" && r.Name == gw.Name && r.UID == gw.UID {
			return nil
		}
	}
	return fmt.Errorf("%s/%s is not owned by Gateway %s (%s): %v", m.GetNamespace(), m.GetName(), gw.Name, gw.UID, m.GetOwnerReferences())
}

func envOf(c corev1.Container) map[string]string {
	out := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			out[e.Name] = "field:" + e.ValueFrom.FieldRef.FieldPath
		} else {
			out[e.Name] = e.Value
		}
	}
	return out
}

func TestWaypoints_GatewayDeploysOwnedChildrenAndStatus(t *testing.T) {
	istiodT()
	ns := "wp-deploy"
	namespace(t, ns, nil)
	gws := env.gc.GatewayV1().Gateways(ns)
	gw, err := gws.Create(ctxT(t, 10*time.Second), &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Labels: map[string]string{"istio.io/waypoint-for": "service"}},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	poll(t, 10*time.Second, "GatewayClass istio-waypoint created and accepted", func(ctx context.Context) error {
		gc, err := env.gc.GatewayV1().GatewayClasses().Get(ctx, "istio-waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if gc.Spec.ControllerName != "istio.io/mesh-controller" {
			return fmt.Errorf("controllerName %q", gc.Spec.ControllerName)
		}
		if c := condition(gc.Status.Conditions, "Accepted"); c == nil || c.Status != metav1.ConditionTrue || c.Reason != "Accepted" {
			return fmt.Errorf("conditions %v", gc.Status.Conditions)
		}
		return nil
	})

	var svc *corev1.Service
	var dep *appsv1.Deployment
	took := poll(t, 10*time.Second, "ServiceAccount, Deployment and Service owned by the Gateway", func(ctx context.Context) error {
		sa, err := env.kc.CoreV1().ServiceAccounts(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if err := ownedBy(sa, gw); err != nil {
			return err
		}
		if dep, err = env.kc.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{}); err != nil {
			return err
		}
		if err := ownedBy(dep, gw); err != nil {
			return err
		}
		if svc, err = env.kc.CoreV1().Services(ns).Get(ctx, "waypoint", metav1.GetOptions{}); err != nil {
			return err
		}
		return ownedBy(svc, gw)
	})
	t.Logf("children applied %s after the Gateway", took.Round(time.Millisecond))

	// The Service: status-port and the HBONE listener, as Istio's; it
	// selects the waypoint's pods and says it is managed (never bound to a
	// waypoint itself).
	if len(svc.Spec.Ports) != 2 || svc.Spec.Ports[0].Port != 15021 || *svc.Spec.Ports[0].AppProtocol != "tcp" ||
		svc.Spec.Ports[1].Name != "mesh" || svc.Spec.Ports[1].Port != 15008 || *svc.Spec.Ports[1].AppProtocol != "hbone" {
		t.Errorf("service ports %+v", svc.Spec.Ports)
	}
	if svc.Spec.Selector["gateway.networking.k8s.io/gateway-name"] != "waypoint" || len(svc.Spec.Selector) != 1 {
		t.Errorf("service selector %v", svc.Spec.Selector)
	}
	if svc.Labels["gateway.istio.io/managed"] != "istio.io-mesh-controller" {
		t.Errorf("service labels %v", svc.Labels)
	}
	// The Deployment: the waypoint image, its own service account, out of
	// the ambient data plane, readiness on 15021, the istio-ca token and
	// the mesh root, and where istiod-lite is.
	pt := dep.Spec.Template
	if pt.Labels["istio.io/dataplane-mode"] != "none" || pt.Labels["gateway.networking.k8s.io/gateway-name"] != "waypoint" ||
		dep.Spec.Selector.MatchLabels["gateway.networking.k8s.io/gateway-name"] != "waypoint" {
		t.Errorf("pod labels %v, selector %v", pt.Labels, dep.Spec.Selector)
	}
	if pt.Spec.ServiceAccountName != "waypoint" || len(pt.Spec.Containers) != 1 {
		t.Fatalf("pod spec %+v", pt.Spec)
	}
	c := pt.Spec.Containers[0]
	if c.Image != "meshlite/waypoint:dev" {
		t.Errorf("image %q", c.Image)
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port.IntValue() != 15021 {
		t.Errorf("readiness probe %+v", c.ReadinessProbe)
	}
	e := envOf(c)
	for k, want := range map[string]string{
		"XDS_ADDRESS": "istiod.istio-system.svc:15012", "XDS_SERVER_NAME": "istiod.istio-system.svc",
		"TRUST_DOMAIN": "cluster.local", "CLUSTER_ID": "Kubernetes", "GATEWAY_NAME": "waypoint",
		"POD_NAMESPACE": "field:metadata.namespace", "SERVICE_ACCOUNT": "field:spec.serviceAccountName", "INSTANCE_IP": "field:status.podIP",
	} {
		if e[k] != want {
			t.Errorf("env %s = %q, want %q", k, e[k], want)
		}
	}
	// The CA is the xDS address and checked for the same name: no CA_ADDR
	// (a waypoint given one checks the CA's certificate for its host).
	if _, ok := e["CA_ADDR"]; ok {
		t.Errorf("CA_ADDR set: %q", e["CA_ADDR"])
	}
	var audience string
	for _, v := range pt.Spec.Volumes {
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					audience = s.ServiceAccountToken.Audience
				}
			}
		}
	}
	if audience != "istio-ca" {
		t.Errorf("no projected istio-ca token in %+v", pt.Spec.Volumes)
	}

	// Status: accepted, programmed, the Service's hostname and cluster IP,
	// the listener accepted.
	host := "waypoint." + ns + ".svc.cluster.local"
	poll(t, 10*time.Second, "Gateway status Programmed with the Service's address", func(ctx context.Context) error {
		g, err := gws.Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, typ := range []string{"Accepted", "Programmed"} {
			c := condition(g.Status.Conditions, typ)
			if c == nil || c.Status != metav1.ConditionTrue || c.Reason != typ || c.ObservedGeneration != g.Generation {
				return fmt.Errorf("condition %s: %+v", typ, c)
			}
		}
		a := g.Status.Addresses
		if len(a) != 2 || *a[0].Type != gatewayv1.HostnameAddressType || a[0].Value != host ||
			*a[1].Type != gatewayv1.IPAddressType || a[1].Value != svc.Spec.ClusterIP {
			return fmt.Errorf("addresses %+v", a)
		}
		if len(g.Status.Listeners) != 1 || g.Status.Listeners[0].Name != "mesh" ||
			condition(g.Status.Listeners[0].Conditions, "Accepted").Status != metav1.ConditionTrue {
			return fmt.Errorf("listeners %+v", g.Status.Listeners)
		}
		return nil
	})

	// A deleted child comes back; a changed one is put back.
	if err := env.kc.AppsV1().Deployments(ns).Delete(ctxT(t, 10*time.Second), "waypoint", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	poll(t, 10*time.Second, "the deleted Deployment re-created", func(ctx context.Context) error {
		d, err := env.kc.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.UID == dep.UID {
			return fmt.Errorf("still the old one")
		}
		return nil
	})
	patch := []byte(`{"spec":{"template":{"spec":{"containers":[{"name":"istio-proxy","image":"evil/proxy"}]}}}}`)
	if _, err := env.kc.AppsV1().Deployments(ns).Patch(ctxT(t, 10*time.Second), "waypoint", types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	poll(t, 10*time.Second, "the changed image put back", func(ctx context.Context) error {
		d, err := env.kc.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if img := d.Spec.Template.Spec.Containers[0].Image; img != "meshlite/waypoint:dev" {
			return fmt.Errorf("image %q", img)
		}
		return nil
	})

	// Deleting the Gateway removes everything (the garbage collector of
	// kube-controller-manager, through the owner references).
	if err := gws.Delete(ctxT(t, 10*time.Second), "waypoint", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	took = poll(t, 60*time.Second, "children garbage-collected", func(ctx context.Context) error {
		if _, err := env.kc.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("deployment: %v", err)
		}
		if _, err := env.kc.CoreV1().Services(ns).Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("service: %v", err)
		}
		if _, err := env.kc.CoreV1().ServiceAccounts(ns).Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("service account: %v", err)
		}
		return nil
	})
	t.Logf("children gone %s after the Gateway", took.Round(time.Millisecond))
}

func TestWaypoints_GatewayWithoutHBONEListenerIsRefused(t *testing.T) {
	istiodT()
	ns := "wp-invalid"
	namespace(t, ns, nil)
	if _, err := env.gc.GatewayV1().Gateways(ns).Create(ctxT(t, 10*time.Second), &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint"},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "http", Port: 80, Protocol: "HTTP"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	poll(t, 10*time.Second, "Gateway refused with ListenersNotValid", func(ctx context.Context) error {
		g, err := env.gc.GatewayV1().Gateways(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return err
		}
		a, p := condition(g.Status.Conditions, "Accepted"), condition(g.Status.Conditions, "Programmed")
		if a == nil || a.Status != metav1.ConditionFalse || a.Reason != "ListenersNotValid" ||
			p == nil || p.Status != metav1.ConditionFalse || p.Reason != "Invalid" {
			return fmt.Errorf("conditions %+v", g.Status.Conditions)
		}
		if len(g.Status.Addresses) != 0 {
			return fmt.Errorf("addresses %v", g.Status.Addresses)
		}
		if len(g.Status.Listeners) != 1 || condition(g.Status.Listeners[0].Conditions, "Accepted").Reason != "UnsupportedProtocol" {
			return fmt.Errorf("listeners %+v", g.Status.Listeners)
		}
		return nil
	})
	if _, err := env.kc.AppsV1().Deployments(ns).Get(ctxT(t, 10*time.Second), "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("a refused Gateway got a Deployment (err %v)", err)
	}
}

// Two replicas: one leads at a time, and the other takes over when the
// leader goes (it releases the Lease, so without waiting for it to expire).
func TestLeaderElection_OneLeaderAndTakeover(t *testing.T) {
	type replica struct {
		e       *leader.Elector
		cancel  context.CancelFunc
		done    chan struct{}
		leading atomic.Int32
	}
	start := func(id string) *replica {
		e, err := leader.New(leader.Config{Client: env.kc, Namespace: "istio-system", Name: "leader-test", Identity: id,
			LeaseDuration: 3 * time.Second, RenewDeadline: 2 * time.Second, RetryPeriod: 200 * time.Millisecond, Log: env.log})
		if err != nil {
			t.Fatal(err)
		}
		r := &replica{e: e, done: make(chan struct{})}
		ctx, cancel := context.WithCancel(context.Background())
		r.cancel = cancel
		go func() {
			defer close(r.done)
			_ = e.Run(ctx, func(lctx context.Context) {
				r.leading.Add(1)
				<-lctx.Done()
				r.leading.Add(-1)
			})
		}()
		t.Cleanup(func() { cancel(); <-r.done })
		return r
	}
	a, b := start("replica-a"), start("replica-b")
	var first, second *replica
	poll(t, 10*time.Second, "one replica leads", func(context.Context) error {
		switch {
		case a.leading.Load() == 1 && b.leading.Load() == 0:
			first, second = a, b
		case b.leading.Load() == 1 && a.leading.Load() == 0:
			first, second = b, a
		default:
			return fmt.Errorf("leading: a=%d b=%d", a.leading.Load(), b.leading.Load())
		}
		return nil
	})
	// It stays alone through a few renewals.
	for range 10 {
		time.Sleep(100 * time.Millisecond)
		if second.leading.Load() != 0 || second.e.Leading() || !first.e.Leading() {
			t.Fatalf("two leaders or none: first %v, second %v", first.e.Leading(), second.e.Leading())
		}
	}
	first.cancel()
	<-first.done
	took := poll(t, 10*time.Second, "the other replica takes over", func(context.Context) error {
		if second.leading.Load() != 1 {
			return fmt.Errorf("not leading")
		}
		return nil
	})
	if took > 3*time.Second {
		t.Errorf("takeover took %s: the Lease was not released", took)
	}
}

// Two istiod-lite replicas with leader election against the real
// apiserver: one leads (runs the waypoint controller), both serve xDS, and
// the other takes over when the leader stops.
func TestLeaderElection_TwoControlPlanes(t *testing.T) {
	istiodT() // the CA Secret exists; the replicas load it
	type replica struct {
		cp     *ControlPlane
		cancel context.CancelFunc
		done   chan error
	}
	start := func(id string) *replica {
		cp, err := New(context.Background(), Config{
			RESTConfig: env.rc, Namespace: "istio-system", ServiceAccount: "istiod",
			GRPCAddr: "127.0.0.1:0", TrustedNodeAccounts: []string{"istio-system/ztunnel"},
			LeaderElection: true, LeaseName: "two-replicas", Identity: id, Log: env.log,
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		r := &replica{cp: cp, cancel: cancel, done: make(chan error, 1)}
		go func() { r.done <- cp.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			if err := <-r.done; err != nil {
				t.Errorf("replica %s: %v", id, err)
			}
		})
		return r
	}
	a := start("replica-a")
	poll(t, 20*time.Second, "replica-a leads", func(context.Context) error {
		if !a.cp.Leading() {
			return fmt.Errorf("not leading")
		}
		return nil
	})
	b := start("replica-b")
	// b serves xDS while a leads.
	tok, _ := ztunnelToken(t, "node-a", "ztunnel-replica-b", "10.244.8.200")
	rec := newRecorder()
	c, err := ixdsClientTo(t, b.cp, tok, rec)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Synced():
	case <-time.After(20 * time.Second):
		t.Fatal("the non-leader replica did not answer xDS")
	}
	if b.cp.Leading() {
		t.Fatal("both replicas lead")
	}
	a.cancel()
	if err := <-a.done; err != nil {
		t.Errorf("replica-a stopped with %v", err)
	}
	a.done <- nil // for its cleanup
	took := poll(t, 10*time.Second, "replica-b takes over", func(context.Context) error {
		if !b.cp.Leading() {
			return fmt.Errorf("not leading")
		}
		return nil
	})
	t.Logf("takeover after the leader stopped: %s", took.Round(time.Millisecond))
}

// ixdsClientTo connects a ztunnel-like Delta ADS client to cp.
func ixdsClientTo(t *testing.T, cp *ControlPlane, tok string, h ixds.Handler) (*ixds.Client, error) {
	t.Helper()
	c, err := ixds.NewClient(ixds.ClientConfig{
		Target: cp.GRPCAddr().String(), TLS: clientTLS(),
		Token:         func(context.Context) (string, error) { return tok, nil },
		Node:          node("ztunnel~replica", "istio-system", "ztunnel"),
		Subscriptions: []ixds.Subscription{{TypeURL: ixds.TypeAddress}, {TypeURL: ixds.TypeAuthorization}},
		Handler:       h, MinBackoff: 50 * time.Millisecond, Log: env.log,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return c, nil
}
