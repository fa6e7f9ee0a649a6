package controlplane

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshlite/meshlite/internal/kube"
	ixds "github.com/meshlite/meshlite/internal/xds"
)

// Scale is the cluster a measurement runs against and how it is probed.
type Scale struct {
	// Pods behind Services (pod i is selected by service i % Services),
	// bound round-robin to Nodes, all in Namespace.
	Pods, Services int
	Namespace      string
	Nodes          []string
	// Clients are simulated ztunnels: wildcard Delta ADS subscribers to
	// Address and Authorization.
	Clients int
	// Changes is how many pod changes are timed.
	Changes int
}

// PodUID is istiod's Workload key of pod i.
func (s Scale) PodUID(i int) string {
	return kube.DefaultClusterID + "//Pod/" + s.Namespace + "/" + podName(i)
}

func podName(i int) string { return fmt.Sprintf("pod-%d", i) }
func svcName(i int) string { return fmt.Sprintf("svc-%d", i) }

// podIP is pod i's made-up address (there is no kubelet: the harness
// writes the status a kubelet would).
func podIP(i int) string { return fmt.Sprintf("10.%d.%d.%d", 100+i/65536, (i/256)%256, i%256) }

// Populate creates the namespace, a service account, the Services and the
// Pods through the API, patching each pod's status to Running and Ready
// with an IP as a kubelet would. The client's rate limits are lifted:
// loading the apiserver is the point.
func Populate(ctx context.Context, rc *rest.Config, s Scale) error {
	rc = rest.CopyConfig(rc)
	rc.QPS, rc.Burst = 5000, 10000
	kc, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: s.Namespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace %s: %w", s.Namespace, err)
	}
	if _, err := kc.CoreV1().ServiceAccounts(s.Namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "app"}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service account: %w", err)
	}
	err = parallel(32, s.Services, func(i int) error {
		_, err := kc.CoreV1().Services(s.Namespace).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: svcName(i)},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": svcName(i)},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create service %s: %w", svcName(i), err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// The nodes have no kubelet and turn NotReady; the pods stay bound
	// rather than being evicted midway through a long run.
	tolerate := []corev1.Toleration{
		{Key: corev1.TaintNodeNotReady, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute},
		{Key: corev1.TaintNodeUnreachable, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute},
	}
	return parallel(32, s.Pods, func(i int) error {
		p, err := kc.CoreV1().Pods(s.Namespace).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: podName(i), Labels: map[string]string{"app": svcName(i % s.Services)}},
			Spec: corev1.PodSpec{NodeName: s.Nodes[i%len(s.Nodes)], ServiceAccountName: "app", Tolerations: tolerate,
				Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create pod %s: %w", podName(i), err)
		}
		ip := podIP(i)
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
		if _, err := kc.CoreV1().Pods(s.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("pod %s status: %w", podName(i), err)
		}
		return nil
	})
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func parallel(workers, n int, f func(int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	var failed atomic.Bool
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// BuildIstiod builds istiod-lite from the module at repo into out.
func BuildIstiod(ctx context.Context, repo, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, "./istiod-lite")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "GOFLAGS=", "GOWORK=off")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build istiod-lite: %w\n%s", err, b)
	}
	return nil
}

// Istiod is istiod-lite running as its own process, as in a cluster.
type Istiod struct {
	GRPCAddr, DebugAddr string
	// Ready is how long it took from start until /ready answered 200
	// (informers synced, first picture built).
	Ready time.Duration

	cmd    *exec.Cmd
	exited chan error
}

