package routestatus

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/istiod-lite/model"
)

// Informers are the shared informers the Writer reads (started by the
// caller). ReferenceGrants may be nil (the API is not served: no grants;
// SetReferenceGrants adds them later); the others are required.
type Informers struct {
	HTTPRoutes, GRPCRoutes, Services, Namespaces, Gateways, ReferenceGrants cache.SharedIndexInformer
}

// refsIndex indexes routes by the Services they name (parents and
// backends, "svc:<ns>/<name>") and those Services' namespaces ("ns:<ns>").
const refsIndex = "meshlite-route-refs"

type kind string

const (
	kindHTTP kind = "HTTPRoute"
	kindGRPC kind = "GRPCRoute"
)

type key struct {
	kind      kind
	namespace string
	name      string
}

func (k key) String() string { return string(k.kind) + " " + k.namespace + "/" + k.name }

// Writer keeps the status of routes attached to Services up to date.
type Writer struct {
	gc  gatewayclient.Interface
	in  Informers
	cfg model.Config
	log *slog.Logger
	now func() time.Time

	mu sync.Mutex
	// queue is set while Run runs (on the leader); events before that are
	// dropped, as Run starts by queueing every route.
	queue workqueue.TypedRateLimitingInterface[key]
	// grants is in.ReferenceGrants, which SetReferenceGrants may set late.
	grants cache.SharedIndexInformer
}

// New registers the Writer's index and handlers on the informers (before
// they start); Run does the work.
func New(gc gatewayclient.Interface, in Informers, cfg model.Config, log *slog.Logger) (*Writer, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for what, inf := range map[string]cache.SharedIndexInformer{"HTTPRoutes": in.HTTPRoutes, "GRPCRoutes": in.GRPCRoutes,
		"Services": in.Services, "Namespaces": in.Namespaces, "Gateways": in.Gateways} {
		if inf == nil {
			return nil, fmt.Errorf("route status needs an informer on %s (the Gateway API CRDs installed)", what)
		}
	}
	w := &Writer{gc: gc, in: in, cfg: cfg.WithDefaults(), log: log, now: time.Now, grants: in.ReferenceGrants}
	for k, inf := range map[kind]cache.SharedIndexInformer{kindHTTP: in.HTTPRoutes, kindGRPC: in.GRPCRoutes} {
		if err := inf.AddIndexers(cache.Indexers{refsIndex: routeRefs}); err != nil {
			return nil, fmt.Errorf("index %ss: %w", k, err)
		}
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: w.enqueueRoute,
			UpdateFunc: func(o, n any) {
				if sameVersion(o, n) {
					return // a resync
				}
				w.enqueueRoute(n)
			},
		}); err != nil {
			return nil, fmt.Errorf("watch %ss: %w", k, err)
		}
	}
	// What a route's status depends on: the Services it names, their
	// namespaces' labels, waypoints, grants.
	for _, h := range []struct {
		inf  cache.SharedIndexInformer
		what string
		f    func(any)
	}{
		{in.Services, "Services", func(o any) {
			if m, ok := o.(metav1.Object); ok {
				w.enqueueIndexed("svc:" + m.GetNamespace() + "/" + m.GetName())
			}
		}},
		{in.Namespaces, "Namespaces", func(o any) {
			if m, ok := o.(metav1.Object); ok {
				w.enqueueIndexed("ns:" + m.GetName())
			}
		}},
		{in.ReferenceGrants, "ReferenceGrants", w.grantChanged},
		{in.Gateways, "Gateways", func(o any) {
			// Which Services a waypoint serves is read from labels, so a
			// waypoint's change may concern any route; they are few.
			if gw, ok := o.(*gatewayv1.Gateway); ok && string(gw.Spec.GatewayClassName) == kube.WaypointGatewayClass {
				w.enqueueAll()
			}
		}},
	} {
		if err := on(h.inf, h.what, h.f); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// on calls f with the object of every add, delete and real update of inf
// (nil: nothing to watch).
func on(inf cache.SharedIndexInformer, what string, f func(any)) error {
	if inf == nil {
		return nil
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: f,
		UpdateFunc: func(o, n any) {
			if !sameVersion(o, n) {
				f(n)
			}
		},
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			f(o)
		},
	})
	if err != nil {
		return fmt.Errorf("watch %s: %w", what, err)
	}
	return nil
}

func (w *Writer) grantChanged(o any) {
	if m, ok := o.(metav1.Object); ok {
		w.enqueueIndexed("ns:" + m.GetNamespace())
	}
}

