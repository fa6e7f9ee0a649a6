package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/e2e/cluster"
	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
)

// env is the real control plane (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler) and one istiod-lite, shared by
// the tests of this package; each test works in its own namespace.
var env struct {
	layout cluster.Layout
	rc     *rest.Config
	kc     kubernetes.Interface
	gc     gatewayclient.Interface
	dc     dynamic.Interface
	cp     *ControlPlane
	cancel context.CancelFunc
	done   chan error
	log    *slog.Logger
	saKey  *ecdsa.PrivateKey
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	bin, _ := filepath.Abs(filepath.Join("..", "..", ".cache", "kube", cluster.KubeVersion))
	if missing := cluster.MissingBinaries(bin); len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: Kubernetes binaries %v missing in %s: build them with hack/kube-bins.sh (make does it first)\n", missing, bin)
		return 1
	}
	dir, err := os.MkdirTemp("", "istiod-lite-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	level := slog.LevelWarn
	if os.Getenv("ISTIOD_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	env.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	l, err := cluster.Start(ctx, cluster.Config{
		Dir: dir, BinDir: bin, HostIP: netip.MustParseAddr("127.0.0.1"),
		ServiceCIDR: netip.MustParsePrefix("10.96.0.0/16"), ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16"),
		APIServerPort: freePort(), EtcdClientPort: freePort(), EtcdPeerPort: freePort(),
	})
	defer cluster.Stop(l)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: start the Kubernetes control plane: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "kubernetes control plane up in %s\n", time.Since(start).Round(time.Millisecond))
	env.layout = l
	if env.rc, err = cluster.RESTConfig(l.AdminKubeconfig); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	env.kc = kubernetes.NewForConfigOrDie(env.rc)
	env.gc = gatewayclient.NewForConfigOrDie(env.rc)
	env.dc = dynamic.NewForConfigOrDie(env.rc)
	if env.saKey, err = readECKey(l.PKI.ServiceAccountKey); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, ns := range []string{"istio-system"} {
		if _, err := env.kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	for _, n := range []string{"node-a", "node-b"} {
		if _, err := env.kc.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n,
			Labels: map[string]string{"topology.kubernetes.io/zone": "zone-" + n}}}, metav1.CreateOptions{}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	code := m.Run()
	if env.cp != nil {
		env.cancel()
		if err := <-env.done; err != nil {
			fmt.Fprintf(os.Stderr, "istiod-lite stopped with %v\n", err)
			code = 1
		}
	}
	return code
}

var istiodOnce sync.Once

// istiodT returns the in-process istiod-lite the tests share, starting it
// on first use (the scale benchmark runs its own as a separate process).
func istiodT() *ControlPlane {
	istiodOnce.Do(func() {
		if err := startIstiod(context.Background()); err != nil {
			panic(fmt.Sprintf("start istiod-lite: %v", err))
		}
	})
	return env.cp
}

func startIstiod(ctx context.Context) error {
	cp, err := New(ctx, Config{
		RESTConfig: env.rc, Namespace: "istio-system", ServiceAccount: "istiod",
		GRPCAddr: "127.0.0.1:0", DebugAddr: "127.0.0.1:0",
		TrustedNodeAccounts: []string{"istio-system/ztunnel"},
		Log:                 env.log,
	})
	if err != nil {
		return err
	}
	env.cp = cp
	runCtx, cancel := context.WithCancel(context.Background())
	env.cancel = cancel
	env.done = make(chan error, 1)
	go func() { env.done <- cp.Run(runCtx) }()
	return nil
}

func readECKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("no PEM in %s", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	ec, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s is a %T", path, k)
	}
	return ec, nil
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// namespace creates a namespace for one test and deletes it afterwards.
func namespace(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	if _, err := env.kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = env.kc.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

func serviceAccount(t *testing.T, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	sa, err := env.kc.CoreV1().ServiceAccounts(ns).Create(ctxT(t, 10*time.Second),
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return sa
}

type podSpec struct {
	ns, name, sa, node, ip string
	labels, annotations    map[string]string
}

// runPod creates a pod bound to a node and reports it Running and Ready
// with ip, as a kubelet would.
func runPod(t *testing.T, s podSpec) *corev1.Pod {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	p, err := env.kc.CoreV1().Pods(s.ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Labels: s.labels, Annotations: s.annotations},
		Spec: corev1.PodSpec{
			NodeName: s.node, ServiceAccountName: s.sa,
			Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status = corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: s.ip, PodIPs: []corev1.PodIP{{IP: s.ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
	}
	p, err = env.kc.CoreV1().Pods(s.ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// token returns a real service-account token for sa, bound to pod when
// given, for audience.
func token(t testing.TB, ns, sa string, pod *corev1.Pod, audience string) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{audience}, ExpirationSeconds: ptrTo[int64](3600),
	}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := env.kc.CoreV1().ServiceAccounts(ns).CreateToken(ctxT(t, 10*time.Second), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

func ptrTo[T any](v T) *T { return &v }

// mintToken signs a service-account token with the apiserver's own key,
// with the given expiry (the apiserver would never issue an expired one).
func mintToken(t *testing.T, sa *corev1.ServiceAccount, audience string, exp time.Time) string {
	t.Helper()
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	now := time.Now()
	head := enc(map[string]string{"alg": "ES256", "typ": "JWT"})
	body := enc(map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local",
		"sub": "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
		"aud": []string{audience},
		"iat": now.Add(-2 * time.Hour).Unix(), "nbf": now.Add(-2 * time.Hour).Unix(), "exp": exp.Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      sa.Namespace,
			"serviceaccount": map[string]string{"name": sa.Name, "uid": string(sa.UID)},
		},
	})
	digest := sha256.Sum256([]byte(head + "." + body))
	r, s, err := ecdsa.Sign(rand.Reader, env.saKey, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return head + "." + body + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// clientTLS trusts the mesh root and checks istiod's DNS name.
func clientTLS() *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(istiodT().Authority().Root())
	return &tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS13}
}

func node(id, ns, sa string) *corev3.Node {
	md, _ := structpb.NewStruct(map[string]any{
		ixds.MetadataNamespace: ns, ixds.MetadataServiceAccount: sa, ixds.MetadataClusterID: "Kubernetes",
	})
	return &corev3.Node{Id: id, Metadata: md}
}

// response is one response as a recorder saw it.
type response struct {
	typeURL   string
	names     []string
	removed   []string
	resources []*discovery.Resource
	at        time.Time
}

// recorder is an xDS handler that keeps every response and the decoded
// state; reject, when set, makes it NACK matching responses.
type recorder struct {
	mu        sync.Mutex
	responses []response
	addresses map[string]*workload.Address
	policies  map[string]*security.Authorization
	reject    func(response) error
	changed   chan struct{}
}

func newRecorder() *recorder {
	return &recorder{addresses: map[string]*workload.Address{}, policies: map[string]*security.Authorization{}, changed: make(chan struct{}, 1)}
}

func (r *recorder) Apply(typeURL string, res []*discovery.Resource, removed []string) error {
	resp := response{typeURL: typeURL, removed: removed, resources: res, at: time.Now()}
	for _, x := range res {
		resp.names = append(resp.names, x.GetName())
	}
	r.mu.Lock()
	defer func() {
		r.mu.Unlock()
		select {
		case r.changed <- struct{}{}:
		default:
		}
	}()
	r.responses = append(r.responses, resp)
	if r.reject != nil {
		if err := r.reject(resp); err != nil {
			return err
		}
	}
	for _, x := range res {
		switch typeURL {
		case ixds.TypeAddress:
			a := &workload.Address{}
			if err := x.GetResource().UnmarshalTo(a); err != nil {
				return err
			}
			r.addresses[x.GetName()] = a
		case ixds.TypeAuthorization:
			a := &security.Authorization{}
			if err := x.GetResource().UnmarshalTo(a); err != nil {
				return err
			}
			r.policies[x.GetName()] = a
		}
	}
	for _, n := range removed {
		delete(r.addresses, n)
		delete(r.policies, n)
	}
	return nil
}

// waitFor polls cond (under the recorder's lock) until it holds.
func (r *recorder) waitFor(t *testing.T, what string, timeout time.Duration, cond func(*recorder) bool) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		ok := cond(r)
		r.mu.Unlock()
		if ok {
			if testing.Verbose() {
				t.Logf("%s: %s", what, time.Since(start).Round(time.Millisecond))
			}
			return time.Since(start)
		}
		select {
		case <-r.changed:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("timed out after %s waiting for %s; %d responses, addresses %v", timeout, what, len(r.responses), keys(r.addresses))
		}
	}
}

func (r *recorder) since(i int) []response {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]response(nil), r.responses[i:]...)
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.responses)
}

func (r *recorder) workload(uid string) *workload.Workload {
	r.mu.Lock()
	defer r.mu.Unlock()
	return proto.Clone(r.addresses[uid].GetWorkload()).(*workload.Workload)
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// xdsClient connects a Delta ADS client as ns/sa with tok and runs it until
// the test ends.
func xdsClient(t *testing.T, tok string, n *corev3.Node, h ixds.Handler, subs ...ixds.Subscription) *ixds.Client {
	t.Helper()
	if len(subs) == 0 {
		subs = []ixds.Subscription{{TypeURL: ixds.TypeAddress}, {TypeURL: ixds.TypeAuthorization}}
	}
	c, err := ixds.NewClient(ixds.ClientConfig{
		Target: istiodT().GRPCAddr().String(), TLS: clientTLS(),
		Token:         func(context.Context) (string, error) { return tok, nil },
		Node:          n,
		Subscriptions: subs,
		Handler:       h,
		MinBackoff:    50 * time.Millisecond,
		Log:           env.log,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func ecdsaKey() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }
