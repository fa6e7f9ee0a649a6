package controlplane

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/kube"
	ixds "github.com/meshlite/meshlite/internal/xds"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkScale measures istiod-lite, run as its own process, against a
// cluster of SCALE_PODS pods (default 10000) behind SCALE_SERVICES services
// (1000) with SCALE_CLIENTS Delta ADS clients (100): the time until every
// client holds the full initial push, its size, the latency of a pod change
// to all clients, and istiod-lite's peak RSS. Run it with
//
//	go test -run XXX -bench Scale -benchtime 1x ./istiod-lite/controlplane/
func BenchmarkScale(b *testing.B) {
	pods, services, clients := envInt("SCALE_PODS", 10000), envInt("SCALE_SERVICES", 1000), envInt("SCALE_CLIENTS", 100)
	changes := envInt("SCALE_CHANGES", 50)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	bin := filepath.Join(b.TempDir(), "istiod-lite")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/meshlite/meshlite/istiod-lite")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build istiod-lite: %v\n%s", err, out)
	}

	rc := rest.CopyConfig(env.rc)
	rc.QPS, rc.Burst = 5000, 10000
	kc := kubernetes.NewForConfigOrDie(rc)
	ns := "scale"
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	if _, err := kc.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "app"}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	parallel(b, 32, services, func(i int) error {
		_, err := kc.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc-%d", i)},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": fmt.Sprintf("svc-%d", i)},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
		}, metav1.CreateOptions{})
		return err
	})
	parallel(b, 32, pods, func(i int) error {
		p, err := kc.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%d", i), Labels: map[string]string{"app": fmt.Sprintf("svc-%d", i%services)}},
			Spec: corev1.PodSpec{NodeName: []string{"node-a", "node-b"}[i%2], ServiceAccountName: "app",
				Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		ip := fmt.Sprintf("10.%d.%d.%d", 100+i/65536, (i/256)%256, i%256)
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
		_, err = kc.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		return err
	})
	b.Logf("created %d services and %d pods in %s", services, pods, time.Since(start).Round(time.Millisecond))

	// istiod-lite as a process, as it runs in a cluster.
	grpcPort, debugPort := freePort(), freePort()
	cmd := exec.CommandContext(ctx, bin, "-kubeconfig", env.layout.AdminKubeconfig, "-namespace", "istio-system",
		"-grpc-addr", fmt.Sprintf("127.0.0.1:%d", grpcPort), "-debug-addr", fmt.Sprintf("127.0.0.1:%d", debugPort),
		"-ready-addr", "", "-log-level", "warn", "-kube-qps", "500", "-kube-burst", "1000")
	cmd.Stderr = os.Stderr
	started := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/ready", debugPort))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Since(started) > 5*time.Minute {
			b.Fatal("istiod-lite not ready within 5 minutes")
		}
		time.Sleep(50 * time.Millisecond)
	}
	ready := time.Since(started)

	// The clients: one ztunnel identity, a node id each.
	if _, err := kc.CoreV1().ServiceAccounts("istio-system").Get(ctx, "ztunnel", metav1.GetOptions{}); err != nil {
		if _, err := kc.CoreV1().ServiceAccounts("istio-system").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel"}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	tok := token(b, "istio-system", "ztunnel", nil, "istio-ca")
	tlsCfg := scaleTLS(b, kc)
	counters := make([]*scaleClient, clients)
	var wg sync.WaitGroup
	runCtx, stop := context.WithCancel(ctx)
	defer func() { stop(); wg.Wait() }()
	profDir := os.Getenv("SCALE_PROFILE_DIR")
	var profDone chan struct{}
	if profDir != "" {
		profDone = make(chan struct{})
		go func() {
			defer close(profDone)
			fetch(b, fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=6", debugPort), filepath.Join(profDir, "cpu-fullpush.pprof"))
		}()
		time.Sleep(100 * time.Millisecond)
	}
	connectStart := time.Now()
	for i := range counters {
		sc := &scaleClient{synced: make(chan struct{}), want: map[string]string{}}
		counters[i] = sc
		c, err := ixds.NewClient(ixds.ClientConfig{
			Target: fmt.Sprintf("127.0.0.1:%d", grpcPort), TLS: tlsCfg,
			Token:         func(context.Context) (string, error) { return tok, nil },
			Node:          node(fmt.Sprintf("ztunnel~scale-%d", i), "istio-system", "ztunnel"),
			Subscriptions: []ixds.Subscription{{TypeURL: ixds.TypeAddress}, {TypeURL: ixds.TypeAuthorization}},
			Handler:       sc,
		})
		if err != nil {
			b.Fatal(err)
		}
		sc.client = c
		wg.Add(1)
		go func() { defer wg.Done(); _ = c.Run(runCtx) }()
	}
	for _, sc := range counters {
		select {
		case <-sc.client.Synced():
		case <-time.After(5 * time.Minute):
			b.Fatal("a client did not get its initial push within 5 minutes")
		}
	}
	fullPush := time.Since(connectStart)
	if profDir != "" {
		fetch(b, fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/heap", debugPort), filepath.Join(profDir, "heap-after-push.pprof"))
		<-profDone
	}
	var firstSize int64
	for _, sc := range counters {
		if n := sc.firstBytes.Load(); n > firstSize {
			firstSize = n
		}
	}
	held := len(counters[0].client.Versions(ixds.TypeAddress))
	b.Logf("istiod-lite ready %s after start; %d clients hold %d addresses each %s after connecting; initial Address push %.1f MB",
		ready.Round(time.Millisecond), clients, held, fullPush.Round(time.Millisecond), float64(firstSize)/1e6)
	if held < pods+services {
		b.Errorf("clients hold %d addresses, want at least %d", held, pods+services)
	}

	// Pod changes: time until every client holds the new version.
	var lat []time.Duration
	for i := 0; i < changes; i++ {
		name := fmt.Sprintf("pod-%d", (i*7919)%pods)
		uid := "Kubernetes//Pod/" + ns + "/" + name
		for _, sc := range counters {
			sc.expect(uid)
		}
		t0 := time.Now()
		patch := fmt.Sprintf(`{"metadata":{"labels":{"version":"v%d"}}}`, i+1)
		if _, err := kc.CoreV1().Pods(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			b.Fatal(err)
		}
		for _, sc := range counters {
			select {
			case <-sc.arrived:
			case <-time.After(30 * time.Second):
				b.Fatalf("change %d never reached a client", i)
			}
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p50, p99 := lat[len(lat)/2], lat[(len(lat)*99+99)/100-1]
	rss := peakRSS(b, cmd.Process.Pid)
	b.Logf("pod change to all %d clients: p50 %s p99 %s max %s; istiod-lite peak RSS %.0f MB",
		clients, p50.Round(time.Millisecond), p99.Round(time.Millisecond), lat[len(lat)-1].Round(time.Millisecond), float64(rss)/1e6)
	b.ReportMetric(fullPush.Seconds(), "full-push-s")
	b.ReportMetric(float64(firstSize)/1e6, "push-MB")
	b.ReportMetric(float64(p99.Microseconds())/1000, "change-p99-ms")
	b.ReportMetric(float64(rss)/1e6, "peak-RSS-MB")
}

func fetch(b *testing.B, url, path string) {
	resp, err := http.Get(url)
	if err != nil {
		b.Error(err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		b.Error(err)
		return
	}
	defer f.Close()
	_, _ = io.Copy(f, resp.Body)
}

// scaleClient counts what one client received.
type scaleClient struct {
	client     *ixds.Client
	synced     chan struct{}
	firstBytes atomic.Int64
	mu         sync.Mutex
	want       map[string]string
	waiting    string
	arrived    chan struct{}
}

func (s *scaleClient) expect(uid string) {
	s.mu.Lock()
	s.waiting = uid
	s.arrived = make(chan struct{})
	s.mu.Unlock()
}

func (s *scaleClient) Apply(typeURL string, res []*discovery.Resource, _ []string) error {
	if typeURL == ixds.TypeAddress && s.firstBytes.Load() == 0 {
		s.firstBytes.Store(int64(proto.Size(&discovery.DeltaDiscoveryResponse{Resources: res})))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range res {
		if s.waiting != "" && r.GetName() == s.waiting {
			s.waiting = ""
			close(s.arrived)
		}
	}
	return nil
}

func parallel(b *testing.B, workers, n int, f func(int) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		b.Fatal(err)
	}
}

func peakRSS(b *testing.B, pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb * 1024
		}
	}
	b.Fatal("no VmHWM")
	return 0
}

// scaleTLS trusts the root istiod-lite keeps in its Secret.
func scaleTLS(b *testing.B, kc kubernetes.Interface) *tls.Config {
	s, err := kc.CoreV1().Secrets("istio-system").Get(context.Background(), kube.CASecret, metav1.GetOptions{})
	if err != nil {
		b.Fatal(err)
	}
	certs, err := identity.ParseCertsPEM(s.Data["ca-cert.pem"])
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(certs[len(certs)-1])
	return &tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS13}
}
