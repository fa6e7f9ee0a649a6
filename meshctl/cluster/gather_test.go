package cluster

import (
	"testing"

	"sigs.k8s.io/yaml"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func TestPeerAuthenticationFrom(t *testing.T) {
	var u unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(`
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: wl, namespace: demo, creationTimestamp: "2026-11-22T02:00:00Z"}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "8080": {mode: PERMISSIVE}
    "bad": {mode: STRICT}
    "9090": "not a map"
`), &u.Object); err != nil {
		t.Fatal(err)
	}
	pa := PeerAuthenticationFrom(&u)
	if pa.Namespace != "demo" || pa.Name != "wl" || pa.Mode != "STRICT" || pa.Selector["app"] != "echo" || pa.Created.IsZero() {
		t.Errorf("%+v", pa)
	}
	if len(pa.PortModes) != 1 || pa.PortModes[8080] != "PERMISSIVE" {
		t.Errorf("port modes %v (malformed entries must be skipped)", pa.PortModes)
	}
	var empty unstructured.Unstructured
	empty.SetName("x")
	if pa := PeerAuthenticationFrom(&empty); pa.Mode != "" || pa.Selector != nil {
		t.Errorf("empty spec: %+v", pa)
	}
}
