package install

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// ApplyOptions say how to apply.
type ApplyOptions struct {
	// DryRun asks the API server to check every object (admission,
	// validation, RBAC) without persisting anything (--dry-run=server).
	// The release namespace must exist, as the server cannot check objects
	// in a namespace it does not have.
	DryRun bool
	// FieldManager owns the applied fields (default "meshctl"). Conflicts
	// with other managers are forced: the chart wins, as `kubectl apply
	// --server-side --force-conflicts` does.
	FieldManager string
	// CRDTimeout bounds the wait for the CRDs to be Established (default 60s).
	CRDTimeout time.Duration
	// Log gets one line per object (nil: none).
	Log *slog.Logger
}

// client reaches one cluster's resources of any kind.
type client struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newClient(cfg *rest.Config) (*client, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	return &client{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}, nil
}

// resource maps o to its resource. A kind discovery does not know yet (a
// CRD established a moment ago) is retried for a few seconds.
func (c *client) resource(ctx context.Context, o *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := o.GroupVersionKind()
	var m *meta.RESTMapping
	var err error
	for attempt := 0; ; attempt++ {
		m, err = c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err == nil || !meta.IsNoMatchError(err) || attempt >= 20 {
			break
		}
		c.mapper.Reset()
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
		if o.GetNamespace() == "" {
			return nil, fmt.Errorf("%s %s: namespaced object without a namespace", o.GetKind(), o.GetName())
		}
		return c.dyn.Resource(m.Resource).Namespace(o.GetNamespace()), nil
	}
	return c.dyn.Resource(m.Resource), nil
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

func isCRD(o *unstructured.Unstructured) bool {
	return o.GetKind() == "CustomResourceDefinition" && o.GroupVersionKind().Group == "apiextensions.k8s.io"
}

// Apply server-side-applies objs: Namespaces first, then the CRDs (and,
// unless DryRun, waits until they are Established), then the rest in the
// order given. It stops at the first object the server refuses.
func Apply(ctx context.Context, cfg *rest.Config, objs []*unstructured.Unstructured, opts ApplyOptions) error {
	if opts.FieldManager == "" {
		opts.FieldManager = FieldManager
	}
	if opts.CRDTimeout == 0 {
		opts.CRDTimeout = 60 * time.Second
	}
	c, err := newClient(cfg)
	if err != nil {
		return err
	}
	var nss, crds, rest []*unstructured.Unstructured
	for _, o := range objs {
		switch {
		case o.GetKind() == "Namespace" && o.GetAPIVersion() == "v1":
			nss = append(nss, o)
		case isCRD(o):
			crds = append(crds, o)
		default:
			rest = append(rest, o)
		}
	}
	apply := func(o *unstructured.Unstructured) error {
		ri, err := c.resource(ctx, o)
		if err != nil {
			return err
		}
		ao := metav1.ApplyOptions{FieldManager: opts.FieldManager, Force: true}
		if opts.DryRun {
			ao.DryRun = []string{metav1.DryRunAll}
		}
		if _, err := ri.Apply(ctx, o.GetName(), o, ao); err != nil {
			return fmt.Errorf("apply %s %s: %w", o.GetKind(), describe(o), err)
		}
		if opts.Log != nil {
			opts.Log.Info("applied", "kind", o.GetKind(), "name", describe(o), "dryRun", opts.DryRun)
		}
		return nil
	}
	for _, o := range nss {
		if err := apply(o); err != nil {
			return err
		}
	}
	if opts.DryRun {
		// Nothing was created: objects in a missing namespace cannot be
		// checked, say so rather than fail on each of them.
		for _, o := range nss {
			if _, err := c.dyn.Resource(schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}).Get(ctx, o.GetName(), metav1.GetOptions{}); apierrors.IsNotFound(err) {
				return fmt.Errorf("server-side dry run: namespace %s does not exist, so the server cannot check the objects in it; create it first", o.GetName())
			}
		}
	}
	for _, o := range crds {
		if err := apply(o); err != nil {
			return err
		}
	}
	if !opts.DryRun && len(crds) > 0 {
		if err := waitEstablished(ctx, c, crds, opts.CRDTimeout); err != nil {
			return err
		}
		c.mapper.Reset()
	}
	for _, o := range rest {
		if err := apply(o); err != nil {
			return err
		}
	}
	return nil
}

