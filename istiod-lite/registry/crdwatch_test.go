package registry

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func crd(name string, versions map[string]bool, established string) *unstructured.Unstructured {
	var vs []any
	for v, served := range versions {
		vs = append(vs, map[string]any{"name": v, "served": served, "schema": map[string]any{"openAPIV3Schema": map[string]any{"type": "object"}}})
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
		"metadata": map[string]any{"name": name, "resourceVersion": "7"},
		"spec":     map[string]any{"group": "gateway.networking.k8s.io", "versions": vs},
		"status": map[string]any{"conditions": []any{
			map[string]any{"type": "NamesAccepted", "status": "True", "message": "no conflicts"},
			map[string]any{"type": "Established", "status": established, "reason": "InitialNamesAccepted"},
		}},
	}}
}

// A CRD counts only once Established and serving the version read; the
// trimmed copy the watcher keeps answers the same as the full object.
func TestCRDServes_EstablishedAndVersionServed(t *testing.T) {
	for _, tc := range []struct {
		name        string
		versions    map[string]bool
		established string
		want        bool
	}{
		{"established, v1 served", map[string]bool{"v1": true, "v1beta1": true}, "True", true},
		{"not established yet", map[string]bool{"v1": true}, "False", false},
		{"v1 not served", map[string]bool{"v1": false, "v1beta1": true}, "True", false},
		{"no v1 at all", map[string]bool{"v1beta1": true}, "True", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			full := crd("gateways.gateway.networking.k8s.io", tc.versions, tc.established)
			if got := crdServes(full, "v1"); got != tc.want {
				t.Errorf("crdServes(full) = %v, want %v", got, tc.want)
			}
			trimmed, err := trimCRD(full)
			if err != nil {
				t.Fatal(err)
			}
			u := trimmed.(*unstructured.Unstructured)
			if got := crdServes(u, "v1"); got != tc.want {
				t.Errorf("crdServes(trimmed) = %v, want %v", got, tc.want)
			}
			if u.GetName() != full.GetName() || u.GetResourceVersion() != "7" {
				t.Errorf("trimmed metadata %v", u.Object["metadata"])
			}
			if vs, _, _ := unstructured.NestedSlice(u.Object, "spec", "versions"); len(vs) != len(tc.versions) || vs[0].(map[string]any)["schema"] != nil {
				t.Errorf("trimmed versions %v", vs)
			}
		})
	}
}

func TestAPIOfCRD_NamesTheOptionalAPIs(t *testing.T) {
	for name, want := range map[string]API{
		"gateways.gateway.networking.k8s.io":        GatewayAPI,
		"grpcroutes.gateway.networking.k8s.io":      GatewayAPI,
		"referencegrants.gateway.networking.k8s.io": ReferenceGrants,
		"trafficpolicies.policy.meshlite.io":        TrafficPolicies,
		"authorizationpolicies.security.istio.io":   AuthorizationPolicies,
		"peerauthentications.security.istio.io":     PeerAuthentications,
	} {
		if got, ok := apiOfCRD(name); !ok || got != want {
			t.Errorf("apiOfCRD(%s) = %v, %v; want %v", name, got, ok, want)
		}
	}
	for _, name := range []string{"tcproutes.gateway.networking.k8s.io", "virtualservices.networking.istio.io", ""} {
		if a, ok := apiOfCRD(name); ok {
			t.Errorf("apiOfCRD(%s) = %v, want none", name, a)
		}
	}
}
