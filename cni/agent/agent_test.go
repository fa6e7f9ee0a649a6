package agent

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/internal/kube"
)

func TestWantEnrolled(t *testing.T) {
	a := &Agent{cfg: Config{ExcludeNamespaces: []string{"kube-system"}}}
	amb := map[string]string{kube.LabelDataplaneMode: kube.DataplaneModeAmbient}
	none := map[string]string{kube.LabelDataplaneMode: kube.DataplaneModeNone}
	pod := func(ns string, labels map[string]string, hostNet bool) *v1.Pod {
		return &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Labels: labels}, Spec: v1.PodSpec{HostNetwork: hostNet}}
	}
	nsObj := func(labels map[string]string) *v1.Namespace {
		return &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Labels: labels}}
	}
	for _, tc := range []struct {
		name string
		pod  *v1.Pod
		ns   *v1.Namespace
		want bool
	}{
		{"ambient namespace", pod("shop", nil, false), nsObj(amb), true},
		{"plain namespace", pod("shop", nil, false), nsObj(nil), false},
		{"pod opts in", pod("shop", amb, false), nsObj(nil), true},
		{"pod opts out", pod("shop", none, false), nsObj(amb), false},
		{"host network never", pod("shop", amb, true), nsObj(amb), false},
		{"excluded namespace never", pod("kube-system", amb, false), nsObj(amb), false},
		{"unknown namespace, pod label", pod("shop", amb, false), nil, true},
	} {
		if got := a.wantEnrolled(tc.pod, tc.ns); got != tc.want {
			t.Errorf("%s: wantEnrolled = %v", tc.name, got)
		}
	}
	a.cfg.CaptureNamespaces = []string{"payments"}
	if a.wantEnrolled(pod("shop", nil, false), nsObj(amb)) || !a.wantEnrolled(pod("payments", nil, false), nsObj(amb)) {
		t.Error("capture namespaces not honoured")
	}
}

func TestWorkloadInfoAndIPs(t *testing.T) {
	p := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "b"}}
	if wi := workloadInfo(p); wi.GetServiceAccount() != "default" || wi.GetName() != "a" || wi.GetNamespace() != "b" {
		t.Errorf("workload info %v", wi)
	}
	p.Spec.ServiceAccountName = "cart"
	if workloadInfo(p).GetServiceAccount() != "cart" {
		t.Error("service account not used")
	}
	p.Status.PodIP = "10.0.0.1"
	if ips := statusIPs(p); len(ips) != 1 || ips[0] != netip.MustParseAddr("10.0.0.1") {
		t.Errorf("ips %v", ips)
	}
	p.Status.PodIPs = []v1.PodIP{{IP: "10.0.0.2"}, {IP: "fd00::2"}, {IP: "junk"}}
	if ips := statusIPs(p); len(ips) != 2 || ips[0] != netip.MustParseAddr("10.0.0.2") {
		t.Errorf("ips %v", ips)
	}
	mirror := &v1.Pod{ObjectMeta: metav1.ObjectMeta{UID: "api-uid", Annotations: map[string]string{"kubernetes.io/config.mirror": "hash"}}}
	if !sameUID(mirror, "hash") || !sameUID(mirror, "api-uid") || sameUID(mirror, "other") || !sameUID(mirror, "") {
		t.Error("sameUID does not recognise a static pod's mirror")
	}
	if ns, name, ok := cutKey("shop/cart-1"); !ok || ns != "shop" || name != "cart-1" {
		t.Errorf("cutKey: %q %q %v", ns, name, ok)
	}
}

func TestKeyLocks_SerialisePerKeyOnly(t *testing.T) {
	var k keyLocks
	var inA atomic.Int32
	var maxA atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock := k.lock("a")
			n := inA.Add(1)
			if n > maxA.Load() {
				maxA.Store(n)
			}
			time.Sleep(2 * time.Millisecond)
			inA.Add(-1)
			unlock()
		}()
	}
	// Another key is not blocked by "a".
	done := make(chan struct{})
	unlockA := k.lock("a")
	go func() {
		unlock := k.lock("b")
		unlock()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("key b waited for key a")
	}
	unlockA()
	wg.Wait()
	if maxA.Load() != 1 {
		t.Errorf("%d holders of one key at once", maxA.Load())
	}
	if len(k.locks) != 0 {
		t.Errorf("%d lock entries left", len(k.locks))
	}
}
