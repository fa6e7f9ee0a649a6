package controlplane

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/model"
	"github.com/meshlite/meshlite/istiod-lite/xds"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
)

func uid(ns, name string) string { return "Kubernetes//Pod/" + ns + "/" + name }

func ip4(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

// A ztunnel-like client in istio-system with a pod-bound token.
func ztunnelToken(t *testing.T, nodeName, podName, ip string) (string, *corev1.Pod) {
	t.Helper()
	if _, err := env.kc.CoreV1().ServiceAccounts("istio-system").Get(ctxT(t, 5*time.Second), "ztunnel", metav1.GetOptions{}); err != nil {
		serviceAccount(t, "istio-system", "ztunnel")
	}
	p := runPod(t, podSpec{ns: "istio-system", name: podName, sa: "ztunnel", node: nodeName, ip: ip})
	t.Cleanup(func() {
		_ = env.kc.CoreV1().Pods("istio-system").Delete(context.Background(), podName, metav1.DeleteOptions{GracePeriodSeconds: ptrTo[int64](0)})
	})
	return token(t, "istio-system", "ztunnel", p, "istio-ca"), p
}

func TestXDS_WildcardPushFollowsPodsAndServices(t *testing.T) {
	ns := "wild"
	namespace(t, ns, nil)
	serviceAccount(t, ns, "web")
	for i := 1; i <= 3; i++ {
		runPod(t, podSpec{ns: ns, name: fmt.Sprintf("web-%d", i), sa: "web", node: "node-a", ip: fmt.Sprintf("10.244.1.%d", i),
			labels: map[string]string{"app": "web", "version": "v1"}})
	}
	svc, err := env.kc.CoreV1().Services(ns).Create(ctxT(t, 10*time.Second), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svcKey := ns + "/web." + ns + ".svc.cluster.local"
	tok, _ := ztunnelToken(t, "node-a", "ztunnel-wild", "10.244.1.200")
	rec := newRecorder()
	c := xdsClient(t, tok, node("ztunnel~10.244.1.200~ztunnel-wild.istio-system~istio-system.svc.cluster.local", "istio-system", "ztunnel"), rec)
	select {
	case <-c.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("no initial responses within 10s")
	}

	// The initial push holds a Workload per pod, the Service, and an
	// (empty) Authorization response.
	took := rec.waitFor(t, "three workloads and the service", 2*time.Second, func(r *recorder) bool {
		for i := 1; i <= 3; i++ {
			if r.addresses[uid(ns, fmt.Sprintf("web-%d", i))] == nil {
				return false
			}
		}
		return r.addresses[svcKey] != nil
	})
	t.Logf("initial state complete %s after sync", took)
	gotAuthz := false
	for _, resp := range rec.since(0) {
		if resp.typeURL == ixds.TypeAuthorization {
			gotAuthz = true
			if len(resp.resources) != 0 {
				t.Errorf("first Authorization response has %d resources, want none (no policies)", len(resp.resources))
			}
			break
		}
	}
	if !gotAuthz {
		t.Error("no Authorization response")
	}
	w := rec.workload(uid(ns, "web-1"))
	if w.GetName() != "web-1" || w.GetNamespace() != ns || w.GetNode() != "node-a" || w.GetServiceAccount() != "web" ||
		w.GetCanonicalName() != "web" || w.GetCanonicalRevision() != "v1" || w.GetClusterId() != "Kubernetes" ||
		w.GetStatus() != workload.WorkloadStatus_HEALTHY || w.GetTunnelProtocol() != workload.TunnelProtocol_NONE ||
		len(w.GetAddresses()) != 1 || string(w.GetAddresses()[0]) != string(ip4("10.244.1.1")) ||
		w.GetLocality().GetZone() != "zone-node-a" {
		t.Errorf("workload web-1 fields wrong: %v", w)
	}
	if pl := w.GetServices()[svcKey]; len(pl.GetPorts()) != 1 || pl.GetPorts()[0].GetServicePort() != 80 || pl.GetPorts()[0].GetTargetPort() != 8080 {
		t.Errorf("web-1 services = %v, want %s 80->8080", w.GetServices(), svcKey)
	}
	rec.mu.Lock()
	s := rec.addresses[svcKey].GetService()
	rec.mu.Unlock()
	vip := netip.MustParseAddr(svc.Spec.ClusterIP).AsSlice()
	if s.GetHostname() != "web."+ns+".svc.cluster.local" || len(s.GetAddresses()) != 1 || string(s.GetAddresses()[0].GetAddress()) != string(vip) {
		t.Errorf("service = %v, want VIP %s", s, svc.Spec.ClusterIP)
	}

	// Enrolling one pod (label + the CNI's annotation) pushes that workload
	// only, with HBONE.
	mark := rec.count()
	start := time.Now()
	patch := `{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"},"annotations":{"ambient.istio.io/redirection":"enabled"}}}`
	if _, err := env.kc.CoreV1().Pods(ns).Patch(ctxT(t, 5*time.Second), "web-2", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "web-2 on HBONE", time.Second, func(r *recorder) bool {
		return r.addresses[uid(ns, "web-2")].GetWorkload().GetTunnelProtocol() == workload.TunnelProtocol_HBONE
	})
	t.Logf("label change pushed in %s", time.Since(start).Round(time.Millisecond))
	// Other tests' namespaces may still be going away meanwhile, so only
	// this test's resources are judged.
	ours := func(n string) bool { return strings.HasPrefix(n, uid(ns, "")) || strings.HasPrefix(n, ns+"/") }
	var pushed []string
	for _, resp := range rec.since(mark) {
		if resp.typeURL != ixds.TypeAddress {
			continue
		}
		for _, n := range append(append([]string{}, resp.names...), resp.removed...) {
			if ours(n) {
				pushed = append(pushed, n)
			}
		}
	}
	if len(pushed) != 1 || pushed[0] != uid(ns, "web-2") {
		t.Errorf("label change pushed %v, want only %s", pushed, uid(ns, "web-2"))
	}

	// Deleting a pod pushes a removal.
	start = time.Now()
	if err := env.kc.CoreV1().Pods(ns).Delete(ctxT(t, 5*time.Second), "web-3", metav1.DeleteOptions{GracePeriodSeconds: ptrTo[int64](0)}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "web-3 removed", 2*time.Second, func(r *recorder) bool {
		for _, resp := range r.responses {
			for _, n := range resp.removed {
				if n == uid(ns, "web-3") {
					return true
				}
			}
		}
		return false
	})
	t.Logf("pod delete pushed as removal in %s", time.Since(start).Round(time.Millisecond))

	// The debug endpoint shows the client and what it last ACKed.
	var clients []xds.ClientStatus
	getJSON(t, "/debug/connections", &clients)
	found := false
	for _, cs := range clients {
		if strings.HasPrefix(cs.NodeID, "ztunnel~10.244.1.200") {
			found = true
			var dump map[string][]struct {
				Name     string          `json:"name"`
				Current  bool            `json:"current"`
				Resource json.RawMessage `json:"resource"`
			}
			getJSON(t, "/debug/config_dump?client="+cs.ID, &dump)
			ok := false
			for _, e := range dump["address"] {
				var compact bytes.Buffer
				_ = json.Compact(&compact, e.Resource)
				if e.Name == uid(ns, "web-1") && e.Current && strings.Contains(compact.String(), `"canonicalName":"web"`) {
					ok = true
				}
			}
			if !ok {
				b, _ := json.Marshal(dump["address"])
				t.Errorf("config_dump of %s lacks web-1 as held and current: %.2000s", cs.ID, b)
			}
			for _, ts := range cs.Types {
				if ts.LastAckedNonce == "" || ts.LastAckedVersion == "" {
					t.Errorf("client %s type %s: no ACK recorded: %+v", cs.ID, ts.TypeURL, ts)
				}
			}
		}
	}
	if !found {
		t.Errorf("/debug/connections does not list the client: %+v", clients)
	}
}

func getJSON(t *testing.T, path string, v any) {
	t.Helper()
	resp, err := http.Get("http://" + istiodT().DebugAddr().String() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s: %s", path, resp.Status, b)
	}
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("GET %s: %v: %s", path, err, b)
		}
	}
}