// SetReferenceGrants gives the Writer the ReferenceGrant informer when that
// API is installed after New (call it before the informer starts). Each
// grant's first add then re-checks the routes of the namespace it names.
func (w *Writer) SetReferenceGrants(inf cache.SharedIndexInformer) error {
	if err := on(inf, "ReferenceGrants", w.grantChanged); err != nil {
		return err
	}
	w.mu.Lock()
	w.grants = inf
	w.mu.Unlock()
	return nil
}

// informers is w.in with the grants as they are now.
func (w *Writer) informers() Informers {
	w.mu.Lock()
	defer w.mu.Unlock()
	in := w.in
	in.ReferenceGrants = w.grants
	return in
}

func sameVersion(o, n any) bool {
	om, ok1 := o.(metav1.Object)
	nm, ok2 := n.(metav1.Object)
	return ok1 && ok2 && om.GetResourceVersion() == nm.GetResourceVersion()
}

// routeRefs is the refsIndex function.
func routeRefs(o any) ([]string, error) {
	var (
		ns       string
		parents  []gatewayv1.ParentReference
		backends []gatewayv1.BackendObjectReference
	)
	switch rt := o.(type) {
	case *gatewayv1.HTTPRoute:
		ns, parents = rt.Namespace, rt.Spec.ParentRefs
		backends = model.HTTPRouteBackends(rt)
	case *gatewayv1.GRPCRoute:
		ns, parents = rt.Namespace, rt.Spec.ParentRefs
		backends = model.GRPCRouteBackends(rt)
	default:
		return nil, nil
	}
	set := map[string]bool{}
	for _, k := range model.ServiceParents(ns, parents) {
		set["svc:"+k.Namespace+"/"+k.Name] = true
		set["ns:"+k.Namespace] = true
	}
	for _, b := range backends {
		bns := ns
		if b.Namespace != nil && *b.Namespace != "" {
			bns = string(*b.Namespace)
		}
		set["svc:"+bns+"/"+string(b.Name)] = true
		set["ns:"+bns] = true
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	return out, nil
}

func (w *Writer) enqueue(k key) {
	w.mu.Lock()
	q := w.queue
	w.mu.Unlock()
	if q != nil {
		q.Add(k)
	}
}

func (w *Writer) enqueueRoute(o any) {
	switch rt := o.(type) {
	case *gatewayv1.HTTPRoute:
		w.enqueue(key{kindHTTP, rt.Namespace, rt.Name})
	case *gatewayv1.GRPCRoute:
		w.enqueue(key{kindGRPC, rt.Namespace, rt.Name})
	}
}

func (w *Writer) enqueueIndexed(v string) {
	for _, inf := range []cache.SharedIndexInformer{w.in.HTTPRoutes, w.in.GRPCRoutes} {
		objs, err := inf.GetIndexer().ByIndex(refsIndex, v)
		if err != nil {
			w.log.Error("route index lookup failed", "value", v, "err", err)
			continue
		}
		for _, o := range objs {
			w.enqueueRoute(o)
		}
	}
}

func (w *Writer) enqueueAll() {
	for _, inf := range []cache.SharedIndexInformer{w.in.HTTPRoutes, w.in.GRPCRoutes} {
		for _, o := range inf.GetStore().List() {
			w.enqueueRoute(o)
		}
	}
}

// Run keeps every Service-attached route's status current until ctx ends.
// The informers must be started by the caller. Run may be called again
// after it returned (a regained leadership).
func (w *Writer) Run(ctx context.Context) error {
	q := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[key](50*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[key]{Name: "routestatus"})
	w.mu.Lock()
	w.queue = q
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.queue = nil
		w.mu.Unlock()
		q.ShutDown()
	}()
	synced := []cache.InformerSynced{w.in.HTTPRoutes.HasSynced, w.in.GRPCRoutes.HasSynced, w.in.Services.HasSynced,
		w.in.Namespaces.HasSynced, w.in.Gateways.HasSynced}
	if g := w.informers().ReferenceGrants; g != nil {
		synced = append(synced, g.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil
	}
	w.enqueueAll()
	w.log.Info("route status writer running", "controller", ControllerName)

	done := make(chan struct{})
	go func() {
		defer close(done)
		for w.processNext(ctx, q) {
		}
	}()
	<-ctx.Done()
	q.ShutDown()
	<-done
	return nil
}

func (w *Writer) processNext(ctx context.Context, q workqueue.TypedRateLimitingInterface[key]) bool {
	k, quit := q.Get()
	if quit {
		return false
	}
	defer q.Done(k)
	if err := w.reconcile(ctx, k); err != nil {
		if ctx.Err() != nil {
			return true
		}
		if apierrors.IsConflict(err) {
			w.log.Debug("route changed while its status was written; retrying", "route", k.String())
		} else {
			w.log.Warn("route status not written; retrying", "route", k.String(), "err", err, "retries", q.NumRequeues(k))
		}
		q.AddRateLimited(k)
		return true
	}
	q.Forget(k)
	return true
}

// reconcile computes one route's status and writes it if it changed.
func (w *Writer) reconcile(ctx context.Context, k key) error {
	inf := w.in.HTTPRoutes
	if k.kind == kindGRPC {
		inf = w.in.GRPCRoutes
	}
	obj, exists, err := inf.GetIndexer().GetByKey(k.namespace + "/" + k.name)
	if err != nil || !exists {
		return err
	}
	now := metav1.NewTime(w.now())
	c := informerCluster{w.informers()}
	var (
		want, have gatewayv1.RouteStatus
		write      func(gatewayv1.RouteStatus) error
	)
	switch rt := obj.(type) {
	case *gatewayv1.HTTPRoute:
		have, want = rt.Status.RouteStatus, HTTPRouteStatus(w.cfg, c, rt, now)
		write = func(st gatewayv1.RouteStatus) error {
			n := rt.DeepCopy()
			n.Status.RouteStatus = st
			_, err := w.gc.GatewayV1().HTTPRoutes(n.Namespace).UpdateStatus(ctx, n, metav1.UpdateOptions{FieldManager: FieldManager})
			return err
		}
	case *gatewayv1.GRPCRoute:
		have, want = rt.Status.RouteStatus, GRPCRouteStatus(w.cfg, c, rt, now)
		write = func(st gatewayv1.RouteStatus) error {
			n := rt.DeepCopy()
			n.Status.RouteStatus = st
			_, err := w.gc.GatewayV1().GRPCRoutes(n.Namespace).UpdateStatus(ctx, n, metav1.UpdateOptions{FieldManager: FieldManager})
			return err
		}
	default:
		return nil
	}
	if equality.Semantic.DeepEqual(normalize(have), normalize(want)) {
		return nil
	}
	if err := write(want); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("write status of %s: %w", k, err)
	}
	w.log.Info("route status written", "route", k.String(), "parents", summary(want))
	return nil
}

