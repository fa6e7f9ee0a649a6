package meshctltest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

const systemNS = meshinstall.Namespace

// installMesh installs the mesh from the Helm chart (deploy/helm/meshlite
// through e2e/meshinstall, as `meshctl install` applies it), its CNI agent
// capturing only captureNS so other packages' ambient namespaces stay
// theirs, or uses the mesh running (make demo's) as it is. What it
// installs is uninstalled when the test ends, and the nodes are checked
// unchained.
func installMesh(t *testing.T, ctx context.Context, sb *sandbox.Sandbox, repo string, captureNS []string) {
	t.Helper()
	for _, b := range []string{"istiod-lite", "cni-agent", "mesh-cni", "ztunnel", "echo"} {
		if _, err := os.Stat(filepath.Join(repo, "bin", b)); err != nil {
			t.Fatalf("bin/%s missing: run make build", b)
		}
	}
	mesh, err := meshinstall.Install(ctx, sb, meshinstall.Options{CaptureNamespaces: captureNS, Reuse: true})
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
}

// echoPod is a bin/echo server pinned to a node.
func echoPod(ns, name, node, sa string, labels string) string {
	return fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata:
  name: %[2]s
  namespace: %[1]s
  labels: {app: echo%[5]s}
spec:
  nodeName: %[3]s
  serviceAccountName: %[4]s
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: meshlite/echo:dev
    args: [server, --http-ports, "8080", --tcp-ports, "9090", --grpc-ports, ""]
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
      periodSeconds: 1
`, ns, name, node, sa, labels)
}
