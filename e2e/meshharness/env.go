package meshharness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

// Env is the sandbox with the mesh installed, as a test sees it. A suite
// that installs the mesh its own way (e2e/deploytest) may make one with
// just Sandbox and Ctx for the probes that need no more (Admin,
// Connections, PodLogs, DialEcho, HTTPGet).
type Env struct {
	Sandbox *sandbox.Sandbox
	// Ctx bounds the whole test (Start's timeout); helpers that take no
	// context use it.
	Ctx context.Context
	// Mesh is the installed mesh (Start's, or one it reused).
	Mesh *meshinstall.Mesh
	// Ztunnel is the live ztunnel pod of each node, by node name; see
	// RefreshZtunnels.
	Ztunnel map[string]string
}

// Start brings up the sandbox (it needs two nodes), bounds the test by
// timeout, and installs the mesh from the Helm chart (as `meshctl install`
// applies it), or takes the one running (make demo's, say) as it is. The
// CNI agent it installs captures only captureNS, so the other tests
// sharing the sandbox keep their ambient-labelled namespaces to
// themselves. What it installs is uninstalled when the test ends, and the
// nodes are checked unchained. The test's package must call
// sandbox.TestMain from its TestMain.
func Start(t testing.TB, timeout time.Duration, captureNS ...string) *Env {
	t.Helper()
	return StartWith(t, Options{Timeout: timeout, CaptureNamespaces: captureNS})
}

// Options are what StartWith does beyond Start's defaults.
type Options struct {
	// Timeout bounds the whole test (Env.Ctx).
	Timeout time.Duration
	// CaptureNamespaces are the namespaces the CNI agent captures (all
	// others are left alone).
	CaptureNamespaces []string
	// Binaries are programs of bin/ the suite needs beside the mesh's
	// (see NeedBinaries): "waypoint" for a suite that deploys waypoints.
	Binaries []string
	// CRDs applies this tree's CRDs (Gateway API, TrafficPolicy) before
	// the install: a sandbox brought up by an older tree lacks new ones,
	// and istiod-lite watches them from its start. Applying is
	// idempotent, what a fresh `sandbox up` does.
	CRDs bool
}

// StartWith is Start with options.
func StartWith(t testing.TB, o Options) *Env {
	t.Helper()
	sb := sandbox.Start(t)
	if sb.Plan.Nodes < 2 {
		t.Fatalf("the sandbox has %d nodes; %s needs 2", sb.Plan.Nodes, t.Name())
	}
	if err := NeedBinaries(o.Binaries...); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.Timeout)
	t.Cleanup(cancel)
	e := &Env{Sandbox: sb, Ctx: ctx}
	start := time.Now()
	if o.CRDs {
		if err := cluster.InstallCRDs(ctx, sb.RESTConfig(), slog.New(slog.DiscardHandler)); err != nil {
			t.Fatalf("apply the CRDs: %v", err)
		}
	}
	mesh, err := meshinstall.Install(ctx, sb, meshinstall.Options{CaptureNamespaces: o.CaptureNamespaces, Reuse: true})
	if err != nil {
		t.Fatalf("install the mesh from the chart: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := mesh.Uninstall(ctx); err != nil {
			t.Errorf("uninstall the mesh: %v", err)
		}
	})
	e.Mesh = mesh
	e.RefreshZtunnels(t)
	t.Logf("mesh installed in %v (istiod-lite at %s)", time.Since(start).Round(time.Millisecond), mesh.IstiodIP)
	return e
}

// meshBinaries are the programs of bin/ the mesh installed from the chart
// runs (the sandbox's images) and the echo sample app.
var meshBinaries = []string{"istiod-lite", "cni-agent", "mesh-cni", "ztunnel", "echo"}

// NeedBinaries returns an error naming the first program missing from the
// checkout's bin/ among the mesh's (istiod-lite, cni-agent, mesh-cni,
// ztunnel, echo) and extra: the sandbox runs its images from there, and
// without `make build` a test would wait for pods that never start.
func NeedBinaries(extra ...string) error {
	repo, err := sandbox.RepoRoot()
	if err != nil {
		return err
	}
	for _, b := range slices.Concat(meshBinaries, extra) {
		if _, err := os.Stat(filepath.Join(repo, "bin", b)); err != nil {
			return fmt.Errorf("bin/%s missing: run make build", b)
		}
	}
	return nil
}

// Pod returns pod ns/name as it is now.
func (e *Env) Pod(t testing.TB, ns, name string) *corev1.Pod {
	t.Helper()
	p, err := e.Sandbox.Client().CoreV1().Pods(ns).Get(e.Ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod %s/%s: %v", ns, name, err)
	}
	return p
}

// Ready reports whether p's Ready condition is true.
func Ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Spiffe is the SPIFFE ID of service account sa in namespace ns.
func Spiffe(ns, sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }

// RandomMarker is prefix and 16 random hex digits: a string to look for
// on the wire that nothing else sends.
func RandomMarker(prefix string) string {
	b := make([]byte, 8)
	rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// Eventually polls cond until it holds, and fails the test if timeout
// passes first.
func (e *Env) Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if err := e.Sandbox.WaitFor(e.Ctx, timeout, what, func(context.Context) (bool, error) { return cond(), nil }); err != nil {
		t.Fatal(err)
	}
}

// PodLogs is the log of every pod matching selector in ns, for failure
// messages. It has its own deadline: the test's may be spent by then.
func (e *Env) PodLogs(ns, selector string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := e.Sandbox.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range l.Items {
		fmt.Fprintf(&b, "--- log of %s/%s (%s, %s):\n", ns, p.Name, p.Spec.NodeName, p.Status.Phase)
		if len(p.Spec.Containers) > 0 {
			if err := e.Sandbox.Logs(ctx, ns, p.Name, p.Spec.Containers[0].Name, false, &b); err != nil {
				fmt.Fprintf(&b, "(%v)\n", err)
			}
		}
	}
	return b.String()
}