// StartIstiod starts bin against the cluster of kubeconfig, in namespace
// ns, on free loopback ports, and waits until it is ready. Its log goes to
// logw.
func StartIstiod(ctx context.Context, bin, kubeconfig, ns string, logw io.Writer) (*Istiod, error) {
	grpcPort, err := freePort()
	if err != nil {
		return nil, err
	}
	debugPort, err := freePort()
	if err != nil {
		return nil, err
	}
	i := &Istiod{
		GRPCAddr:  fmt.Sprintf("127.0.0.1:%d", grpcPort),
		DebugAddr: fmt.Sprintf("127.0.0.1:%d", debugPort),
		exited:    make(chan error, 1),
	}
	i.cmd = exec.Command(bin, "-kubeconfig", kubeconfig, "-namespace", ns,
		"-grpc-addr", i.GRPCAddr, "-debug-addr", i.DebugAddr, "-ready-addr", "",
		"-log-level", "warn", "-kube-qps", "500", "-kube-burst", "1000")
	i.cmd.Stdout, i.cmd.Stderr = logw, logw
	started := time.Now()
	if err := i.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start istiod-lite: %w", err)
	}
	go func() { i.exited <- i.cmd.Wait() }()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		resp, err := http.Get("http://" + i.DebugAddr + "/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				i.Ready = time.Since(started)
				return i, nil
			}
		}
		select {
		case err := <-i.exited:
			i.exited <- err
			return nil, fmt.Errorf("istiod-lite exited before it was ready: %v", err)
		case <-ctx.Done():
			i.Stop()
			return nil, fmt.Errorf("istiod-lite not ready: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop ends the process (SIGTERM, then SIGKILL after 10 s) and waits.
func (i *Istiod) Stop() {
	_ = i.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-i.exited:
		i.exited <- err
	case <-time.After(10 * time.Second):
		_ = i.cmd.Process.Kill()
		i.exited <- <-i.exited
	}
}

// PeakRSS is the process's peak resident set so far (VmHWM), in bytes.
func (i *Istiod) PeakRSS() (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", i.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("peak RSS: %w", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("peak RSS: %q: %w", v, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, errors.New("peak RSS: no VmHWM in /proc/<pid>/status")
}

// CPU is the user and system time the process has used so far.
func (i *Istiod) CPU() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", i.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("istiod-lite CPU time: %w", err)
	}
	// Fields after the parenthesised command name; utime and stime are the
	// 14th and 15th of the whole line, in clock ticks (100 per second on
	// Linux, which Go cannot ask sysconf for without cgo).
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0, fmt.Errorf("istiod-lite CPU time: cannot parse /proc/<pid>/stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("istiod-lite CPU time: %v %v", err1, err2)
	}
	return time.Duration(ut+st) * 10 * time.Millisecond, nil
}

// selfCPU is this process's user and system time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// fetch saves url's body to path (profiles from the debug endpoint).
func fetch(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// ZtunnelToken returns a token of istio-system/ztunnel (created if absent)
// for audience istio-ca, as a node proxy presents.
func ZtunnelToken(ctx context.Context, kc kubernetes.Interface) (string, error) {
	sas := kc.CoreV1().ServiceAccounts(kube.DefaultRootNamespace)
	if _, err := sas.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("create service account ztunnel: %w", err)
	}
	exp := int64(3600)
	tr, err := sas.CreateToken(ctx, "ztunnel", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{kube.TokenAudience}, ExpirationSeconds: &exp,
	}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for ztunnel: %w", err)
	}
	return tr.Status.Token, nil
}

