// Package manifest decodes multi-document Kubernetes YAML (or JSON) and
// applies it to a cluster with server-side apply, as `kubectl apply
// --server-side` would. It maps kinds to resources through discovery, so
// it handles built-in kinds and CRDs alike.
package manifest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// Decode splits data into documents and decodes each non-empty one into an
// object. Every object must name its apiVersion, kind and metadata.name;
// List kinds are flattened into their items.
func Decode(data []byte) ([]*unstructured.Unstructured, error) {
	r := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for i := 0; ; i++ {
		var m map[string]any
		if err := r.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, fmt.Errorf("decode document %d: %w", i, err)
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.IsList() {
			l, err := u.ToList()
			if err != nil {
				return nil, fmt.Errorf("decode document %d: %w", i, err)
			}
			for j := range l.Items {
				it := l.Items[j]
				if err := check(&it); err != nil {
					return nil, fmt.Errorf("document %d item %d: %w", i, j, err)
				}
				out = append(out, &it)
			}
			continue
		}
		if err := check(u); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		out = append(out, u)
	}
}

func check(u *unstructured.Unstructured) error {
	gvk := u.GroupVersionKind()
	switch {
	case gvk.Version == "" || gvk.Kind == "":
		return fmt.Errorf("object without apiVersion or kind: %.200v", u.Object)
	case u.GetName() == "":
		return fmt.Errorf("%s without metadata.name", gvk.Kind)
	}
	if _, err := schema.ParseGroupVersion(u.GetAPIVersion()); err != nil {
		return fmt.Errorf("%s %s: %w", gvk.Kind, u.GetName(), err)
	}
	return nil
}

// Applier applies objects to one cluster.
type Applier struct {
	dyn          dynamic.Interface
	mapper       *restmapper.DeferredDiscoveryRESTMapper
	fieldManager string
	mu           sync.Mutex // serialises mapper resets
}

// NewApplier returns an Applier for the cluster cfg points at; changes are
// owned by fieldManager.
func NewApplier(cfg *rest.Config, fieldManager string) (*Applier, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	return &Applier{
		dyn:          dyn,
		mapper:       restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)),
		fieldManager: fieldManager,
	}, nil
}

// ApplyYAML decodes data and applies every object in order.
func (a *Applier) ApplyYAML(ctx context.Context, data []byte) ([]*unstructured.Unstructured, error) {
	objs, err := Decode(data)
	if err != nil {
		return nil, err
	}
	return a.Apply(ctx, objs...)
}

// Apply server-side-applies objs in order (forcing ownership of conflicting
// fields) and returns what the server stored. A namespaced object without a
// namespace goes to "default". A kind the server does not know yet (a CRD
// created a moment ago) is retried for a few seconds while discovery
// catches up.
func (a *Applier) Apply(ctx context.Context, objs ...*unstructured.Unstructured) ([]*unstructured.Unstructured, error) {
	out := make([]*unstructured.Unstructured, 0, len(objs))
	for _, o := range objs {
		ri, err := a.resourceFor(ctx, o)
		if err != nil {
			return out, err
		}
		got, err := ri.Apply(ctx, o.GetName(), o, metav1.ApplyOptions{FieldManager: a.fieldManager, Force: true})
		if err != nil {
			return out, fmt.Errorf("apply %s %s: %w", o.GetKind(), describe(o), err)
		}
		out = append(out, got)
	}
	return out, nil
}

// Delete deletes objs, ignoring ones that do not exist.
func (a *Applier) Delete(ctx context.Context, objs ...*unstructured.Unstructured) error {
	var errs []error
	for _, o := range objs {
		ri, err := a.resourceFor(ctx, o)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		bg := metav1.DeletePropagationBackground
		if err := ri.Delete(ctx, o.GetName(), metav1.DeleteOptions{PropagationPolicy: &bg}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("delete %s %s: %w", o.GetKind(), describe(o), err))
		}
	}
	return errors.Join(errs...)
}

func (a *Applier) resourceFor(ctx context.Context, o *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := o.GroupVersionKind()
	var m *meta.RESTMapping
	var err error
	for attempt := 0; ; attempt++ {
		m, err = a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err == nil || !meta.IsNoMatchError(err) || attempt >= 20 {
			break
		}
		a.mu.Lock()
		a.mapper.Reset()
		a.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, fmt.Errorf("map %s to a resource: %w", gvk, err)
	}
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		ns := o.GetNamespace()
		if ns == "" {
			ns = "default"
			o.SetNamespace(ns)
		}
		return a.dyn.Resource(m.Resource).Namespace(ns), nil
	}
	return a.dyn.Resource(m.Resource), nil
}

func describe(o *unstructured.Unstructured) string {
	if ns := o.GetNamespace(); ns != "" {
		return ns + "/" + o.GetName()
	}
	return o.GetName()
}

func isNotFound(err error) bool {
	return err != nil && strings.Contains(err.Error(), "not found")
}
