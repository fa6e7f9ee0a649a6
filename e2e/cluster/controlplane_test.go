package cluster

import (
	"bufio"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/e2e/cluster/daemon"
	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	"github.com/meshlite/meshlite/e2e/cluster/pki"
)

func kubeBinDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "..", ".cache", "kube", KubeVersion))
	if err != nil {
		t.Fatal(err)
	}
	if missing := MissingBinaries(dir); len(missing) > 0 {
		t.Fatalf("kube binaries %v missing in %s: run hack/kube-bins.sh", missing, dir)
	}
	return dir
}

func TestKubeVersion_MatchesToolsModule(t *testing.T) {
	f, err := os.Open(filepath.Join("..", "..", "tools", "kube", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 2 && fields[0] == "k8s.io/kubernetes" {
			if fields[1] != KubeVersion {
				t.Fatalf("tools/kube pins k8s.io/kubernetes %s, cluster.KubeVersion is %s", fields[1], KubeVersion)
			}
			return
		}
	}
	t.Fatal("tools/kube/go.mod does not require k8s.io/kubernetes")
}

// TestControlPlane_ServesCRDsAndControllers starts a real control plane on
// loopback (ports apart from a running sandbox's) and checks what the mesh
// relies on: readiness, the CRDs, the controller manager's default service
// account and RBAC denying an unprivileged identity; then stops it.
func TestControlPlane_ServesCRDsAndControllers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (the sandbox suite runs as root)")
	}
	cfg := Config{
		Dir:            t.TempDir(),
		BinDir:         kubeBinDir(t),
		HostIP:         netip.MustParseAddr("127.0.0.1"),
		ServiceCIDR:    netip.MustParsePrefix("10.96.0.0/16"),
		ClusterCIDR:    netip.MustParsePrefix("10.244.0.0/16"),
		Nodes:          []pki.Node{{Name: "node-a", IP: net.ParseIP("172.30.0.10")}},
		Log:            slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
		APIServerPort:  26443,
		EtcdClientPort: 23791,
		EtcdPeerPort:   23801,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	l, err := Start(ctx, cfg)
	t.Cleanup(func() {
		if err := Stop(l); err != nil {
			t.Errorf("stop: %v", err)
		}
		for _, c := range Components {
			if daemon.AliveFromFile(l.PidFile(c)) {
				t.Errorf("%s still runs after Stop", c)
			}
		}
	})
	if err != nil {
		t.Fatalf("start control plane: %v", err)
	}
	t.Logf("control plane ready with CRDs in %v", time.Since(start))
	if err := Healthy(ctx, l); err != nil {
		t.Fatalf("Healthy: %v", err)
	}

	rc, err := RESTConfig(l.AdminKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(rc)
	for _, gv := range []string{"gateway.networking.k8s.io/v1", "security.istio.io/v1"} {
		res, err := cs.Discovery().ServerResourcesForGroupVersion(gv)
		if err != nil {
			t.Errorf("group %s not served: %v", gv, err)
			continue
		}
		t.Logf("%s serves %d resources", gv, len(res.APIResources))
	}

	// The controller manager makes the default service account.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no default service account after 30s: %v\n%s", err, Tail(l.LogFile(ControllerManager), 20))
		}
		time.Sleep(100 * time.Millisecond)
	}

	// An AuthorizationPolicy applies (the CRD's schema accepts it).
	ap, err := manifest.NewApplier(rc, "test")
	if err != nil {
		t.Fatal(err)
	}
	_, err = ap.ApplyYAML(ctx, []byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: default}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec: {mtls: {mode: STRICT}}
`))
	if err != nil {
		t.Fatalf("apply Istio policies: %v", err)
	}

	// kubectl works with the admin kubeconfig (it parses the version the
	// build stamped).
	out, err := exec.CommandContext(ctx, "kubectl", "--kubeconfig", l.AdminKubeconfig, "version", "-o", "json").CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"gitVersion": "`+KubeVersion+`"`) {
		t.Errorf("kubectl version: %v\n%s", err, out)
	}

	// A node's identity is confined by the Node authorizer: it may read
	// its own Node but not list secrets.
	nodeKC := filepath.Join(cfg.Dir, "node-a.kubeconfig")
	if err := l.NodeKubeconfig(nodeKC, cfg.Server(), "node-a"); err != nil {
		t.Fatal(err)
	}
	nrc, err := RESTConfig(nodeKC)
	if err != nil {
		t.Fatal(err)
	}
	ncs := kubernetes.NewForConfigOrDie(nrc)
	_, err = ncs.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("node identity listing secrets: want Forbidden, got %v", err)
	}
	_, err = ncs.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("node identity reading its own Node: want NotFound (allowed, absent), got %v", err)
	}
}