// FieldManager names the Writer in managedFields.
const FieldManager = "istiod-lite-routestatus"

// normalize makes an empty status and one with an empty parents list
// compare equal (the apiserver returns either).
func normalize(st gatewayv1.RouteStatus) gatewayv1.RouteStatus {
	if len(st.Parents) == 0 {
		st.Parents = nil
	}
	return st
}

// summary is a short form of our entries for the log: "ns/name: Accepted=True ResolvedRefs=False(BackendNotFound)".
func summary(st gatewayv1.RouteStatus) []string {
	var out []string
	for _, p := range st.Parents {
		if p.ControllerName != ControllerName {
			continue
		}
		s := string(p.ParentRef.Name) + ":"
		for _, c := range p.Conditions {
			s += " " + c.Type + "=" + string(c.Status)
			if c.Status != metav1.ConditionTrue {
				s += "(" + c.Reason + ")"
			}
		}
		out = append(out, s)
	}
	return out
}

// informerCluster reads the Cluster from the informer caches.
type informerCluster struct{ in Informers }

func get[T any](inf cache.SharedIndexInformer, k string) T {
	var zero T
	if inf == nil {
		return zero
	}
	o, ok, err := inf.GetIndexer().GetByKey(k)
	if err != nil || !ok {
		return zero
	}
	v, _ := o.(T)
	return v
}

func (c informerCluster) Namespace(name string) *corev1.Namespace {
	return get[*corev1.Namespace](c.in.Namespaces, name)
}

func (c informerCluster) Gateway(ns, name string) *gatewayv1.Gateway {
	return get[*gatewayv1.Gateway](c.in.Gateways, ns+"/"+name)
}

func (c informerCluster) Service(ns, name string) *corev1.Service {
	return get[*corev1.Service](c.in.Services, ns+"/"+name)
}

func (c informerCluster) ReferenceGrants(ns string) []*gatewayv1beta1.ReferenceGrant {
	if c.in.ReferenceGrants == nil {
		return nil
	}
	objs, err := c.in.ReferenceGrants.GetIndexer().ByIndex(cache.NamespaceIndex, ns)
	if err != nil {
		return nil
	}
	out := make([]*gatewayv1beta1.ReferenceGrant, 0, len(objs))
	for _, o := range objs {
		if g, ok := o.(*gatewayv1beta1.ReferenceGrant); ok {
			out = append(out, g)
		}
	}
	return out
}