func TestXDS_NackIsLoggedAndDoesNotStallTheStream(t *testing.T) {
	ns := "nack"
	namespace(t, ns, nil)
	serviceAccount(t, ns, "app")
	tok, _ := ztunnelToken(t, "node-a", "ztunnel-nack", "10.244.2.200")
	rec := newRecorder()
	rejected := make(chan struct{}, 1)
	rec.reject = func(r response) error {
		for _, n := range r.names {
			if n == uid(ns, "bad") {
				select {
				case rejected <- struct{}{}:
				default:
				}
				return fmt.Errorf("test rejects %s", n)
			}
		}
		return nil
	}
	c := xdsClient(t, tok, node("ztunnel~nack", "istio-system", "ztunnel"), rec)
	<-c.Synced()
	runPod(t, podSpec{ns: ns, name: "bad", sa: "app", node: "node-a", ip: "10.244.2.1"})
	select {
	case <-rejected:
	case <-time.After(2 * time.Second):
		t.Fatal("the pushed workload never arrived to be rejected")
	}
	// The stream keeps going: a later change arrives and is applied.
	runPod(t, podSpec{ns: ns, name: "good", sa: "app", node: "node-a", ip: "10.244.2.2"})
	rec.waitFor(t, "the next workload after a NACK", 2*time.Second, func(r *recorder) bool {
		return r.addresses[uid(ns, "good")] != nil
	})
	// The server recorded the NACK, and still believes the client lacks
	// the rejected workload, so a change to it is sent again.
	var clients []xds.ClientStatus
	getJSON(t, "/debug/connections", &clients)
	nacks := 0
	for _, cs := range clients {
		if cs.NodeID == "ztunnel~nack" {
			for _, ts := range cs.Types {
				nacks += ts.Nacks
			}
		}
	}
	if nacks != 1 {
		t.Errorf("server recorded %d NACKs, want 1", nacks)
	}
	rec.mu.Lock()
	rec.reject = nil
	rec.mu.Unlock()
	// A new canonical name changes the workload's content.
	if _, err := env.kc.CoreV1().Pods(ns).Patch(ctxT(t, 5*time.Second), "bad", types.MergePatchType, []byte(`{"metadata":{"labels":{"app":"fixed"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "the fixed workload", 2*time.Second, func(r *recorder) bool {
		return r.addresses[uid(ns, "bad")] != nil
	})
	var m string
	resp, err := http.Get("http://" + istiodT().DebugAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m = string(b)
	for _, want := range []string{`pilot_total_xds_rejects{type="address"}`, `pilot_xds_pushes{type="address"}`, "pilot_xds ", "pilot_xds_push_time_bucket"} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

func TestXDS_OnDemandLookups(t *testing.T) {
	ns := "ondemand"
	namespace(t, ns, nil)
	serviceAccount(t, ns, "app")
	runPod(t, podSpec{ns: ns, name: "a", sa: "app", node: "node-a", ip: "10.244.3.1", labels: map[string]string{"app": "db"}})
	runPod(t, podSpec{ns: ns, name: "b", sa: "app", node: "node-a", ip: "10.244.3.2"})
	if _, err := env.kc.CoreV1().Services(ns).Create(ctxT(t, 10*time.Second), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "db"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "db"}, Ports: []corev1.ServicePort{{Port: 5432}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svcKey := ns + "/db." + ns + ".svc.cluster.local"
	// Wait until istiod serves the service (its informer may lag the API).
	waitServed(t, svcKey)

	tok, _ := ztunnelToken(t, "node-a", "ztunnel-od", "10.244.3.200")
	rec := newRecorder()
	c := xdsClient(t, tok, node("ztunnel~od", "istio-system", "ztunnel"), rec,
		ixds.Subscription{TypeURL: ixds.TypeAddress, Names: []string{"/10.244.3.2"}})
	<-c.Synced()
	rec.waitFor(t, "pod b by IP", 2*time.Second, func(r *recorder) bool { return r.addresses[uid(ns, "b")] != nil })
	rec.mu.Lock()
	if len(rec.addresses) != 1 {
		t.Errorf("on-demand client holds %v, want only pod b", keys(rec.addresses))
	}
	rec.mu.Unlock()

	// An unknown IP is answered with a removal of that name.
	if err := c.Subscribe(ixds.TypeAddress, "/10.9.9.9"); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "removal of an unknown IP", 2*time.Second, func(r *recorder) bool {
		for _, resp := range r.responses {
			for _, n := range resp.removed {
				if n == "/10.9.9.9" {
					return true
				}
			}
		}
		return false
	})
	// A service brings its workloads, and later ones follow.
	if err := c.Subscribe(ixds.TypeAddress, svcKey); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "service db and its pod a", 2*time.Second, func(r *recorder) bool {
		return r.addresses[svcKey] != nil && r.addresses[uid(ns, "a")] != nil
	})
	runPod(t, podSpec{ns: ns, name: "a2", sa: "app", node: "node-b", ip: "10.244.3.3", labels: map[string]string{"app": "db"}})
	rec.waitFor(t, "new backend a2 of the subscribed service", 2*time.Second, func(r *recorder) bool {
		return r.addresses[uid(ns, "a2")] != nil
	})
	// A pod appearing at a previously unknown IP the client asked for.
	runPod(t, podSpec{ns: ns, name: "late", sa: "app", node: "node-b", ip: "10.9.9.9"})
	rec.waitFor(t, "the pod at the looked-up IP", 2*time.Second, func(r *recorder) bool {
		return r.addresses[uid(ns, "late")] != nil
	})
	// Nothing it did not ask for.
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for k := range rec.addresses {
		switch k {
		case uid(ns, "a"), uid(ns, "a2"), uid(ns, "b"), uid(ns, "late"), svcKey:
		default:
			t.Errorf("on-demand client got %s it never asked for", k)
		}
	}
}

func waitServed(t *testing.T, name string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for istiodT().XDS().Cache().Resolve(ixds.TypeAddress, name) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("istiod never served %s", name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestXDS_ReconnectResumesFromInitialVersions(t *testing.T) {
	ns := "resume"
	namespace(t, ns, nil)
	serviceAccount(t, ns, "app")
	for i := 1; i <= 3; i++ {
		runPod(t, podSpec{ns: ns, name: fmt.Sprintf("p%d", i), sa: "app", node: "node-a", ip: fmt.Sprintf("10.244.4.%d", i)})
	}
	waitServed(t, uid(ns, "p3"))
	tok, _ := ztunnelToken(t, "node-a", "ztunnel-resume", "10.244.4.200")
	rec := newRecorder()
	c, err := ixds.NewClient(ixds.ClientConfig{
		Target: istiodT().GRPCAddr().String(), TLS: clientTLS(),
		Token:         func(context.Context) (string, error) { return tok, nil },
		Node:          node("ztunnel~resume", "istio-system", "ztunnel"),
		Subscriptions: []ixds.Subscription{{TypeURL: ixds.TypeAddress}},
		Handler:       rec, MinBackoff: 50 * time.Millisecond, Log: env.log,
	})
	if err != nil {
		t.Fatal(err)
	}
	run := func() (context.CancelFunc, chan struct{}) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = c.Run(ctx) }()
		return cancel, done
	}
	cancel, done := run()
	rec.waitFor(t, "initial state", 5*time.Second, func(r *recorder) bool { return r.addresses[uid(ns, "p3")] != nil })
	// The client records versions once its handler accepted the response.
	for deadline := time.Now().Add(5 * time.Second); c.Versions(ixds.TypeAddress)[uid(ns, "p3")] == ""; {
		if time.Now().After(deadline) {
			t.Fatal("client never recorded the version of p3")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	total := len(c.Versions(ixds.TypeAddress))

	// While disconnected: one pod changes, one goes, one comes.
	if _, err := env.kc.CoreV1().Pods(ns).Patch(ctxT(t, 5*time.Second), "p1", types.MergePatchType, []byte(`{"metadata":{"labels":{"version":"v2"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := env.kc.CoreV1().Pods(ns).Delete(ctxT(t, 5*time.Second), "p2", metav1.DeleteOptions{GracePeriodSeconds: ptrTo[int64](0)}); err != nil {
		t.Fatal(err)
	}
	runPod(t, podSpec{ns: ns, name: "p4", sa: "app", node: "node-a", ip: "10.244.4.4"})
	waitServed(t, uid(ns, "p4"))
	deadline := time.Now().Add(5 * time.Second)
	for istiodT().XDS().Cache().Get(ixds.TypeAddress, uid(ns, "p2")) != nil && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}

	mark := rec.count()
	cancel, done = run()
	defer func() { cancel(); <-done }()
	rec.waitFor(t, "the resumed response", 5*time.Second, func(r *recorder) bool { return len(r.responses) > mark })
	first := rec.since(mark)[0]
	got := map[string]bool{}
	for _, n := range first.names {
		got[n] = true
	}
	// Only what changed while away, out of the whole cluster (other tests'
	// pods may change meanwhile, so only ours are checked exactly).
	for _, n := range first.names {
		if strings.HasPrefix(n, uid(ns, "")) && n != uid(ns, "p1") && n != uid(ns, "p4") {
			t.Errorf("resumed response resent unchanged %s", n)
		}
	}
	if !got[uid(ns, "p1")] || !got[uid(ns, "p4")] {
		t.Errorf("resumed response %v lacks p1 (changed) or p4 (new)", first.names)
	}
	removedP2 := false
	for _, n := range first.removed {
		removedP2 = removedP2 || n == uid(ns, "p2")
	}
	if !removedP2 {
		t.Errorf("resumed response does not remove p2: %v", first.removed)
	}
	if len(first.names) > total/2 {
		t.Errorf("resumed response carried %d resources of %d: not a diff", len(first.names), total)
	}
}

func TestXDS_RefusesBadCredentials(t *testing.T) {
	ns := "creds"
	namespace(t, ns, nil)
	sa := serviceAccount(t, ns, "app")
	good := token(t, ns, "app", nil, "istio-ca")
	for _, tc := range []struct {
		name  string
		token string
		node  string // NAMESPACE metadata
		code  codes.Code
	}{
		{"no token", "", ns, codes.Unauthenticated},
		{"garbage token", "not-a-jwt", ns, codes.Unauthenticated},
		{"wrong audience", token(t, ns, "app", nil, "somebody-else"), ns, codes.Unauthenticated},
		{"expired token signed by the cluster", mintToken(t, sa, "istio-ca", time.Now().Add(-time.Hour)), ns, codes.Unauthenticated},
		{"foreign token (another issuer's key)", foreignToken(t, sa), ns, codes.Unauthenticated},
		{"node claims another namespace", good, "istio-system", codes.PermissionDenied},
	} {
		err := rawStreamError(t, tc.token, tc.node, "app")
		if status.Code(err) != tc.code {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.code)
		}
	}
	// The same path with a valid cluster-signed token works, so the refusals
	// above are about the token, not the plumbing.
	if err := rawStreamError(t, mintToken(t, sa, "istio-ca", time.Now().Add(time.Hour)), ns, "app"); err != nil {
		t.Errorf("fresh minted token: %v", err)
	}
	if err := rawStreamError(t, good, ns, "app"); err != nil {
		t.Errorf("TokenRequest token: %v", err)
	}
}

// foreignToken is well formed but signed by a key the cluster never saw.
func foreignToken(t *testing.T, sa *corev1.ServiceAccount) string {
	saved := env.saKey
	defer func() { env.saKey = saved }()
	other, err := ecdsaKey()
	if err != nil {
		t.Fatal(err)
	}
	env.saKey = other
	return mintToken(t, sa, "istio-ca", time.Now().Add(time.Hour))
}

// rawStreamError opens a Delta stream with tok, sends a first request, and
// returns the stream's error (nil when a response arrived).
func rawStreamError(t *testing.T, tok, nodeNS, sa string) error {
	t.Helper()
	cc, err := grpc.NewClient(istiodT().GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(clientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := ctxT(t, 10*time.Second)
	if tok != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}
	st, err := discovery.NewAggregatedDiscoveryServiceClient(cc).DeltaAggregatedResources(ctx)
	if err != nil {
		return err
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAuthorization, Node: node("raw~"+nodeNS, nodeNS, sa)}); err != nil {
		_, err = st.Recv()
		return err
	}
	_, err = st.Recv()
	return err
}

func TestXDS_PoliciesWaypointsAndPeerAuthentication(t *testing.T) {
	ns := "policy"
	namespace(t, ns, map[string]string{"istio.io/use-waypoint": "waypoint"})
	serviceAccount(t, ns, "app")
	runPod(t, podSpec{ns: ns, name: "web", sa: "app", node: "node-a", ip: "10.244.5.1", labels: map[string]string{"app": "web"}})
	if _, err := env.kc.CoreV1().Services(ns).Create(ctxT(t, 10*time.Second), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svcKey := ns + "/web." + ns + ".svc.cluster.local"
	tok, _ := ztunnelToken(t, "node-a", "ztunnel-policy", "10.244.5.200")
	rec := newRecorder()
	c := xdsClient(t, tok, node("ztunnel~policy", "istio-system", "ztunnel"), rec)
	<-c.Synced()
	rec.waitFor(t, "the service without waypoint (gateway missing)", 2*time.Second, func(r *recorder) bool {
		return r.addresses[svcKey] != nil && r.addresses[svcKey].GetService().GetWaypoint() == nil
	})

	// A waypoint Gateway binds the service (the namespace asks for it) once
	// the waypoint controller has deployed it and published its address.
	if _, err := env.gc.GatewayV1().Gateways(ns).Create(ctxT(t, 10*time.Second), &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint"},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "the service bound to the waypoint", 5*time.Second, func(r *recorder) bool {
		return r.addresses[svcKey].GetService().GetWaypoint().GetHostname().GetHostname() == "waypoint."+ns+".svc.cluster.local"
	})
	if w := rec.workload(uid(ns, "web")); w.GetWaypoint() != nil {
		t.Errorf("workload got a service-only waypoint: %v", w.GetWaypoint())
	}

	// An L4 AuthorizationPolicy selecting the pod.
	ap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "allow-front", "namespace": ns},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "web"}},
			"rules": []any{map[string]any{
				"from": []any{map[string]any{"source": map[string]any{"principals": []any{"cluster.local/ns/front/sa/front"}}}},
				"to":   []any{map[string]any{"operation": map[string]any{"ports": []any{"80"}}}},
			}},
		},
	}}
	if _, err := env.dc.Resource(model.AuthorizationPolicyGVR).Namespace(ns).Create(ctxT(t, 10*time.Second), ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	key := ns + "/allow-front"
	rec.waitFor(t, "the policy and the workload listing it", 2*time.Second, func(r *recorder) bool {
		pols := r.addresses[uid(ns, "web")].GetWorkload().GetAuthorizationPolicies()
		return r.policies[key] != nil && len(pols) == 1 && pols[0] == key
	})
	rec.mu.Lock()
	p := rec.policies[key]
	rec.mu.Unlock()
	if p.GetScope() != security.Scope_WORKLOAD_SELECTOR || p.GetAction() != security.Action_ALLOW || len(p.GetGroups()) != 1 ||
		len(p.GetGroups()[0].GetRules()) != 2 || p.GetGroups()[0].GetRules()[0].GetMatches()[0].GetDestinationPorts()[0] != 80 ||
		p.GetGroups()[0].GetRules()[1].GetMatches()[0].GetPrincipals()[0].GetExact() != "cluster.local/ns/front/sa/front" {
		t.Errorf("converted policy wrong: %v", p)
	}

	// Namespace STRICT: the static policy appears and the workload lists it.
	pa := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
		"metadata": map[string]any{"name": "default", "namespace": ns},
		"spec":     map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
	}}
	if _, err := env.dc.Resource(model.PeerAuthenticationGVR).Namespace(ns).Create(ctxT(t, 10*time.Second), pa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	strict := "istio-system/istio_converted_static_strict"
	rec.waitFor(t, "the static STRICT policy listed", 2*time.Second, func(r *recorder) bool {
		pols := r.addresses[uid(ns, "web")].GetWorkload().GetAuthorizationPolicies()
		return r.policies[strict] != nil && len(pols) == 2 && pols[1] == strict
	})
	// Deleting the policies takes them back.
	if err := env.dc.Resource(model.PeerAuthenticationGVR).Namespace(ns).Delete(ctxT(t, 10*time.Second), "default", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := env.dc.Resource(model.AuthorizationPolicyGVR).Namespace(ns).Delete(ctxT(t, 10*time.Second), "allow-front", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "policies removed", 2*time.Second, func(r *recorder) bool {
		return r.policies[strict] == nil && r.policies[key] == nil &&
			len(r.addresses[uid(ns, "web")].GetWorkload().GetAuthorizationPolicies()) == 0
	})
}

// registryEvents reads how many events of kind the registry processed.
func registryEvents(t *testing.T, kind string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + istiodT().DebugAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	prefix := `meshlite_istiod_registry_events_total{kind="` + kind + `"} `
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err != nil {
				t.Fatalf("metric line %q: %v", l, err)
			}
			return f
		}
	}
	return 0
}

