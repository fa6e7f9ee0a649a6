package cluster

import (
	"context"
	"fmt"
	"sort"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/meshlite/meshlite/meshctl/mtls"
)

// PeerAuthenticationGVR is security.istio.io/v1 PeerAuthentication.
var PeerAuthenticationGVR = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"}

// Namespaces lists every namespace with its labels.
func (c *Clients) Namespaces(ctx context.Context) ([]mtls.Namespace, error) {
	ctx, cancel := c.Ctx(ctx)
	defer cancel()
	l, err := c.Kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.apiErr("list namespaces", err)
	}
	out := make([]mtls.Namespace, 0, len(l.Items))
	for _, n := range l.Items {
		out = append(out, mtls.Namespace{Name: n.Name, Labels: n.Labels})
	}
	return out, nil
}

// Pods lists the running pods with an address of namespace ns ("" = all).
func (c *Clients) Pods(ctx context.Context, ns string) ([]mtls.Pod, error) {
	ctx, cancel := c.Ctx(ctx)
	defer cancel()
	l, err := c.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.apiErr("list pods", err)
	}
	var out []mtls.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			continue
		}
		out = append(out, mtls.Pod{Namespace: p.Namespace, Name: p.Name, IP: p.Status.PodIP, Node: p.Spec.NodeName,
			ServiceAccount: p.Spec.ServiceAccountName, Labels: p.Labels, Annotations: p.Annotations, HostNetwork: p.Spec.HostNetwork})
	}
	return out, nil
}

// PeerAuthentications lists every PeerAuthentication; installed is false
// when the CRD is not (then there are none).
func (c *Clients) PeerAuthentications(ctx context.Context) (pas []mtls.PeerAuthentication, installed bool, err error) {
	ctx, cancel := c.Ctx(ctx)
	defer cancel()
	l, err := c.Dynamic.Resource(PeerAuthenticationGVR).List(ctx, metav1.ListOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, c.apiErr("list PeerAuthentications", err)
	}
	for _, u := range l.Items {
		pas = append(pas, PeerAuthenticationFrom(&u))
	}
	return pas, true, nil
}

// PeerAuthenticationFrom reads the fields that decide the mTLS mode; a
// malformed field reads as unset (istiod's validation would refuse it).
func PeerAuthenticationFrom(u *unstructured.Unstructured) mtls.PeerAuthentication {
	pa := mtls.PeerAuthentication{Namespace: u.GetNamespace(), Name: u.GetName(), Created: u.GetCreationTimestamp().Time}
	pa.Selector, _, _ = unstructured.NestedStringMap(u.Object, "spec", "selector", "matchLabels")
	pa.Mode, _, _ = unstructured.NestedString(u.Object, "spec", "mtls", "mode")
	ports, _, _ := unstructured.NestedMap(u.Object, "spec", "portLevelMtls")
	for k, v := range ports {
		port, err := strconv.ParseUint(k, 10, 32)
		m, ok := v.(map[string]any)
		if err != nil || !ok {
			continue
		}
		mode, _ := m["mode"].(string)
		if pa.PortModes == nil {
			pa.PortModes = map[uint32]string{}
		}
		pa.PortModes[uint32(port)] = mode
	}
	return pa
}

// MeshPods are the running pods of the mesh's components in namespace
// (istio-system), by their app label.
func (c *Clients) MeshPods(ctx context.Context, namespace, app string) ([]corev1.Pod, error) {
	ctx, cancel := c.Ctx(ctx)
	defer cancel()
	l, err := c.Kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		return nil, c.apiErr("list "+app+" pods", err)
	}
	var out []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Spec.NodeName < out[j].Spec.NodeName })
	return out, nil
}

// apiErr wraps an API error with what was being done; transport failures
// read as "cannot reach".
func (c *Clients) apiErr(what string, err error) error {
	if _, ok := err.(apierrors.APIStatus); ok {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, c.Unreachable(err))
}
