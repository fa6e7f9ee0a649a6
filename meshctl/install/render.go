// Package install renders meshlite's Helm chart (embedded by deploy/helm)
// with Helm's Go SDK and applies the result to a cluster with server-side
// apply, as `meshctl install` does: no helm binary, no chart files on disk,
// no Helm release Secret. It owns rendering, ordering, applying and
// deleting the chart's objects; it does not parse flags or print.
package install

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
	"helm.sh/helm/v3/pkg/strvals"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	meshchart "github.com/meshlite/meshlite/deploy/helm"
)

const (
	// DefaultNamespace is where the mesh goes unless told otherwise.
	DefaultNamespace = "istio-system"
	// DefaultReleaseName names the release in labels (app.kubernetes.io/instance).
	DefaultReleaseName = "meshlite"
	// DefaultKubeVersion is the Kubernetes version templates see when the
	// caller does not know the cluster's (the version client-go is built for).
	DefaultKubeVersion = "v1.34.0"
	// FieldManager owns the fields meshctl applies.
	FieldManager = "meshctl"
)

// Options say how to render the chart.
type Options struct {
	// Namespace the mesh is installed in (default istio-system).
	Namespace string
	// ReleaseName (default meshlite).
	ReleaseName string
	// Values override the chart's values.yaml, as `helm -f` does.
	Values map[string]any
	// Set are `helm --set` overrides ("ztunnel.tunnel=quic"), applied after
	// Values, in order.
	Set []string
	// KubeVersion is the cluster's version ("v1.34.4"), checked against the
	// chart's kubeVersion and shown to templates (default DefaultKubeVersion).
	KubeVersion string
	// Chart replaces the embedded chart (tests, or a chart being developed):
	// the chart directory's files.
	Chart fs.FS
}

func (o Options) withDefaults() Options {
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.ReleaseName == "" {
		o.ReleaseName = DefaultReleaseName
	}
	if o.KubeVersion == "" {
		o.KubeVersion = DefaultKubeVersion
	}
	if o.Chart == nil {
		o.Chart = meshchart.Chart()
	}
	return o
}

// LoadChart loads a chart from the files of its directory.
func LoadChart(fsys fs.FS) (*chart.Chart, error) {
	var files []*loader.BufferedFile
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(fsys, p)
		if err != nil {
			return err
		}
		files = append(files, &loader.BufferedFile{Name: p, Data: b})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read chart files: %w", err)
	}
	c, err := loader.LoadFiles(files)
	if err != nil {
		return nil, fmt.Errorf("load chart: %w", err)
	}
	return c, nil
}

// values merges the overrides of o (Values, then each Set) into one map;
// the chart's defaults are coalesced under it later.
func (o Options) values() (map[string]any, error) {
	vals := map[string]any{}
	if len(o.Values) > 0 {
		// A deep copy through YAML, so that Set never writes into the
		// caller's maps, and numbers come out as Helm's own parsing makes them.
		y, err := yaml.Marshal(o.Values)
		if err != nil {
			return nil, fmt.Errorf("encode values: %w", err)
		}
		cp, err := chartutil.ReadValues(y)
		if err != nil {
			return nil, fmt.Errorf("values: %w", err)
		}
		vals = cp.AsMap()
	}
	for _, s := range o.Set {
		if err := strvals.ParseInto(s, vals); err != nil {
			return nil, fmt.Errorf("--set %q: %w", s, err)
		}
	}
	return vals, nil
}

// Rendered is the chart rendered for one cluster.
type Rendered struct {
	// Namespace is the release namespace, as an object (applied first,
	// never deleted by Uninstall unless asked).
	Namespace *unstructured.Unstructured
	// CRDs are the chart's crds/ (applied before the rest, and waited for).
	CRDs []*unstructured.Unstructured
	// Objects are the templates' objects in Helm's install order.
	Objects []*unstructured.Unstructured
	// Notes is the rendered NOTES.txt.
	Notes string
}

// All is every object in apply order: the namespace, the CRDs, the rest.
func (r *Rendered) All() []*unstructured.Unstructured {
	out := make([]*unstructured.Unstructured, 0, 1+len(r.CRDs)+len(r.Objects))
	out = append(out, r.Namespace)
	out = append(out, r.CRDs...)
	return append(out, r.Objects...)
}

// Render renders the chart and returns every object in apply order (the
// namespace, the CRDs, then the templates' objects in Helm's install
// order).
func Render(ctx context.Context, opts Options) ([]*unstructured.Unstructured, error) {
	r, err := RenderChart(ctx, opts)
	if err != nil {
		return nil, err
	}
	return r.All(), nil
}

