package istiodtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/meshlite/meshlite/e2e/meshharness"
	"github.com/meshlite/meshlite/e2e/sandbox"
	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
)

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func ptrTo[T any](v T) *T { return &v }

// podUID is the Workload key istiod gives a pod.
func podUID(ns, name string) string { return "Kubernetes//Pod/" + ns + "/" + name }

// serviceKey is the Address key of a Service.
func serviceKey(ns, name string) string { return ns + "/" + name + "." + ns + ".svc.cluster.local" }

// arrival is one resource (or removal) in one response, as received.
type arrival struct {
	at      time.Time
	name    string
	addr    *workload.Address // nil for a removal
	removed bool
}

// recorder is an xDS handler that keeps what it holds and every arrival;
// reject, when set, NACKs the responses it returns an error for.
type recorder struct {
	mu        sync.Mutex
	arrivals  []arrival
	addresses map[string]*workload.Address
	policies  map[string]*security.Authorization
	reject    func(names []string) error
	changed   chan struct{}
}

func newRecorder() *recorder {
	return &recorder{addresses: map[string]*workload.Address{}, policies: map[string]*security.Authorization{}, changed: make(chan struct{}, 1)}
}

func (r *recorder) Apply(typeURL string, res []*discovery.Resource, removed []string) error {
	now := time.Now()
	r.mu.Lock()
	defer func() {
		r.mu.Unlock()
		select {
		case r.changed <- struct{}{}:
		default:
		}
	}()
	if r.reject != nil {
		names := make([]string, 0, len(res))
		for _, x := range res {
			names = append(names, x.GetName())
		}
		if err := r.reject(names); err != nil {
			return err
		}
	}
	switch typeURL {
	case ixds.TypeAddress:
		for _, x := range res {
			a := &workload.Address{}
			if err := x.GetResource().UnmarshalTo(a); err != nil {
				return fmt.Errorf("address %s: %w", x.GetName(), err)
			}
			r.addresses[x.GetName()] = a
			r.arrivals = append(r.arrivals, arrival{at: now, name: x.GetName(), addr: a})
		}
		for _, n := range removed {
			delete(r.addresses, n)
			r.arrivals = append(r.arrivals, arrival{at: now, name: n, removed: true})
		}
	case ixds.TypeAuthorization:
		for _, x := range res {
			a := &security.Authorization{}
			if err := x.GetResource().UnmarshalTo(a); err != nil {
				return fmt.Errorf("authorization %s: %w", x.GetName(), err)
			}
			r.policies[x.GetName()] = a
		}
		for _, n := range removed {
			delete(r.policies, n)
		}
	default:
		return fmt.Errorf("unexpected type %s", typeURL)
	}
	return nil
}

// waitFor waits until cond (called under the recorder's lock) holds.
func (r *recorder) waitFor(t *testing.T, what string, timeout time.Duration, cond func(*recorder) bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		ok := cond(r)
		r.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-r.changed:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
	}
}

// first returns the time of the first arrival of name that satisfies ok
// (nil ok: a removal).
func (r *recorder) first(name string, ok func(*workload.Address) bool) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.arrivals {
		if a.name != name {
			continue
		}
		if (ok == nil && a.removed) || (ok != nil && a.addr != nil && ok(a.addr)) {
			return a.at, true
		}
	}
	return time.Time{}, false
}

// ever reports whether any arrival of name satisfied ok.
func (r *recorder) ever(name string, ok func(*workload.Address) bool) bool {
	_, found := r.first(name, ok)
	return found
}

func (r *recorder) get(name string) *workload.Address {
	r.mu.Lock()
	defer r.mu.Unlock()
	if a := r.addresses[name]; a != nil {
		return proto.Clone(a).(*workload.Address)
	}
	return nil
}

