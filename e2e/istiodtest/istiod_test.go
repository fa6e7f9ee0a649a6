package istiodtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
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
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/identity"
	ixds "github.com/meshlite/meshlite/internal/xds"
	pb "github.com/meshlite/meshlite/proto/ca"
	"github.com/meshlite/meshlite/proto/workload"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }

// pushBudget is how soon a change in the API must reach a client.
const pushBudget = time.Second

// TestIstiodLite_InSandbox deploys istiod-lite from the chart and checks
// what a ztunnel would see, step by step on the same cluster state.
func TestIstiodLite_InSandbox(t *testing.T) {
	sb := sandbox.Start(t)
	if sb.Plan.Nodes < 2 {
		t.Fatalf("the sandbox has %d nodes; this test needs 2", sb.Plan.Nodes)
	}
	node0, node1 := sb.NodeName(0), sb.NodeName(1)
	d := deployIstiod(t, sb)
	kc := sb.Client()

	suffix := randomSuffix()
	ns := "istiodtest-" + suffix
	if _, err := kc.CoreV1().Namespaces().Create(ctxT(t, 10*time.Second), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := kc.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{}); err != nil {
			t.Errorf("delete namespace %s: %v", ns, err)
		}
	})
	pe := watchPods(t, sb, ns)

	// ztunnel-like clients: the node proxy's account istio-system/ztunnel,
	// with tokens bound to a pod on each node (the pods run the sample app;
	// only their identity and node matter).
	zt := []string{"istiodtest-ztunnel-" + suffix + "-0", "istiodtest-ztunnel-" + suffix + "-1"}
	ours := func(p *corev1.Pod) bool { return p.Name == zt[0] || p.Name == zt[1] }
	ensureServiceAccount(t, sb, systemNS, "ztunnel", ours)
	t.Cleanup(func() {
		for _, n := range zt {
			_ = kc.CoreV1().Pods(systemNS).Delete(context.Background(), n, metav1.DeleteOptions{GracePeriodSeconds: ptrTo[int64](0)})
		}
	})
	ztPods := runPods(t, sb,
		echoPod(systemNS, zt[0], "ztunnel", node0, map[string]string{"app": "istiodtest-ztunnel"}),
		echoPod(systemNS, zt[1], "ztunnel", node1, map[string]string{"app": "istiodtest-ztunnel"}))
	zt0, zt1 := ztPods[zt[0]], ztPods[zt[1]]
	ztTok0 := token(t, sb, systemNS, "ztunnel", zt0, "istio-ca")
	ztTok1 := token(t, sb, systemNS, "ztunnel", zt1, "istio-ca")

	rec := newRecorder()
	xdsClient(t, d, ztTok0, "ztunnel~"+zt0.Status.PodIP+"~"+zt0.Name+".istio-system~istio-system.svc.cluster.local", rec)
	for _, sa := range []string{"web", "remote"} {
		if _, err := kc.CoreV1().ServiceAccounts(ns).Create(ctxT(t, 10*time.Second), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	ok := t.Run("PodsAndServicesAppearAsAddressesWithTheirFields", func(t *testing.T) {
		web := map[string]string{"app": "web", "version": "v1"}
		pods := runPods(t, sb, echoPod(ns, "web-0", "web", node0, web), echoPod(ns, "web-1", "web", node1, web))
		for _, name := range []string{"web-0", "web-1"} {
			p := pods[name]
			uid := podUID(ns, name)
			ip := netip.MustParseAddr(p.Status.PodIP).AsSlice()
			rec.waitFor(t, name+" healthy with its IP", 5*time.Second, func(r *recorder) bool {
				w := r.addresses[uid].GetWorkload()
				return w.GetStatus() == workload.WorkloadStatus_HEALTHY && len(w.GetAddresses()) == 1 && bytes.Equal(w.GetAddresses()[0], ip)
			})
			withIP, ready := pe.times(name)
			gotIP, _ := rec.first(uid, func(a *workload.Address) bool {
				return len(a.GetWorkload().GetAddresses()) == 1 && bytes.Equal(a.GetWorkload().GetAddresses()[0], ip)
			})
			gotReady, _ := rec.first(uid, func(a *workload.Address) bool {
				return a.GetWorkload().GetStatus() == workload.WorkloadStatus_HEALTHY
			})
			checkLatency(t, name+" with its IP", withIP, gotIP)
			checkLatency(t, name+" healthy", ready, gotReady)
		}

		ctx := ctxT(t, 30*time.Second)
		created := time.Now()
		svc, err := kc.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "web"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
				{Name: "tcp", Port: 9090, TargetPort: intstr.FromInt32(9090)},
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		skey := serviceKey(ns, "web")
		rec.waitFor(t, "service web and its pods listing it", 5*time.Second, func(r *recorder) bool {
			return r.addresses[skey] != nil && r.addresses[podUID(ns, "web-0")].GetWorkload().GetServices()[skey] != nil &&
				r.addresses[podUID(ns, "web-1")].GetWorkload().GetServices()[skey] != nil
		})
		gotSvc, _ := rec.first(skey, func(*workload.Address) bool { return true })
		checkLatency(t, "service web", created, gotSvc)
		for _, name := range []string{"web-0", "web-1"} {
			got, _ := rec.first(podUID(ns, name), func(a *workload.Address) bool { return a.GetWorkload().GetServices()[skey] != nil })
			checkLatency(t, name+" listing service web", created, got)
		}

		// Field by field, from what the API says now.
		for _, name := range []string{"web-0", "web-1"} {
			p, err := kc.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			want := &workload.Workload{
				Uid: podUID(ns, name), Name: name, Namespace: ns,
				Addresses:         [][]byte{netip.MustParseAddr(p.Status.PodIP).AsSlice()},
				ServiceAccount:    "web",
				Node:              p.Spec.NodeName,
				CanonicalName:     "web",
				CanonicalRevision: "v1",
				WorkloadName:      name,
				WorkloadType:      workload.WorkloadType_POD,
				ClusterId:         "Kubernetes",
				Status:            workload.WorkloadStatus_HEALTHY,
				TunnelProtocol:    workload.TunnelProtocol_NONE,
				Services: map[string]*workload.PortList{skey: {Ports: []*workload.Port{
					{ServicePort: 80, TargetPort: 8080}, {ServicePort: 9090, TargetPort: 9090},
				}}},
			}
			if got := rec.get(podUID(ns, name)).GetWorkload(); !proto.Equal(got, want) {
				t.Errorf("workload %s:\n got: %s\nwant: %s", name, text(got), text(want))
			}
		}
		if svc.Spec.ClusterIP == "" || len(svc.Spec.IPFamilies) != 1 || svc.Spec.IPFamilies[0] != corev1.IPv4Protocol {
			t.Fatalf("service web: cluster IP %q, families %v; want one IPv4 VIP", svc.Spec.ClusterIP, svc.Spec.IPFamilies)
		}
		wantSvc := &workload.Service{
			Name: "web", Namespace: ns, Hostname: "web." + ns + ".svc.cluster.local",
			Addresses: []*workload.NetworkAddress{{Address: netip.MustParseAddr(svc.Spec.ClusterIP).AsSlice()}},
			// A named target port resolves per pod (above); here it is 0.
			// The application protocol comes from the port name.
			Ports: []*workload.Port{{ServicePort: 80, TargetPort: 0, AppProtocol: workload.AppProtocol_HTTP11},
				{ServicePort: 9090, TargetPort: 9090, AppProtocol: workload.AppProtocol_TCP}},
			IpFamilies: workload.IPFamilies_IPV4_ONLY,
			Canonical:  true,
		}
		if got := rec.get(skey).GetService(); !proto.Equal(got, wantSvc) {
			t.Errorf("service web:\n got: %s\nwant: %s", text(got), text(wantSvc))
		}
		// The client holds the cluster's other workloads too: istiod's own.
		if rec.get(podUID(systemNS, d.pod.Name)) == nil {
			t.Errorf("no workload for istiod's own pod %s", d.pod.Name)
		}
	})
	if !ok {
		t.FailNow() // the rest builds on these pods
	}

	t.Run("AmbientLabelAndRedirectionFlipTunnelProtocol", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		uid0, uid1 := podUID(ns, "web-0"), podUID(ns, "web-1")
		patchNS := func(label string) {
			t.Helper()
			patch := fmt.Sprintf(`{"metadata":{"labels":{"istio.io/dataplane-mode":%s}}}`, label)
			if _, err := kc.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		// The namespace label alone: nobody confirmed redirection yet.
		patchNS(`"ambient"`)
		// The CNI's confirmation on web-0 makes it HBONE.
		start := time.Now()
		if _, err := kc.CoreV1().Pods(ns).Patch(ctx, "web-0", types.MergePatchType,
			[]byte(`{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		isHBONE := func(a *workload.Address) bool {
			return a.GetWorkload().GetTunnelProtocol() == workload.TunnelProtocol_HBONE
		}
		rec.waitFor(t, "web-0 on HBONE", 5*time.Second, func(r *recorder) bool { return isHBONE(r.addresses[uid0]) })
		at, _ := rec.first(uid0, isHBONE)
		if at.Before(start) {
			t.Errorf("web-0 was sent as HBONE before the CNI confirmed redirection")
		}
		checkLatency(t, "web-0 on HBONE", start, at)
		// Taking the namespace out takes web-0 back to plain TCP, though
		// the annotation stays.
		start = time.Now()
		patchNS("null")
		rec.waitFor(t, "web-0 back to NONE", 5*time.Second, func(r *recorder) bool {
			return r.addresses[uid0].GetWorkload().GetTunnelProtocol() == workload.TunnelProtocol_NONE
		})
		var back time.Time
		rec.mu.Lock()
		for _, a := range rec.arrivals {
			if a.name == uid0 && a.at.After(at) && a.addr.GetWorkload().GetTunnelProtocol() == workload.TunnelProtocol_NONE {
				back = a.at
				break
			}
		}
		rec.mu.Unlock()
		checkLatency(t, "web-0 back to NONE", start, back)
		// Enrolled again, the annotation still there: HBONE; then the CNI
		// takes its confirmation back: NONE.
		mark := time.Now()
		patchNS(`"ambient"`)
		rec.waitFor(t, "web-0 on HBONE again", 5*time.Second, func(r *recorder) bool { return isHBONE(r.addresses[uid0]) })
		start = time.Now()
		if _, err := kc.CoreV1().Pods(ns).Patch(ctx, "web-0", types.MergePatchType,
			[]byte(`{"metadata":{"annotations":{"ambient.istio.io/redirection":null}}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		rec.waitFor(t, "web-0 NONE without the annotation", 5*time.Second, func(r *recorder) bool {
			return r.addresses[uid0].GetWorkload().GetTunnelProtocol() == workload.TunnelProtocol_NONE
		})
		back = time.Time{}
		rec.mu.Lock()
		for _, a := range rec.arrivals {
			if a.name == uid0 && a.at.After(mark) && a.addr.GetWorkload().GetTunnelProtocol() == workload.TunnelProtocol_NONE {
				back = a.at
				break
			}
		}
		rec.mu.Unlock()
		checkLatency(t, "web-0 NONE without the annotation", start, back)
		patchNS("null")
		if rec.ever(uid1, isHBONE) {
			t.Error("web-1, never confirmed by the CNI, was sent as HBONE")
		}
		if w := rec.get(uid0).GetWorkload(); w.GetStatus() != workload.WorkloadStatus_HEALTHY || w.GetCanonicalName() != "web" {
			t.Errorf("web-0 after the flips: %s", text(w))
		}
	})

	t.Run("NackIsLoggedAndDoesNotStallTheStream", func(t *testing.T) {
		badUID := podUID(ns, "nack-bad")
		marker := "istiodtest-" + suffix + " rejects " + badUID
		rejected := make(chan struct{})
		rec2 := newRecorder()
		rec2.reject = func(names []string) error {
			for _, n := range names {
				if n == badUID {
					select {
					case <-rejected:
					default:
						close(rejected)
					}
					return fmt.Errorf("%s", marker)
				}
			}
			return nil
		}
		nodeID := "ztunnel~nack-" + suffix
		xdsClient(t, d, ztTok0, nodeID, rec2)
		runPods(t, sb, echoPod(ns, "nack-bad", "web", node0, map[string]string{"app": "nack"}))
		select {
		case <-rejected:
		case <-time.After(5 * time.Second):
			t.Fatal("nack-bad never reached the rejecting client")
		}
		// istiod logs the rejection with the client and the client's reason.
		ctx := ctxT(t, 30*time.Second)
		var logged map[string]any
		err := sb.WaitFor(ctx, 10*time.Second, "the NACK in istiod's log", func(ctx context.Context) (bool, error) {
			var buf bytes.Buffer
			if err := sb.Logs(ctx, systemNS, d.pod.Name, "discovery", false, &buf); err != nil {
				return false, nil
			}
			s := bufio.NewScanner(&buf)
			s.Buffer(make([]byte, 1<<20), 1<<20)
			for s.Scan() {
				var m map[string]any
				if json.Unmarshal(s.Bytes(), &m) == nil && m["msg"] == "xDS client rejected a response" &&
					m["client"] == nodeID && strings.Contains(fmt.Sprint(m["error"]), marker) {
					logged = m
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if logged["level"] != "WARN" || logged["caller"] != "istio-system/ztunnel" || logged["type"] != "address" {
			t.Errorf("NACK log line: %v; want level WARN, caller istio-system/ztunnel, type address", logged)
		}
		// The stream goes on: the next pod arrives as fast as ever.
		runPods(t, sb, echoPod(ns, "nack-good", "web", node0, map[string]string{"app": "nack"}))
		goodUID := podUID(ns, "nack-good")
		rec2.waitFor(t, "nack-good after the NACK", 5*time.Second, func(r *recorder) bool { return r.addresses[goodUID] != nil })
		withIP, _ := pe.times("nack-good")
		at, _ := rec2.first(goodUID, func(*workload.Address) bool { return true })
		checkLatency(t, "nack-good after the NACK", withIP, at)
		// istiod knows the client lacks nack-bad: its next change is sent.
		rec2.mu.Lock()
		rec2.reject = nil
		rec2.mu.Unlock()
		start := time.Now()
		if _, err := kc.CoreV1().Pods(ns).Patch(ctx, "nack-bad", types.MergePatchType, []byte(`{"metadata":{"labels":{"version":"v2"}}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		rec2.waitFor(t, "nack-bad once accepted", 5*time.Second, func(r *recorder) bool {
			return r.addresses[badUID].GetWorkload().GetCanonicalRevision() == "v2"
		})
		at, _ = rec2.first(badUID, func(a *workload.Address) bool { return a.GetWorkload().GetCanonicalRevision() == "v2" })
		checkLatency(t, "nack-bad's change after the NACK", start, at)
		// The other client never noticed.
		if rec.get(badUID) == nil {
			t.Error("the first client lacks nack-bad")
		}
	})

	t.Run("DeletesArriveAsRemovals", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		uid1, skey := podUID(ns, "web-1"), serviceKey(ns, "web")
		start := time.Now()
		if err := kc.CoreV1().Pods(ns).Delete(ctx, "web-1", metav1.DeleteOptions{GracePeriodSeconds: ptrTo[int64](0)}); err != nil {
			t.Fatal(err)
		}
		rec.waitFor(t, "web-1 removed", 5*time.Second, func(r *recorder) bool { return r.addresses[uid1] == nil })
		at, ok := rec.first(uid1, nil)
		if !ok {
			t.Fatal("web-1 left the client's state without a removal")
		}
		checkLatency(t, "web-1 removal", start, at)

		start = time.Now()
		if err := kc.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		rec.waitFor(t, "service web removed and web-0 without it", 5*time.Second, func(r *recorder) bool {
			return r.addresses[skey] == nil && len(r.addresses[podUID(ns, "web-0")].GetWorkload().GetServices()) == 0
		})
		at, ok = rec.first(skey, nil)
		if !ok {
			t.Fatal("service web left the client's state without a removal")
		}
		checkLatency(t, "service web removal", start, at)
	})

	t.Run("CAImpersonationOnlyForPodsOnTheCallersNode", func(t *testing.T) {
		runPods(t, sb, echoPod(ns, "remote", "remote", node1, map[string]string{"app": "remote"}))
		webID := "spiffe://cluster.local/ns/" + ns + "/sa/web"       // web-0 runs on node0
		remoteID := "spiffe://cluster.local/ns/" + ns + "/sa/remote" // only on node1
		// Each node's proxy gets the identity of a pod on its own node
		// (istiod's pod cache may lag the API a moment).
		for _, c := range []struct {
			tok, id, node string
		}{{ztTok0, webID, node0}, {ztTok1, remoteID, node1}} {
			var resp *pb.IstioCertificateResponse
			err := sb.WaitFor(ctxT(t, 10*time.Second), 5*time.Second, "a certificate for "+c.id+" from "+c.node+"'s proxy", func(context.Context) (bool, error) {
				var err error
				resp, err = createCert(t, d, c.tok, c.id)
				return err == nil, nil
			})
			if err != nil {
				_, last := createCert(t, d, c.tok, c.id)
				t.Fatalf("%v: %v", err, last)
			}
			if got := leafURI(t, d, resp); got != c.id {
				t.Errorf("impersonating %s from %s: certificate for %q", c.id, c.node, got)
			}
		}
		// A pod on the other node is refused.
		if _, err := createCert(t, d, ztTok0, remoteID); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s's proxy impersonating %s (only on %s): %v, want PermissionDenied", node0, remoteID, node1, err)
		}
		// An ordinary workload may not impersonate at all.
		webTok := token(t, sb, ns, "web", nil, "istio-ca")
		if _, err := createCert(t, d, webTok, remoteID); status.Code(err) != codes.PermissionDenied {
			t.Errorf("workload web impersonating %s: %v, want PermissionDenied", remoteID, err)
		}
	})

	t.Run("ExpiredAndForeignTokensAreRefused", func(t *testing.T) {
		sa, err := kc.CoreV1().ServiceAccounts(systemNS).Get(ctxT(t, 10*time.Second), "ztunnel", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		key := clusterSAKey(t, sb)
		// The same minting with a live expiry works, so the refusals below
		// are for what is wrong with each token and nothing else.
		valid := mintToken(t, key, sa, "istio-ca", time.Now().Add(time.Hour))
		if err := streamError(t, d, valid); err != nil {
			t.Fatalf("a valid minted token was refused on xDS: %v", err)
		}
		if resp, err := createCert(t, d, valid, ""); err != nil {
			t.Fatalf("a valid minted token was refused by the CA: %v", err)
		} else if got := leafURI(t, d, resp); got != "spiffe://cluster.local/ns/istio-system/sa/ztunnel" {
			t.Errorf("certificate for %q", got)
		}
		for _, tc := range []struct{ name, tok string }{
			{"expired", mintToken(t, key, sa, "istio-ca", time.Now().Add(-time.Minute))},
			{"signed by another cluster's key", mintToken(t, otherKey(t), sa, "istio-ca", time.Now().Add(time.Hour))},
			{"for another audience", token(t, sb, systemNS, "ztunnel", nil, "not-istio-ca")},
			{"garbage", "not.a.token"},
		} {
			if err := streamError(t, d, tc.tok); status.Code(err) != codes.Unauthenticated {
				t.Errorf("xDS with a token %s: %v, want Unauthenticated", tc.name, err)
			}
			if _, err := createCert(t, d, tc.tok, ""); status.Code(err) != codes.Unauthenticated {
				t.Errorf("CA with a token %s: %v, want Unauthenticated", tc.name, err)
			}
		}
		// A valid token of another account cannot claim to be ztunnel.
		webTok := token(t, sb, ns, "web", nil, "istio-ca")
		if err := streamError(t, d, webTok); status.Code(err) != codes.PermissionDenied {
			t.Errorf("xDS as ztunnel with web's token: %v, want PermissionDenied", err)
		}
	})

	// Least privilege is enough: istiod logged no permission errors (client-go
	// logs a forbidden list or watch through klog, as plain text).
	t.Run("LogShowsNoErrors", func(t *testing.T) {
		var buf bytes.Buffer
		if err := sb.Logs(ctxT(t, 30*time.Second), systemNS, d.pod.Name, "discovery", false, &buf); err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(buf.String(), "\n") {
			if strings.Contains(line, "forbidden") || strings.Contains(line, `"level":"ERROR"`) {
				t.Errorf("istiod logged: %s", line)
			}
		}
	})
}

// checkLatency fails when the client got a change later than pushBudget
// after the API showed it.
func checkLatency(t *testing.T, what string, api, got time.Time) {
	t.Helper()
	if api.IsZero() || got.IsZero() {
		t.Errorf("%s: no time recorded (api %v, client %v)", what, api, got)
		return
	}
	d := got.Sub(api)
	t.Logf("%s: %s after the API", what, d.Round(time.Millisecond))
	if d > pushBudget {
		t.Errorf("%s reached the client %s after the API showed it, want under %s", what, d.Round(time.Millisecond), pushBudget)
	}
}

func randomSuffix() string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = letters[int(b[i])%len(letters)]
	}
	return string(b)
}

// dialIstiod opens a gRPC connection to istiod over TLS.
func dialIstiod(t *testing.T, d *istiod) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(credentials.NewTLS(d.tlsConfig())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// streamError opens a Delta ADS stream as istio-system/ztunnel with tok and
// returns how it ends: nil when a response arrives.
func streamError(t *testing.T, d *istiod, tok string) error {
	t.Helper()
	ctx := metadata.AppendToOutgoingContext(ctxT(t, 10*time.Second), "authorization", "Bearer "+tok)
	st, err := discovery.NewAggregatedDiscoveryServiceClient(dialIstiod(t, d)).DeltaAggregatedResources(ctx)
	if err != nil {
		return err
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAuthorization, Node: ztunnelNode("ztunnel~token-check")}); err != nil {
		_, err = st.Recv()
		return err
	}
	_, err = st.Recv()
	return err
}

// createCert asks the CA for a certificate with tok, impersonating id when
// given (as ztunnel does, with the clusterid header).
func createCert(t *testing.T, d *istiod, tok, id string) (*pb.IstioCertificateResponse, error) {
	t.Helper()
	key, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	// The CSR's own claim does not matter: the CA decides the identity.
	claim, _ := identity.NewID("cluster.local", "default", "whoever")
	csr, err := identity.NewCSR(key, claim)
	if err != nil {
		t.Fatal(err)
	}
	req := &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: 3600}
	md := []string{"authorization", "Bearer " + tok}
	if id != "" {
		req.Metadata, _ = structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id})
		md = append(md, "clusterid", "Kubernetes")
	}
	ctx := metadata.AppendToOutgoingContext(ctxT(t, 10*time.Second), md...)
	return pb.NewIstioCertificateServiceClient(dialIstiod(t, d)).CreateCertificate(ctx, req)
}

// leafURI verifies the response's chain against the published root and
// returns the leaf's SPIFFE ID.
func leafURI(t *testing.T, d *istiod, resp *pb.IstioCertificateResponse) string {
	t.Helper()
	var certs []*x509.Certificate
	for _, p := range resp.GetCertChain() {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatalf("chain element is not PEM: %q", p)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	if len(certs) < 2 || !certs[len(certs)-1].Equal(d.root) {
		t.Fatalf("chain of %d certificates does not end with the published root", len(certs))
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(d.root)
	for _, c := range certs[1 : len(certs)-1] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("leaf does not verify against the published root: %v", err)
	}
	if len(certs[0].URIs) != 1 {
		t.Fatalf("leaf has URI SANs %v, want one SPIFFE ID", certs[0].URIs)
	}
	return certs[0].URIs[0].String()
}
