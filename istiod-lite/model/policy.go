package model

import (
	"encoding/json"
	"fmt"

	securityv1beta1 "istio.io/api/security/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Istio's security API group as served by the CRDs.
var (
	AuthorizationPolicyGVR = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	PeerAuthenticationGVR  = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"}
)

// AuthorizationPolicy is a security.istio.io AuthorizationPolicy: its
// metadata and its spec in Istio's own API type.
type AuthorizationPolicy struct {
	metav1.ObjectMeta
	Spec *securityv1beta1.AuthorizationPolicy
}

// PeerAuthentication is a security.istio.io PeerAuthentication.
type PeerAuthentication struct {
	metav1.ObjectMeta
	Spec *securityv1beta1.PeerAuthentication
}

// DecodeAuthorizationPolicy reads an AuthorizationPolicy from its
// unstructured form (as a dynamic informer delivers it).
func DecodeAuthorizationPolicy(u *unstructured.Unstructured) (*AuthorizationPolicy, error) {
	spec := &securityv1beta1.AuthorizationPolicy{}
	meta, err := decode(u, spec)
	if err != nil {
		return nil, fmt.Errorf("decode AuthorizationPolicy %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	return &AuthorizationPolicy{ObjectMeta: meta, Spec: spec}, nil
}

// DecodePeerAuthentication reads a PeerAuthentication from its unstructured form.
func DecodePeerAuthentication(u *unstructured.Unstructured) (*PeerAuthentication, error) {
	spec := &securityv1beta1.PeerAuthentication{}
	meta, err := decode(u, spec)
	if err != nil {
		return nil, fmt.Errorf("decode PeerAuthentication %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	return &PeerAuthentication{ObjectMeta: meta, Spec: spec}, nil
}

// decode fills spec from u's "spec" (through the API type's own JSON form,
// which is protobuf JSON) and returns u's metadata.
func decode(u *unstructured.Unstructured, spec json.Unmarshaler) (metav1.ObjectMeta, error) {
	var meta metav1.ObjectMeta
	if u == nil {
		return meta, fmt.Errorf("nil object")
	}
	if m, ok := u.Object["metadata"]; ok {
		b, err := json.Marshal(m)
		if err != nil {
			return meta, fmt.Errorf("metadata: %w", err)
		}
		if err := json.Unmarshal(b, &meta); err != nil {
			return meta, fmt.Errorf("metadata: %w", err)
		}
	}
	raw, ok := u.Object["spec"]
	if !ok || raw == nil {
		return meta, nil // an empty spec is valid (e.g. an ALLOW-nothing policy)
	}
	if _, isMap := raw.(map[string]any); !isMap {
		return meta, fmt.Errorf("spec is a %T, not an object", raw)
	}
	b, err := json.Marshal(raw)
	if err != nil {
		return meta, fmt.Errorf("spec: %w", err)
	}
	if err := spec.UnmarshalJSON(b); err != nil {
		return meta, fmt.Errorf("spec: %w", err)
	}
	return meta, nil
}
