package istiodtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/kube"
)

const (
	systemNS = "istio-system"
	// istiodID is the identity istiod-lite serves 15012 with.
	istiodID = "spiffe://cluster.local/ns/istio-system/sa/istiod"
	// istiodHost is the name clients verify the serving certificate for.
	istiodHost = "istiod.istio-system.svc"
)

// istiod is the running istiod-lite pod as a client sees it.
type istiod struct {
	pod  *corev1.Pod
	addr string // pod IP:15012
	root *x509.Certificate
}

// tlsConfig trusts the published root, checks the DNS name and requires
// the serving certificate to carry istiod's SPIFFE ID.
func (d *istiod) tlsConfig() *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(d.root)
	return &tls.Config{
		RootCAs: pool, ServerName: istiodHost, MinVersion: tls.VersionTLS13,
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf := cs.PeerCertificates[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != istiodID {
				return fmt.Errorf("istiod presents %v, want SPIFFE ID %s", leaf.URIs, istiodID)
			}
			return nil
		},
	}
}

// deployIstiod installs istiod-lite from the Helm chart (only that part of
// it, through e2e/meshinstall, as `meshctl install` applies it: its
// namespace, service account, least-privilege RBAC, readiness probe,
// Service on 15012, non-root uid 1337), waits for the pod to be Ready and
// reads the root it published. What it installs is uninstalled when the
// test ends; a mesh someone else installed (make demo's) is used as it is
// and left alone.
func deployIstiod(t *testing.T, sb *sandbox.Sandbox) *istiod {
	t.Helper()
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"istiod-lite", "echo"} {
		if _, err := os.Stat(filepath.Join(repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing (image meshlite/%s): run make build", b, b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	mesh, err := meshinstall.Install(ctx, sb, meshinstall.Options{Components: []string{"istiod"}, Reuse: true})
	if err != nil {
		t.Fatalf("install istiod-lite from the chart: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := mesh.Uninstall(ctx); err != nil {
			t.Errorf("uninstall istiod-lite: %v", err)
		}
	})
	pods, err := sb.WaitPodsRunning(ctx, systemNS, "app=istiod", 1, 2*time.Minute)
	if err != nil {
		var log []byte
		if l, lerr := sb.Client().CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app=istiod"}); lerr == nil && len(l.Items) > 0 {
			log = podLog(ctx, sb, l.Items[0].Name)
		}
		t.Fatalf("istiod-lite not ready: %v\n%s", err, log)
	}
	t.Logf("istiod-lite ready in %s (pod %s at %s on %s)", time.Since(start).Round(time.Millisecond),
		pods[0].Name, pods[0].Status.PodIP, pods[0].Spec.NodeName)
	// The chart runs istiod-lite as uid 1337: the process must really be
	// that user (and so read its service-account token as one).
	if psc := pods[0].Spec.SecurityContext; psc != nil && psc.RunAsUser != nil {
		uid := psc.RunAsUser
		netns, err := sb.PodNetns(ctx, systemNS, pods[0].Name)
		if err != nil {
			t.Fatal(err)
		}
		got, err := processUID("istiod-lite", netns)
		if err != nil {
			t.Fatal(err)
		}
		if got != *uid {
			t.Errorf("istiod-lite runs as uid %d, its pod asks for %d", got, *uid)
		}
		t.Logf("istiod-lite runs as uid %d", got)
	}

	// The root as every namespace sees it.
	var root *x509.Certificate
	err = sb.WaitFor(ctx, 30*time.Second, "ConfigMap istio-system/"+kube.CARootConfigMap, func(ctx context.Context) (bool, error) {
		cm, err := sb.Client().CoreV1().ConfigMaps(systemNS).Get(ctx, kube.CARootConfigMap, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		certs, err := identity.ParseCertsPEM([]byte(cm.Data[kube.CARootConfigMapKey]))
		if err != nil {
			return false, fmt.Errorf("%s holds no root certificate: %w", kube.CARootConfigMap, err)
		}
		root = certs[0]
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	p := pods[0]
	return &istiod{pod: &p, addr: net.JoinHostPort(p.Status.PodIP, "15012"), root: root}
}

// processUID is the real uid of the process running executable exe in the
// network namespace at netns (a pod's container, seen from the host).
func processUID(exe, netns string) (int64, error) {
	var want syscall.Stat_t
	if err := syscall.Stat(netns, &want); err != nil {
		return 0, fmt.Errorf("stat %s: %w", netns, err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, d := range ents {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		path, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || filepath.Base(strings.TrimSuffix(path, " (deleted)")) != exe {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) != nil || st.Ino != want.Ino || st.Dev != want.Dev {
			continue
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(status), "\n") {
			if f := strings.Fields(line); len(f) > 1 && f[0] == "Uid:" {
				return strconv.ParseInt(f[1], 10, 64)
			}
		}
		return 0, fmt.Errorf("/proc/%d/status has no Uid line", pid)
	}
	return 0, fmt.Errorf("no %s process in %s", exe, netns)
}

func podLog(ctx context.Context, sb *sandbox.Sandbox, name string) []byte {
	var buf limitedBuffer
	if err := sb.Logs(ctx, systemNS, name, "discovery", false, &buf); err != nil {
		return []byte(err.Error())
	}
	return buf.b
}

// limitedBuffer keeps the last 64 KiB written to it.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.b = append(l.b, p...)
	if over := len(l.b) - 64<<10; over > 0 {
		l.b = l.b[over:]
	}
	return len(p), nil
}

// ensureServiceAccount creates ns/name unless it exists; one it created is
// deleted at the end unless pods other than the test's still use it.
func ensureServiceAccount(t *testing.T, sb *sandbox.Sandbox, ns, name string, ours func(*corev1.Pod) bool) {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	_, err := sb.Client().CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		l, err := sb.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Errorf("list pods in %s: %v", ns, err)
			return
		}
		for i := range l.Items {
			if p := &l.Items[i]; p.Spec.ServiceAccountName == name && !ours(p) {
				t.Logf("service account %s/%s left in place: pod %s uses it", ns, name, p.Name)
				return
			}
		}
		if err := sb.Client().CoreV1().ServiceAccounts(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete service account %s/%s: %v", ns, name, err)
		}
	})
}
