package registry

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
)

// crdResource is what the watcher watches: a CRD's appearance is an event,
// where discovery would have to be polled.
var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// startCRDWatch starts, when some optional API is missing, the goroutine
// that watches CustomResourceDefinitions and takes an API up once all its
// CRDs are established.
func (in *Informers) startCRDWatch(ctx context.Context) {
	var missing []string
	for a := range numAPIs {
		if !in.Served(a) {
			missing = append(missing, a.String())
		}
	}
	if len(missing) == 0 {
		return
	}
	in.wg.Add(1)
	go func() {
		defer in.wg.Done()
		in.runCRDWatch(ctx, missing)
	}()
}

// runCRDWatch runs the CRD informer and takes APIs up until ctx ends.
// Without the right to list CRDs (the RBAC of an older chart) it logs that
// late CRDs need a restart and returns.
func (in *Informers) runCRDWatch(ctx context.Context, missing []string) {
	probe, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err := in.dc.Resource(crdResource).List(probe, metav1.ListOptions{Limit: 1})
	cancel()
	if apierrors.IsForbidden(err) {
		in.log.Warn("cannot watch CustomResourceDefinitions: APIs installed later are taken up only on restart",
			"missing", missing, "err", err)
		return
	}
	inf := dynamicinformer.NewFilteredDynamicInformer(in.dc, crdResource, "", 0, cache.Indexers{}, nil).Informer()
	if err := inf.SetTransform(trimCRD); err != nil {
		in.log.Error("cannot watch CustomResourceDefinitions", "err", err)
		return
	}
	poke := func() {
		select {
		case in.poke <- struct{}{}:
		default:
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { poke() },
		UpdateFunc: func(_, n any) { poke() },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			if u, ok := o.(*unstructured.Unstructured); ok {
				if a, ok := apiOfCRD(u.GetName()); ok && in.Served(a) {
					// Its informers keep retrying and the objects last seen
					// stay in use; a restart drops them.
					in.log.Warn("CRD of a watched API deleted; its last objects stay in use until restart", "crd", u.GetName(), "api", a.String())
				}
			}
		},
	}); err != nil {
		in.log.Error("cannot watch CustomResourceDefinitions", "err", err)
		return
	}
	in.crds = inf
	in.log.Info("watching CustomResourceDefinitions for APIs not served yet", "missing", missing)
	done := make(chan struct{})
	go func() {
		defer close(done)
		inf.Run(ctx.Done())
	}()
	in.watchCRDs(ctx)
	<-done
}

// watchCRDs takes up each missing API whose CRDs are all established, one
// at a time, until ctx ends.
func (in *Informers) watchCRDs(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-in.poke:
		}
		for a := range numAPIs {
			if ctx.Err() != nil {
				return
			}
			if !in.Served(a) && in.crdsEstablished(a) {
				in.takeUp(ctx, a)
			}
		}
	}
}

// takeUp makes a's informers, lets the hooks register on them, starts them
// and waits for their first list.
func (in *Informers) takeUp(ctx context.Context, a API) {
	made, err := in.make(a)
	if err != nil {
		in.log.Error("cannot take up an API", "api", a.String(), "err", err)
		return
	}
	in.mu.Lock()
	hooks := append([]func(API) error(nil), in.hooks...)
	in.mu.Unlock()
	for _, h := range hooks {
		if err := h(a); err != nil {
			in.log.Error("part not ready for an API taken up late", "api", a.String(), "err", err)
		}
	}
	in.gatewayFactory.Start(ctx.Done())
	in.dynFactory.Start(ctx.Done())
	synced := make([]cache.InformerSynced, len(made))
	for i, inf := range made {
		synced[i] = inf.HasSynced
	}
	// Bounded: an API that cannot be listed (RBAC, a broken conversion
	// webhook) must not stop the others from being taken up. Its informers
	// keep retrying on their own.
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if cache.WaitForCacheSync(wctx.Done(), synced...) {
		in.log.Info("API installed: now watched", "api", a.String())
	} else if ctx.Err() == nil {
		in.log.Error("API installed but not listed within a minute; its informers keep trying", "api", a.String())
	}
}

// crdsEstablished reports whether every CRD of a is established and
// serves the version read.
func (in *Informers) crdsEstablished(a API) bool {
	for _, r := range a.Resources() {
		o, ok, err := in.crds.GetStore().GetByKey(r.Resource + "." + r.Group)
		if err != nil || !ok {
			return false
		}
		u, ok := o.(*unstructured.Unstructured)
		if !ok || !crdServes(u, r.Version) {
			return false
		}
	}
	return true
}

func apiOfCRD(name string) (API, bool) {
	for a := range numAPIs {
		for _, r := range a.Resources() {
			if r.Resource+"."+r.Group == name {
				return a, true
			}
		}
	}
	return 0, false
}

// crdServes reports whether a (trimmed) CRD is Established and serves
// version.
func crdServes(u *unstructured.Unstructured, version string) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	established := false
	for _, c := range conds {
		if m, ok := c.(map[string]any); ok && m["type"] == "Established" && m["status"] == "True" {
			established = true
		}
	}
	if !established {
		return false
	}
	vs, _, _ := unstructured.NestedSlice(u.Object, "spec", "versions")
	for _, v := range vs {
		if m, ok := v.(map[string]any); ok && m["name"] == version && m["served"] == true {
			return true
		}
	}
	return false
}

// trimCRD keeps of a CRD only its name, versions (served or not) and
// conditions: schemas are large and nothing here reads them.
func trimCRD(obj any) (any, error) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return obj, nil
	}
	out := &unstructured.Unstructured{Object: map[string]any{}}
	out.SetAPIVersion(u.GetAPIVersion())
	out.SetKind(u.GetKind())
	out.SetName(u.GetName())
	out.SetResourceVersion(u.GetResourceVersion())
	out.SetUID(u.GetUID())
	var versions []any
	vs, _, _ := unstructured.NestedSlice(u.Object, "spec", "versions")
	for _, v := range vs {
		if m, ok := v.(map[string]any); ok {
			versions = append(versions, map[string]any{"name": m["name"], "served": m["served"]})
		}
	}
	var conds []any
	cs, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range cs {
		if m, ok := c.(map[string]any); ok {
			conds = append(conds, map[string]any{"type": m["type"], "status": m["status"]})
		}
	}
	if err := unstructured.SetNestedSlice(out.Object, versions, "spec", "versions"); err != nil {
		return nil, fmt.Errorf("trim CRD %s: %w", u.GetName(), err)
	}
	if err := unstructured.SetNestedSlice(out.Object, conds, "status", "conditions"); err != nil {
		return nil, fmt.Errorf("trim CRD %s: %w", u.GetName(), err)
	}
	return out, nil
}
