package install

import (
	"fmt"

	"helm.sh/helm/v3/pkg/chartutil"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
)

// ValuesFromFiles reads values files (`-f a.yaml -f b.yaml`): later files
// override earlier ones key by key, maps merged deeply, as Helm does.
func ValuesFromFiles(paths ...string) (map[string]any, error) {
	out := map[string]any{}
	for _, p := range paths {
		v, err := chartutil.ReadValuesFile(p)
		if err != nil {
			return nil, fmt.Errorf("read values file %s: %w", p, err)
		}
		out = mergeMaps(out, v.AsMap())
	}
	return out, nil
}

// mergeMaps returns a with b's keys laid over it; maps present in both are
// merged, anything else from b replaces a's.
func mergeMaps(a, b map[string]any) map[string]any {
	out := make(map[string]any, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if bm, ok := v.(map[string]any); ok {
			if am, ok := out[k].(map[string]any); ok {
				out[k] = mergeMaps(am, bm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// ServerKubeVersion asks the cluster for its version ("v1.34.4"), for
// Options.KubeVersion.
func ServerKubeVersion(cfg *rest.Config) (string, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return "", fmt.Errorf("discovery client: %w", err)
	}
	v, err := dc.ServerVersion()
	if err != nil {
		return "", fmt.Errorf("get the server version: %w", err)
	}
	return v.GitVersion, nil
}
