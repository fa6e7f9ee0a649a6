package istiodtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"github.com/meshlite/meshlite/e2e/cluster/manifest"
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

// deployIstiod applies e2e/manifests/istiod-lite.yaml, waits for the pod to
// be Ready and reads the root it published. Objects the manifest creates
// are deleted when the test ends; ones that existed before (another test
// binary's istiod-lite) are left alone, and so is the istio-system
// namespace, which other mesh components share.
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
	raw, err := os.ReadFile(filepath.Join(repo, "e2e", "manifests", "istiod-lite.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := manifest.Decode(raw)
	if err != nil {
		t.Fatalf("e2e/manifests/istiod-lite.yaml: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	k, err := newKinds(sb)
	if err != nil {
		t.Fatal(err)
	}
	created, err := k.absent(ctx, objs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var del []*unstructured.Unstructured
		for _, o := range slices.Backward(created) {
			if o.GetKind() != "Namespace" {
				del = append(del, o)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := k.delete(ctx, del); err != nil {
			t.Errorf("delete istiod-lite: %v", err)
		}
	})
	start := time.Now()
	if _, err := sb.Apply(ctx, string(raw)); err != nil {
		t.Fatalf("apply istiod-lite: %v", err)
	}
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

// kinds gets and deletes manifest objects through discovery.
type kinds struct {
	mapper *restmapper.DeferredDiscoveryRESTMapper
	dyn    dynamic.Interface
}

func newKinds(sb *sandbox.Sandbox) (*kinds, error) {
	rc := sb.RESTConfig()
	dc, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &kinds{mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)), dyn: dyn}, nil
}

func (k *kinds) resource(o *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := o.GroupVersionKind()
	m, err := k.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", gvk, err)
	}
	if o.GetNamespace() != "" {
		return k.dyn.Resource(m.Resource).Namespace(o.GetNamespace()), nil
	}
	return k.dyn.Resource(m.Resource), nil
}

// absent returns the objects of objs that do not exist yet.
func (k *kinds) absent(ctx context.Context, objs []*unstructured.Unstructured) ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	for _, o := range objs {
		ri, err := k.resource(o)
		if err != nil {
			return nil, err
		}
		_, err = ri.Get(ctx, o.GetName(), metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			out = append(out, o)
		case err != nil:
			return nil, fmt.Errorf("get %s %s: %w", o.GetKind(), o.GetName(), err)
		}
	}
	return out, nil
}

// delete deletes objs (absent ones are fine), dependents in the background.
func (k *kinds) delete(ctx context.Context, objs []*unstructured.Unstructured) error {
	var errs []error
	bg := metav1.DeletePropagationBackground
	for _, o := range objs {
		ri, err := k.resource(o)
		if err == nil {
			err = ri.Delete(ctx, o.GetName(), metav1.DeleteOptions{PropagationPolicy: &bg})
		}
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete %s %s: %w", o.GetKind(), o.GetName(), err))
		}
	}
	return errors.Join(errs...)
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
