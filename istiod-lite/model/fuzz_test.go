package model

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// FuzzDecodePolicies feeds arbitrary JSON objects through policy decoding and
// conversion: bad input must give an error, never a panic.
func FuzzDecodePolicies(f *testing.F) {
	f.Add([]byte(`{"kind":"AuthorizationPolicy","apiVersion":"security.istio.io/v1","metadata":{"name":"a","namespace":"b"},"spec":{"action":"DENY","rules":[{"from":[{"source":{"ipBlocks":["10.0.0.0/8"]}}],"to":[{"operation":{"ports":["80"]}}],"when":[{"key":"source.ip","values":["1.2.3.4"]}]}]}}`))
	f.Add([]byte(`{"kind":"PeerAuthentication","apiVersion":"security.istio.io/v1","metadata":{"name":"a","namespace":"b"},"spec":{"selector":{"matchLabels":{"app":"x"}},"mtls":{"mode":"STRICT"},"portLevelMtls":{"8080":{"mode":"PERMISSIVE"}}}}`))
	f.Add([]byte(`{"kind":"X","apiVersion":"v1","spec":"nope"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(data); err != nil {
			return
		}
		b := NewBuilder(Config{}, NewStore())
		if ap, err := DecodeAuthorizationPolicy(u); err == nil {
			b.store.SetAuthorizationPolicy(ap)
			b.Authorization(ap)
		}
		if pa, err := DecodePeerAuthentication(u); err == nil {
			b.store.SetPeerAuthentication(pa)
			b.PeerAuthorization(pa)
			b.peerAuthenticationKeys(pa.Namespace, map[string]string{"app": "x"})
		}
	})
}
