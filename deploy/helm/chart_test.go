package helm

import (
	"bytes"
	"flag"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
)

var update = flag.Bool("update", false, "rewrite crds/ from the pinned istio.io/api module")

func TestChart_EmbedsEveryChartFile(t *testing.T) {
	var want []string
	err := filepath.WalkDir(ChartName, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(ChartName, p)
		want = append(want, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range want {
		disk, err := os.ReadFile(filepath.Join(ChartName, f))
		if err != nil {
			t.Fatal(err)
		}
		emb, err := fs.ReadFile(Chart(), f)
		if err != nil {
			t.Errorf("%s is not embedded: %v", f, err)
			continue
		}
		if !bytes.Equal(disk, emb) {
			t.Errorf("%s: embedded copy differs from the file", f)
		}
	}
	for _, f := range []string{"Chart.yaml", "values.yaml", "values.schema.json", "templates/_helpers.tpl", "templates/NOTES.txt"} {
		if _, err := fs.Stat(Chart(), f); err != nil {
			t.Errorf("chart misses %s: %v", f, err)
		}
	}
}

// istioAPIModule is where the chart's security.istio.io CRDs come from; it
// is the version go.mod pins, so the CRDs match the Go types istiod-lite
// decodes.
const istioAPIModule = "istio.io/api"

// chartCRDs are the Istio CRDs the mesh honours, one file each in crds/
// (beside meshlite's own TrafficPolicy).
var chartCRDs = []string{
	"authorizationpolicies.security.istio.io",
	"peerauthentications.security.istio.io",
}

// TestCRDs_MatchPinnedIstioAPI keeps crds/ equal to the CRDs of the
// istio.io/api version go.mod pins; -update rewrites them.
func TestCRDs_MatchPinnedIstioAPI(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}} {{.Dir}}", istioAPIModule).Output()
	if err != nil {
		t.Fatalf("go list -m %s: %v", istioAPIModule, err)
	}
	version, dir, ok := strings.Cut(strings.TrimSpace(string(out)), " ")
	if !ok || dir == "" {
		t.Fatalf("module %s not in the module cache (%q): run go mod download", istioAPIModule, out)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "kubernetes", "customresourcedefinitions.gen.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	found := map[string][]byte{}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(raw), 4096)
	for {
		var u unstructured.Unstructured
		if err := dec.Decode(&u.Object); err != nil {
			break
		}
		for _, name := range chartCRDs {
			if u.GetKind() == "CustomResourceDefinition" && u.GetName() == name {
				b, err := yaml.Marshal(u.Object)
				if err != nil {
					t.Fatal(err)
				}
				header := "# Generated from " + istioAPIModule + "@" + version + " (kubernetes/customresourcedefinitions.gen.yaml)\n" +
					"# by `go test ./deploy/helm -run TestCRDs -update`; do not edit.\n"
				found[name] = append([]byte(header), b...)
			}
		}
	}
	found[policyv1alpha1.Resource.GroupResource().String()] = append([]byte(
		"# Copied from istiod-lite/api/policy/v1alpha1/trafficpolicy-crd.yaml\n"+
			"# by `go test ./deploy/helm -run TestCRDs -update`; do not edit.\n"), policyv1alpha1.CRD...)
	for _, name := range append(chartCRDs, policyv1alpha1.Resource.GroupResource().String()) {
		want, ok := found[name]
		if !ok {
			t.Fatalf("CRD %s not in %s@%s", name, istioAPIModule, version)
		}
		path := filepath.Join(ChartName, "crds", name+".yaml")
		if *update {
			if err := os.WriteFile(path, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run go test ./deploy/helm -run TestCRDs -update)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from %s@%s: run go test ./deploy/helm -run TestCRDs -update", path, istioAPIModule, version)
		}
	}
	entries, err := os.ReadDir(filepath.Join(ChartName, "crds"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(chartCRDs)+1 {
		t.Errorf("crds/ has %d files, want %d (%v and TrafficPolicy)", len(entries), len(chartCRDs)+1, chartCRDs)
	}
}