// xdsClient runs a Delta ADS client (Address and Authorization, wildcard)
// to istiod as node id with tok until the test ends.
func xdsClient(t *testing.T, d *istiod, tok, id string, h ixds.Handler) *ixds.Client {
	t.Helper()
	c, err := ixds.NewClient(ixds.ClientConfig{
		Target: d.addr, TLS: d.tlsConfig(),
		Token:         func(context.Context) (string, error) { return tok, nil },
		Node:          ztunnelNode(id),
		Subscriptions: []ixds.Subscription{{TypeURL: ixds.TypeAddress}, {TypeURL: ixds.TypeAuthorization}},
		Handler:       h,
		MinBackoff:    50 * time.Millisecond,
		Log:           testLog(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-c.Synced():
	case <-time.After(15 * time.Second):
		t.Fatalf("client %s: no initial responses from %s within 15s", id, d.addr)
	}
	return c
}

// ztunnelNode is the Node a ztunnel in istio-system sends.
func ztunnelNode(id string) *corev3.Node {
	md, _ := structpb.NewStruct(map[string]any{
		ixds.MetadataNamespace: systemNS, ixds.MetadataServiceAccount: "ztunnel", ixds.MetadataClusterID: "Kubernetes",
	})
	return &corev3.Node{Id: id, Metadata: md}
}

// testLog shows the client's warnings (rejections, reconnects).
func testLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// echoPod is a pod of the sample app bound to node, HTTP on 8080 (port
// "http") and TCP echo on 9090, Ready once 9090 accepts.
func echoPod(ns, name, sa, node string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: sa,
			TerminationGracePeriodSeconds: ptrTo[int64](1),
			Containers: []corev1.Container{{
				Name: "echo", Image: "meshlite/echo:dev",
				Args: []string{"server", "--http-ports", "8080", "--tcp-ports", "9090", "--grpc-ports", ""},
				Ports: []corev1.ContainerPort{
					{Name: "http", ContainerPort: 8080},
					{Name: "tcp", ContainerPort: 9090},
				},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(9090)}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
}

// runPods creates pods and waits until each is Running and Ready.
func runPods(t *testing.T, sb *sandbox.Sandbox, pods ...*corev1.Pod) map[string]*corev1.Pod {
	t.Helper()
	ctx := ctxT(t, 2*time.Minute)
	for _, p := range pods {
		if _, err := sb.Client().CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s/%s: %v", p.Namespace, p.Name, err)
		}
	}
	out := map[string]*corev1.Pod{}
	for _, p := range pods {
		err := sb.WaitFor(ctx, 90*time.Second, "pod "+p.Namespace+"/"+p.Name+" ready", func(ctx context.Context) (bool, error) {
			got, err := sb.Client().CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			if got.Status.Phase == corev1.PodFailed || got.Status.Phase == corev1.PodSucceeded {
				return false, fmt.Errorf("pod ended: %s %s", got.Status.Phase, got.Status.Message)
			}
			if got.Status.PodIP != "" && meshharness.Ready(got) {
				out[p.Name] = got
				return true, nil
			}
			return false, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// podEvents records, from a watch on a namespace, when the API first
// showed each pod with an IP and first showed it Ready.
type podEvents struct {
	mu            sync.Mutex
	withIP, ready map[string]time.Time
}

func watchPods(t *testing.T, sb *sandbox.Sandbox, ns string) *podEvents {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := sb.Client().CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	pe := &podEvents{withIP: map[string]time.Time{}, ready: map[string]time.Time{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			p, ok := ev.Object.(*corev1.Pod)
			if !ok || ev.Type == watch.Deleted {
				continue
			}
			now := time.Now()
			pe.mu.Lock()
			if _, seen := pe.withIP[p.Name]; !seen && p.Status.PodIP != "" {
				pe.withIP[p.Name] = now
			}
			if _, seen := pe.ready[p.Name]; !seen && meshharness.Ready(p) {
				pe.ready[p.Name] = now
			}
			pe.mu.Unlock()
		}
	}()
	t.Cleanup(func() { w.Stop(); cancel(); <-done })
	return pe
}

func (pe *podEvents) times(name string) (withIP, ready time.Time) {
	pe.mu.Lock()
	defer pe.mu.Unlock()
	return pe.withIP[name], pe.ready[name]
}

// token asks the TokenRequest API for a token of ns/sa for audience,
// bound to pod when given.
func token(t *testing.T, sb *sandbox.Sandbox, ns, sa string, pod *corev1.Pod, audience string) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{audience}, ExpirationSeconds: ptrTo[int64](3600),
	}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := sb.Client().CoreV1().ServiceAccounts(ns).CreateToken(ctxT(t, 10*time.Second), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// mintToken signs a service-account JWT for sa with key, as the apiserver
// would (same issuer and claims), expiring at exp.
func mintToken(t *testing.T, key *ecdsa.PrivateKey, sa *corev1.ServiceAccount, audience string, exp time.Time) string {
	t.Helper()
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	iat := exp.Add(-time.Hour)
	head := enc(map[string]string{"alg": "ES256", "typ": "JWT"})
	body := enc(map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local",
		"sub": "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
		"aud": []string{audience},
		"iat": iat.Unix(), "nbf": iat.Unix(), "exp": exp.Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      sa.Namespace,
			"serviceaccount": map[string]string{"name": sa.Name, "uid": string(sa.UID)},
		},
	})
	digest := sha256.Sum256([]byte(head + "." + body))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return head + "." + body + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// clusterSAKey is the apiserver's service-account signing key.
func clusterSAKey(t *testing.T, sb *sandbox.Sandbox) *ecdsa.PrivateKey {
	t.Helper()
	b, err := os.ReadFile(sb.Layout.PKI.ServiceAccountKey)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("no PEM in %s", sb.Layout.PKI.ServiceAccountKey)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	ec, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("service-account key is a %T, want ECDSA", k)
	}
	return ec
}

func otherKey(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func text(m proto.Message) string { return prototext.Format(m) }
