package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
)

// Modules whose CRDs the sandbox installs. The YAML is read from the Go
// module cache, so it is exactly the pinned release's.
const (
	GatewayAPIModule = "sigs.k8s.io/gateway-api@v1.4.1"
	IstioAPIModule   = "istio.io/api@v1.31.1"
)

// istioCRDs are the Istio CRDs the mesh honours.
var istioCRDs = []string{
	"authorizationpolicies.security.istio.io",
	"peerauthentications.security.istio.io",
}

// ModuleDir returns the module cache directory of mod ("path@version"),
// downloading the module if needed (go mod download verifies it against
// the checksum database).
func ModuleDir(ctx context.Context, mod string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", mod)
	// Outside any module, so the repository's go.mod plays no part.
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "GOFLAGS=")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var info struct{ Dir, Error string }
	if jerr := json.Unmarshal(out, &info); jerr == nil && info.Error != "" {
		return "", fmt.Errorf("download %s: %s", mod, info.Error)
	}
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %w: %s", mod, err, strings.TrimSpace(stderr.String()))
	}
	if info.Dir == "" {
		return "", fmt.Errorf("go mod download %s: no Dir in %s", mod, out)
	}
	return info.Dir, nil
}

// GatewayAPIChannel is the Gateway API release channel installed: the
// experimental one, a superset of standard, because HTTPRoute's retry field
// (which waypoints honour) is only there in v1.4; with the standard CRDs the
// apiserver would silently drop it.
const GatewayAPIChannel = "experimental"

// CRDs returns the CustomResourceDefinitions the sandbox installs: the
// Gateway API (GatewayAPIChannel), Istio's AuthorizationPolicy and
// PeerAuthentication, and meshlite's TrafficPolicy.
func CRDs(ctx context.Context) ([]*unstructured.Unstructured, error) {
	gw, err := ModuleDir(ctx, GatewayAPIModule)
	if err != nil {
		return nil, err
	}
	std := filepath.Join(gw, "config", "crd", GatewayAPIChannel)
	files, err := filepath.Glob(filepath.Join(std, "gateway.networking.k8s.io_*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("no Gateway API CRDs in %s (err %v)", std, err)
	}
	sort.Strings(files)
	var out []*unstructured.Unstructured
	for _, f := range files {
		objs, err := decodeFile(f)
		if err != nil {
			return nil, err
		}
		out = append(out, objs...)
	}

	istio, err := ModuleDir(ctx, IstioAPIModule)
	if err != nil {
		return nil, err
	}
	all, err := decodeFile(filepath.Join(istio, "kubernetes", "customresourcedefinitions.gen.yaml"))
	if err != nil {
		return nil, err
	}
	for _, want := range istioCRDs {
		found := false
		for _, o := range all {
			if o.GetKind() == "CustomResourceDefinition" && o.GetName() == want {
				out = append(out, o)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("CRD %s not in %s", want, IstioAPIModule)
		}
	}
	tp, err := manifest.Decode(policyv1alpha1.CRD)
	if err != nil {
		return nil, fmt.Errorf("decode the TrafficPolicy CRD: %w", err)
	}
	return append(out, tp...), nil
}

func decodeFile(path string) ([]*unstructured.Unstructured, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CRDs: %w", err)
	}
	objs, err := manifest.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	return objs, nil
}

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// API groups of the CRDs the sandbox installs, for Config.SkipCRDGroups
// and InstallCRDGroups.
const (
	GatewayAPIGroup    = "gateway.networking.k8s.io"
	IstioSecurityGroup = "security.istio.io"
	TrafficPolicyGroup = policyv1alpha1.Group
)

// InstallCRDs applies the sandbox's CRDs and waits until each is
// Established (served).
func InstallCRDs(ctx context.Context, rc *rest.Config, log *slog.Logger) error {
	return installCRDs(ctx, rc, log, func(string) bool { return true })
}

// InstallCRDGroups is InstallCRDs for the CRDs of the given API groups only
// (to add, later, what Config.SkipCRDGroups left out).
func InstallCRDGroups(ctx context.Context, rc *rest.Config, log *slog.Logger, groups ...string) error {
	return installCRDs(ctx, rc, log, func(g string) bool { return slices.Contains(groups, g) })
}

func installCRDs(ctx context.Context, rc *rest.Config, log *slog.Logger, want func(group string) bool) error {
	all, err := CRDs(ctx)
	if err != nil {
		return err
	}
	var crds []*unstructured.Unstructured
	for _, c := range all {
		if g, _, _ := unstructured.NestedString(c.Object, "spec", "group"); want(g) {
			crds = append(crds, c)
		}
	}
	if len(crds) == 0 {
		return nil
	}
	ap, err := manifest.NewApplier(rc, "meshlite-sandbox")
	if err != nil {
		return err
	}
	if _, err := ap.Apply(ctx, crds...); err != nil {
		return fmt.Errorf("install CRDs: %w", err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, c := range crds {
		for {
			got, err := dyn.Resource(crdResource).Get(ctx, c.GetName(), metav1.GetOptions{})
			if err == nil && established(got) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("CRD %s not established after 30s (last error %v)", c.GetName(), err)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	log.Debug("CRDs installed", "count", len(crds))
	return nil
}

func established(crd *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if ok && m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}