// RenderChart renders the chart as Helm's client-only install would: the
// values are checked against values.schema.json, the templates rendered
// strictly (a reference to a value that does not exist fails).
func RenderChart(ctx context.Context, opts Options) (*Rendered, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	chrt, err := LoadChart(opts.Chart)
	if err != nil {
		return nil, err
	}
	caps := chartutil.DefaultCapabilities.Copy()
	kv, err := chartutil.ParseKubeVersion(opts.KubeVersion)
	if err != nil {
		return nil, fmt.Errorf("kubernetes version %q: %w", opts.KubeVersion, err)
	}
	caps.KubeVersion = *kv
	if c := chrt.Metadata.KubeVersion; c != "" && !chartutil.IsCompatibleRange(c, kv.String()) {
		return nil, fmt.Errorf("chart %s needs Kubernetes %s, the cluster runs %s", chrt.Name(), c, kv)
	}
	overrides, err := opts.values()
	if err != nil {
		return nil, err
	}
	top, err := chartutil.ToRenderValues(chrt, overrides, chartutil.ReleaseOptions{
		Name: opts.ReleaseName, Namespace: opts.Namespace, Revision: 1, IsInstall: true,
	}, caps)
	if err != nil {
		return nil, fmt.Errorf("chart values: %w", err)
	}
	if rel, ok := top["Release"].(map[string]any); ok {
		rel["Service"] = FieldManager
	}
	files, err := engine.Engine{Strict: true}.Render(chrt, top)
	if err != nil {
		return nil, fmt.Errorf("render chart: %w", err)
	}

	out := &Rendered{Namespace: namespaceObject(opts.Namespace)}
	for name, content := range files {
		if strings.HasSuffix(name, "/NOTES.txt") {
			if path.Dir(name) == chrt.Name()+"/templates" {
				out.Notes = strings.TrimSpace(content)
			}
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("sort rendered objects: %w", err)
	}
	if len(hooks) > 0 {
		// meshctl runs no hooks; a chart that grows some must say how.
		return nil, fmt.Errorf("chart has %d hooks (first %s), which meshctl install does not run", len(hooks), hooks[0].Path)
	}
	for _, m := range manifests {
		objs, err := decode([]byte(m.Content))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", m.Name, err)
		}
		for _, o := range objs {
			if o.GetNamespace() == "" && namespaced(o) {
				o.SetNamespace(opts.Namespace)
			}
		}
		out.Objects = append(out.Objects, objs...)
	}
	for _, f := range chrt.CRDObjects() {
		objs, err := decode(f.File.Data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.Filename, err)
		}
		out.CRDs = append(out.CRDs, objs...)
	}
	sort.SliceStable(out.CRDs, func(i, j int) bool { return out.CRDs[i].GetName() < out.CRDs[j].GetName() })
	return out, nil
}

func namespaceObject(ns string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion("v1")
	u.SetKind("Namespace")
	u.SetName(ns)
	u.SetLabels(map[string]string{"app.kubernetes.io/part-of": "meshlite"})
	return u
}

// clusterScoped are the cluster-scoped kinds a chart renders; everything
// else gets the release namespace when it names none (as helm's install
// does through the API server's defaulting).
var clusterScoped = map[string]bool{
	"Namespace": true, "ClusterRole": true, "ClusterRoleBinding": true,
	"CustomResourceDefinition": true, "PriorityClass": true, "StorageClass": true,
	"MutatingWebhookConfiguration": true, "ValidatingWebhookConfiguration": true,
	"ValidatingAdmissionPolicy": true, "ValidatingAdmissionPolicyBinding": true,
	"APIService": true, "IngressClass": true, "RuntimeClass": true, "GatewayClass": true,
}

func namespaced(o *unstructured.Unstructured) bool { return !clusterScoped[o.GetKind()] }

// decode splits YAML documents into objects (numbers as int64, as the
// API machinery's own decoding makes them); every one must name its
// apiVersion, kind and name.
func decode(data []byte) ([]*unstructured.Unstructured, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []*unstructured.Unstructured
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read document %d: %w", i, err)
		}
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("decode document %d: %w", i, err)
		}
		if t := bytes.TrimSpace(j); len(t) == 0 || bytes.Equal(t, []byte("null")) || bytes.Equal(t, []byte("{}")) {
			continue
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(j); err != nil {
			return nil, fmt.Errorf("decode document %d: %w", i, err)
		}
		if u.GetAPIVersion() == "" || u.GetName() == "" {
			return nil, fmt.Errorf("document %d: %s without apiVersion or metadata.name", i, u.GetKind())
		}
		out = append(out, u)
	}
}