// waitEstablished waits until every CRD in crds is Established (served).
func waitEstablished(ctx context.Context, c *client, crds []*unstructured.Unstructured, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for _, crd := range crds {
		for {
			got, err := c.dyn.Resource(crdGVR).Get(ctx, crd.GetName(), metav1.GetOptions{})
			if err == nil && condition(got, "Established") {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("CRD %s not Established within %v (last error: %v)", crd.GetName(), timeout, err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

func condition(o *unstructured.Unstructured, typ string) bool {
	conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if ok && m["type"] == typ && m["status"] == "True" {
			return true
		}
	}
	return false
}

// UninstallOptions say what to remove.
type UninstallOptions struct {
	// DeleteCRDs removes the CRDs too, and with them every
	// AuthorizationPolicy and PeerAuthentication in the cluster (Helm keeps
	// CRDs on uninstall; so does this unless asked).
	DeleteCRDs bool
	// DeleteNamespace removes the release namespace too (and with it the
	// mesh's root CA Secret).
	DeleteNamespace bool
	// Wait is how long to wait for the workloads' pods to be gone (0: do
	// not wait). The CNI agent unchains itself from each node and removes
	// the in-pod rules while its pod stops.
	Wait time.Duration
	Log  *slog.Logger
}

// Uninstall deletes objs in reverse order (workloads before the RBAC they
// run with), all at once as `kubectl delete -f` does, skipping what does
// not exist. The CNI agent watches its own DaemonSet, so it still cleans
// its node up although its ServiceAccount and RBAC go at the same time.
func Uninstall(ctx context.Context, cfg *rest.Config, objs []*unstructured.Unstructured, opts UninstallOptions) error {
	c, err := newClient(cfg)
	if err != nil {
		return err
	}
	var errs []error
	var workloads []*unstructured.Unstructured
	for _, o := range slices.Backward(objs) {
		switch {
		case o.GetKind() == "Namespace" && !opts.DeleteNamespace:
			continue
		case isCRD(o) && !opts.DeleteCRDs:
			continue
		}
		ri, err := c.resource(ctx, o)
		if err != nil {
			if meta.IsNoMatchError(errors.Unwrap(err)) {
				continue // its CRD is gone, and it with it
			}
			errs = append(errs, err)
			continue
		}
		bg := metav1.DeletePropagationBackground
		err = ri.Delete(ctx, o.GetName(), metav1.DeleteOptions{PropagationPolicy: &bg})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			errs = append(errs, fmt.Errorf("delete %s %s: %w", o.GetKind(), describe(o), err))
		default:
			if opts.Log != nil {
				opts.Log.Info("deleted", "kind", o.GetKind(), "name", describe(o))
			}
			if o.GetKind() == "DaemonSet" || o.GetKind() == "Deployment" {
				workloads = append(workloads, o)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if opts.Wait > 0 {
		return waitPodsGone(ctx, c, workloads, opts.Wait)
	}
	return nil
}

var podGVR = schema.GroupVersionResource{Version: "v1", Resource: "pods"}

// waitPodsGone waits until no pod matches any workload's selector.
func waitPodsGone(ctx context.Context, c *client, workloads []*unstructured.Unstructured, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for _, w := range workloads {
		ml, _, err := unstructured.NestedStringMap(w.Object, "spec", "selector", "matchLabels")
		if err != nil || len(ml) == 0 {
			continue
		}
		sel := labels.SelectorFromSet(ml).String()
		for {
			l, err := c.dyn.Resource(podGVR).Namespace(w.GetNamespace()).List(ctx, metav1.ListOptions{LabelSelector: sel})
			if err == nil && len(l.Items) == 0 {
				break
			}
			select {
			case <-ctx.Done():
				n := -1
				if l != nil {
					n = len(l.Items)
				}
				return fmt.Errorf("%s %s: %d pods still there after %v (last error: %v)", w.GetKind(), describe(w), n, timeout, err)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	return nil
}

func describe(o *unstructured.Unstructured) string {
	if ns := o.GetNamespace(); ns != "" {
		return ns + "/" + o.GetName()
	}
	return o.GetName()
}
