package workloadapi

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/e2e/cluster"
)

// env is the control plane and the istiod-lite process the tests share.
var env struct {
	kc        kubernetes.Interface
	dc        dynamic.Interface
	grpcAddr  string
	root      *x509.Certificate
	istiodLog string
}

// Node labels of the locality test.
var nodeLabels = map[string]map[string]string{
	"node-a": {
		corev1.LabelTopologyRegion: "region-1", corev1.LabelTopologyZone: "zone-1a",
		"topology.istio.io/subzone": "rack-7",
	},
	"node-b": {},
}

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
		return 1
	}
	repo, err := repoRoot()
	if err != nil {
		return fail("%v", err)
	}
	bin := filepath.Join(repo, ".cache", "kube", cluster.KubeVersion)
	if missing := cluster.MissingBinaries(bin); len(missing) > 0 {
		return fail("Kubernetes binaries %v missing in %s: build them with hack/kube-bins.sh (make deps)", missing, bin)
	}
	dir, err := os.MkdirTemp("", "workloadapi-interop-")
	if err != nil {
		return fail("%v", err)
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// istiod-lite exactly as the main module builds it (its own dependency
	// versions, not this module's).
	istiod := filepath.Join(dir, "istiod-lite")
	build := exec.CommandContext(ctx, "go", "build", "-o", istiod, "./istiod-lite")
	build.Dir = repo
	build.Env = append(os.Environ(), "GOFLAGS=", "GOWORK=off")
	if out, err := build.CombinedOutput(); err != nil {
		return fail("build istiod-lite: %v\n%s", err, out)
	}

	start := time.Now()
	l, err := cluster.Start(ctx, cluster.Config{
		Dir: filepath.Join(dir, "cluster"), BinDir: bin, HostIP: netip.MustParseAddr("127.0.0.1"),
		ServiceCIDR: netip.MustParsePrefix("10.96.0.0/16"), ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16"),
		APIServerPort: freePort(), EtcdClientPort: freePort(), EtcdPeerPort: freePort(),
	})
	defer cluster.Stop(l)
	if err != nil {
		return fail("start the Kubernetes control plane: %v", err)
	}
	fmt.Fprintf(os.Stderr, "kubernetes control plane up in %s\n", time.Since(start).Round(time.Millisecond))
	rc, err := cluster.RESTConfig(l.AdminKubeconfig)
	if err != nil {
		return fail("%v", err)
	}
	env.kc = kubernetes.NewForConfigOrDie(rc)
	env.dc = dynamic.NewForConfigOrDie(rc)
	if _, err := env.kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		return fail("%v", err)
	}
	for name, labels := range nodeLabels {
		if _, err := env.kc.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
			return fail("%v", err)
		}
	}

	grpcPort, debugPort := freePort(), freePort()
	env.grpcAddr = fmt.Sprintf("127.0.0.1:%d", grpcPort)
	env.istiodLog = filepath.Join(dir, "istiod-lite.log")
	logFile, err := os.Create(env.istiodLog)
	if err != nil {
		return fail("%v", err)
	}
	defer logFile.Close()
	cmd := exec.Command(istiod, "-kubeconfig", l.AdminKubeconfig, "-namespace", "istio-system",
		"-grpc-addr", env.grpcAddr, "-debug-addr", fmt.Sprintf("127.0.0.1:%d", debugPort), "-ready-addr", "",
		"-log-level", "debug")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return fail("start istiod-lite: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	if err := waitReady(ctx, fmt.Sprintf("http://127.0.0.1:%d/ready", debugPort), exited); err != nil {
		return fail("istiod-lite: %v\n%s", err, cluster.Tail(env.istiodLog, 40))
	}
	if env.root, err = publishedRoot(ctx); err != nil {
		return fail("%v", err)
	}
	code := m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "istiod-lite log (last lines):\n%s\n", cluster.Tail(env.istiodLog, 60))
	}
	return code
}

func waitReady(ctx context.Context, url string, exited <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case err := <-exited:
			return fmt.Errorf("exited before ready: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// publishedRoot reads the root istiod-lite publishes for every namespace.
func publishedRoot(ctx context.Context) (*x509.Certificate, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		cm, err := env.kc.CoreV1().ConfigMaps("istio-system").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err == nil {
			b, _ := pem.Decode([]byte(cm.Data["root-cert.pem"]))
			if b == nil {
				return nil, errors.New("ConfigMap istio-ca-root-cert holds no PEM")
			}
			return x509.ParseCertificate(b.Bytes)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("ConfigMap istio-system/istio-ca-root-cert: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// repoRoot is the main module's directory above this one.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if f, err := os.Open(filepath.Join(d, "go.mod")); err == nil {
			s := bufio.NewScanner(f)
			found := s.Scan() && strings.TrimSpace(s.Text()) == "module github.com/meshlite/meshlite"
			f.Close()
			if found {
				return d, nil
			}
		}
		if d == filepath.Dir(d) {
			return "", fmt.Errorf("no github.com/meshlite/meshlite checkout above %s", wd)
		}
	}
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func ptrTo[T any](v T) *T { return &v }

// token is a real service-account token of ns/sa for audience istio-ca.
func token(t *testing.T, ns, sa string) string {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	if _, err := env.kc.CoreV1().ServiceAccounts(ns).Get(ctx, sa, metav1.GetOptions{}); err != nil {
		if _, err := env.kc.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	tr, err := env.kc.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{"istio-ca"}, ExpirationSeconds: ptrTo[int64](3600),
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}