// HTTPRoutes are watched (the waypoint's L7 config will read them); a
// route attached to a Service changes no Workload API resource, so no
// ztunnel gets a push for it.
func TestXDS_HTTPRouteIsWatchedAndPushesNothing(t *testing.T) {
	ns := "routes"
	namespace(t, ns, nil)
	if _, err := env.kc.CoreV1().Services(ns).Create(ctxT(t, 10*time.Second), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svcKey := ns + "/web." + ns + ".svc.cluster.local"
	tok, _ := ztunnelToken(t, "node-a", "ztunnel-routes", "10.244.6.200")
	rec := newRecorder()
	c := xdsClient(t, tok, node("ztunnel~routes", "istio-system", "ztunnel"), rec)
	<-c.Synced()
	rec.waitFor(t, "the service", 2*time.Second, func(r *recorder) bool { return r.addresses[svcKey] != nil })

	before := registryEvents(t, "httproute")
	n := rec.count()
	kind := gatewayv1.Kind("Service")
	if _, err := env.gc.GatewayV1().HTTPRoutes(ns).Create(ctxT(t, 10*time.Second), &gatewayv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: gatewayv1.HTTPRouteSpec{CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{
			{Kind: &kind, Name: "web"}}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for registryEvents(t, "httproute") <= before {
		if time.Now().After(deadline) {
			t.Fatal("the registry did not observe the HTTPRoute within 2s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Longer than the push debounce and its maximum delay.
	time.Sleep(300 * time.Millisecond)
	// Only this namespace's addresses count: the client is a wildcard
	// subscriber, and other tests' cleanups push removals meanwhile.
	ours := func(names []string) []string {
		var out []string
		for _, name := range names {
			if strings.HasPrefix(name, ns+"/") || strings.Contains(name, "/"+ns+"/") {
				out = append(out, name)
			}
		}
		return out
	}
	for _, r := range rec.since(n) {
		if r.typeURL == ixds.TypeAddress && len(ours(r.names))+len(ours(r.removed)) > 0 {
			t.Errorf("an HTTPRoute caused an Address push: %v removed %v", r.names, r.removed)
		}
	}
}