// ClientTLS trusts the root istiod-lite publishes (ConfigMap
// istio-ca-root-cert in ns), waiting for it to appear.
func ClientTLS(ctx context.Context, kc kubernetes.Interface, ns string) (*tls.Config, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		cm, err := kc.CoreV1().ConfigMaps(ns).Get(ctx, kube.CARootConfigMap, metav1.GetOptions{})
		if err == nil {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM([]byte(cm.Data[kube.CARootConfigMapKey])) {
				return nil, fmt.Errorf("ConfigMap %s/%s holds no certificate", ns, kube.CARootConfigMap)
			}
			return &tls.Config{RootCAs: pool, ServerName: "istiod." + ns + ".svc", MinVersion: tls.VersionTLS13}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("ConfigMap %s/%s: %w", ns, kube.CARootConfigMap, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Measurement is what one run of Measure saw.
type Measurement struct {
	// FullPush is from connecting the clients until every one holds the
	// whole initial state; Held is how many addresses each then holds.
	FullPush time.Duration
	Held     int
	// PushBytes is the size of the largest first Address response a
	// client received (one DeltaDiscoveryResponse's resources).
	PushBytes int64
	// Latencies of each pod change until every client had it, sorted.
	Latencies []time.Duration
	PeakRSS   int64
	// CPU time spent during the full push by istiod-lite and by this
	// process (the simulated clients), which share the machine.
	IstiodPushCPU, ClientsPushCPU time.Duration
}

// Percentile returns the p-th percentile (0 < p <= 100) of the change
// latencies, nearest rank.
func (m Measurement) Percentile(p float64) time.Duration {
	if len(m.Latencies) == 0 {
		return 0
	}
	rank := int(math.Ceil(float64(len(m.Latencies))*p/100)) - 1
	if rank < 0 {
		rank = 0
	}
	if rank >= len(m.Latencies) {
		rank = len(m.Latencies) - 1
	}
	return m.Latencies[rank]
}

// MeasureConfig is what Measure needs.
type MeasureConfig struct {
	Scale  Scale
	Istiod *Istiod
	// RESTConfig is used to change pods.
	RESTConfig *rest.Config
	TLS        *tls.Config
	Token      string
	// ProfileDir, when set, gets istiod-lite's CPU profile during the
	// full push and its heap right after.
	ProfileDir string
}

// Measure connects Scale.Clients Delta ADS clients to istiod-lite, times
// the full push to all of them, then times Scale.Changes pod label changes
// until every client holds the new version; the clients stay connected
// throughout.
func Measure(ctx context.Context, cfg MeasureConfig) (Measurement, error) {
	var m Measurement
	s := cfg.Scale
	kc, err := kubernetes.NewForConfig(cfg.RESTConfig)
	if err != nil {
		return m, err
	}
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stop(); wg.Wait() }()

	var profDone chan error
	stopClientProfile := func() {}
	if cfg.ProfileDir != "" {
		profDone = make(chan error, 1)
		go func() {
			profDone <- fetch("http://"+cfg.Istiod.DebugAddr+"/debug/pprof/profile?seconds=6", filepath.Join(cfg.ProfileDir, "istiod-cpu-fullpush.pprof"))
		}()
		time.Sleep(100 * time.Millisecond)
		// The simulated clients share the cores; their profile shows what
		// they cost. Profiling is already on when the test binary runs with
		// -cpuprofile; then that profile holds them instead.
		if f, err := os.Create(filepath.Join(cfg.ProfileDir, "clients-cpu-fullpush.pprof")); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				stopClientProfile = func() { pprof.StopCPUProfile(); f.Close() }
				defer func() { stopClientProfile() }()
			} else {
				f.Close()
			}
		}
	}
	clients := make([]*counter, s.Clients)
	istiodCPU0, err := cfg.Istiod.CPU()
	if err != nil {
		return m, err
	}
	selfCPU0 := selfCPU()
	start := time.Now()
	for i := range clients {
		c := &counter{}
		md, _ := structpb.NewStruct(map[string]any{
			ixds.MetadataNamespace: kube.DefaultRootNamespace, ixds.MetadataServiceAccount: "ztunnel", ixds.MetadataClusterID: kube.DefaultClusterID,
		})
		xc, err := ixds.NewClient(ixds.ClientConfig{
			Target: cfg.Istiod.GRPCAddr, TLS: cfg.TLS,
			Token:         func(context.Context) (string, error) { return cfg.Token, nil },
			Node:          &corev3.Node{Id: fmt.Sprintf("ztunnel~10.0.%d.%d~ztunnel-%d.istio-system~istio-system.svc.cluster.local", i/256, i%256, i), Metadata: md},
			Subscriptions: []ixds.Subscription{{TypeURL: ixds.TypeAddress}, {TypeURL: ixds.TypeAuthorization}},
			Handler:       c,
		})
		if err != nil {
			return m, err
		}
		c.client = xc
		clients[i] = c
		wg.Add(1)
		go func() { defer wg.Done(); _ = xc.Run(runCtx) }()
	}
	for i, c := range clients {
		select {
		case <-c.client.Synced():
		case <-time.After(5 * time.Minute):
			return m, fmt.Errorf("client %d got no initial push within 5 minutes", i)
		case <-ctx.Done():
			return m, ctx.Err()
		}
	}
	m.FullPush = time.Since(start)
	m.ClientsPushCPU = selfCPU() - selfCPU0
	stopClientProfile()
	stopClientProfile = func() {}
	istiodCPU1, err := cfg.Istiod.CPU()
	if err != nil {
		return m, err
	}
	m.IstiodPushCPU = istiodCPU1 - istiodCPU0
	if cfg.ProfileDir != "" {
		if err := fetch("http://"+cfg.Istiod.DebugAddr+"/debug/pprof/heap", filepath.Join(cfg.ProfileDir, "istiod-heap-after-push.pprof")); err != nil {
			return m, fmt.Errorf("heap profile: %w", err)
		}
		if err := <-profDone; err != nil {
			return m, fmt.Errorf("cpu profile: %w", err)
		}
	}
	m.Held = len(clients[0].client.Versions(ixds.TypeAddress))
	for _, c := range clients {
		if n := c.firstBytes.Load(); n > m.PushBytes {
			m.PushBytes = n
		}
		if held := len(c.client.Versions(ixds.TypeAddress)); held < s.Pods+s.Services {
			return m, fmt.Errorf("a client holds %d addresses after the initial push, want at least %d", held, s.Pods+s.Services)
		}
	}

	// Pod changes, spread over the pods: time until every client holds
	// the new version.
	for i := 0; i < s.Changes; i++ {
		n := (i * 7919) % s.Pods
		uid := s.PodUID(n)
		for _, c := range clients {
			c.expect(uid)
		}
		t0 := time.Now()
		patch := fmt.Sprintf(`{"metadata":{"labels":{"version":"v%d"}}}`, i+1)
		if _, err := kc.CoreV1().Pods(s.Namespace).Patch(ctx, podName(n), types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			return m, fmt.Errorf("change pod %s: %w", podName(n), err)
		}
		for _, c := range clients {
			select {
			case <-c.arrived:
			case <-time.After(30 * time.Second):
				return m, fmt.Errorf("change %d of pod %s did not reach every client within 30s", i, podName(n))
			case <-ctx.Done():
				return m, ctx.Err()
			}
		}
		m.Latencies = append(m.Latencies, time.Since(t0))
	}
	sort.Slice(m.Latencies, func(i, j int) bool { return m.Latencies[i] < m.Latencies[j] })
	if m.PeakRSS, err = cfg.Istiod.PeakRSS(); err != nil {
		return m, err
	}
	return m, nil
}

// counter is a simulated ztunnel: it accepts everything and notes the size
// of its first Address response and the arrival of the resource it waits
// for.
type counter struct {
	client     *ixds.Client
	firstBytes atomic.Int64
	mu         sync.Mutex
	waiting    string
	arrived    chan struct{}
}

func (c *counter) expect(uid string) {
	c.mu.Lock()
	c.waiting = uid
	c.arrived = make(chan struct{})
	c.mu.Unlock()
}

func (c *counter) Apply(typeURL string, res []*discovery.Resource, _ []string) error {
	if typeURL == ixds.TypeAddress && c.firstBytes.Load() == 0 {
		c.firstBytes.Store(int64(proto.Size(&discovery.DeltaDiscoveryResponse{Resources: res})))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.waiting == "" {
		return nil
	}
	for _, r := range res {
		if r.GetName() == c.waiting {
			c.waiting = ""
			close(c.arrived)
			break
		}
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
