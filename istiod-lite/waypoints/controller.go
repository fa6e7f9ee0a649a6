package waypoints

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayapplyv1 "sigs.k8s.io/gateway-api/applyconfiguration/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gatewayinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	"github.com/meshlite/meshlite/internal/kube"
)

// Controller deploys waypoints for Gateways of class istio-waypoint.
type Controller struct {
	kc       kubernetes.Interface
	gc       gatewayclient.Interface
	gateways cache.SharedIndexInformer
	cfg      Config
	log      *slog.Logger
	now      func() time.Time

	mu sync.Mutex
	// queue is set while Run runs (on the leader); events before that are
	// dropped, as Run starts by queueing every Gateway.
	queue workqueue.TypedRateLimitingInterface[string]
}

// New registers the controller's handlers on the shared Gateway informer
// (before it starts); Run does the work.
func New(kc kubernetes.Interface, gc gatewayclient.Interface, gateways cache.SharedIndexInformer, cfg Config, log *slog.Logger) (*Controller, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if gateways == nil {
		return nil, errors.New("the waypoint controller needs a Gateway informer (the Gateway API CRDs installed)")
	}
	c := &Controller{kc: kc, gc: gc, gateways: gateways, cfg: cfg.withDefaults(), log: log, now: time.Now}
	_, err := gateways.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: c.enqueueGateway,
		UpdateFunc: func(o, n any) {
			if og, ok := o.(*gatewayv1.Gateway); ok {
				if ng, ok := n.(*gatewayv1.Gateway); ok && og.ResourceVersion == ng.ResourceVersion {
					return // a resync
				}
			}
			c.enqueueGateway(n)
		},
		// Children go with the Gateway through their owner references.
	})
	if err != nil {
		return nil, fmt.Errorf("watch Gateways: %w", err)
	}
	return c, nil
}

func (c *Controller) enqueueGateway(o any) {
	gw, ok := o.(*gatewayv1.Gateway)
	if !ok || string(gw.Spec.GatewayClassName) != kube.WaypointGatewayClass {
		return
	}
	c.enqueue(gw.Namespace + "/" + gw.Name)
}

func (c *Controller) enqueue(key string) {
	c.mu.Lock()
	q := c.queue
	c.mu.Unlock()
	if q != nil {
		q.Add(key)
	}
}

// enqueueOwner queues the Gateway that owns a child.
func (c *Controller) enqueueOwner(o any) {
	if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = t.Obj
	}
	m, ok := o.(metav1.Object)
	if !ok {
		return
	}
	for _, r := range m.GetOwnerReferences() {
		if r.Kind == "Gateway" && r.APIVersion == gatewayv1.GroupVersion.String() {
			c.enqueue(m.GetNamespace() + "/" + r.Name)
		}
	}
}

// Run makes sure the GatewayClass exists and is accepted, then keeps every
// waypoint Gateway's children and status as they should be until ctx ends.
// The shared Gateway informer must be started by the caller. Run may be
// called again after it returned (a regained leadership).
func (c *Controller) Run(ctx context.Context) error {
	q := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "waypoints"})
	c.mu.Lock()
	c.queue = q
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.queue = nil
		c.mu.Unlock()
		q.ShutDown()
	}()

	// Children, to re-create what someone deletes or changes.
	sel := func(o *metav1.ListOptions) { o.LabelSelector = LabelGatewayClassName + "=" + kube.WaypointGatewayClass }
	kf := informers.NewSharedInformerFactoryWithOptions(c.kc, 0, informers.WithTweakListOptions(sel))
	children := cache.ResourceEventHandlerFuncs{
		AddFunc: c.enqueueOwner,
		UpdateFunc: func(o, n any) {
			// A Deployment's status moves a lot during a rollout; only a
			// change of what was applied (the spec, so the generation, or
			// the metadata) needs a look.
			if od, ok := o.(*appsv1.Deployment); ok {
				if nd, ok := n.(*appsv1.Deployment); ok && od.Generation == nd.Generation &&
					equality.Semantic.DeepEqual(od.Labels, nd.Labels) && equality.Semantic.DeepEqual(od.OwnerReferences, nd.OwnerReferences) {
					return
				}
			}
			c.enqueueOwner(n)
		},
		DeleteFunc: c.enqueueOwner,
	}
	for _, inf := range []cache.SharedIndexInformer{
		kf.Apps().V1().Deployments().Informer(), kf.Core().V1().Services().Informer(), kf.Core().V1().ServiceAccounts().Informer(),
	} {
		if _, err := inf.AddEventHandler(children); err != nil {
			return fmt.Errorf("watch waypoint children: %w", err)
		}
	}
	// The GatewayClass, to put it back should it be deleted.
	gf := gatewayinformers.NewSharedInformerFactoryWithOptions(c.gc, 0, gatewayinformers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "metadata.name=" + kube.WaypointGatewayClass
	}))
	classChanged := make(chan struct{}, 1)
	poke := func(any) {
		select {
		case classChanged <- struct{}{}:
		default:
		}
	}
	if _, err := gf.Gateway().V1().GatewayClasses().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: poke, UpdateFunc: func(_, n any) { poke(n) }, DeleteFunc: poke,
	}); err != nil {
		return fmt.Errorf("watch GatewayClasses: %w", err)
	}
	infCtx, stopInformers := context.WithCancel(context.Background())
	defer func() {
		stopInformers()
		kf.Shutdown()
		gf.Shutdown()
	}()
	kf.Start(infCtx.Done())
	gf.Start(infCtx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.gateways.HasSynced) {
		return nil
	}
	for t, ok := range kf.WaitForCacheSync(ctx.Done()) {
		if !ok {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("waypoint children informer %v did not sync", t)
		}
	}
	gf.WaitForCacheSync(ctx.Done())

	for _, o := range c.gateways.GetStore().List() {
		c.enqueueGateway(o)
	}
	c.log.Info("waypoint controller running", "class", kube.WaypointGatewayClass, "controller", ControllerName)

	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		c.keepClass(ctx, classChanged)
	}()
	go func() {
		defer wg.Done()
		for c.processNext(ctx, q) {
		}
	}()
	<-ctx.Done()
	q.ShutDown()
	wg.Wait()
	return nil
}

// keepClass ensures the GatewayClass at start and whenever it changes,
// retrying failures.
func (c *Controller) keepClass(ctx context.Context, changed <-chan struct{}) {
	retry := time.NewTimer(0)
	defer retry.Stop()
	backoff := 100 * time.Millisecond
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry.C:
		}
		if err := c.ensureClass(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			c.log.Warn("cannot ensure GatewayClass; retrying", "class", kube.WaypointGatewayClass, "err", err, "in", backoff)
			retry.Reset(backoff)
			backoff = min(backoff*2, 30*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// ensureClass creates GatewayClass istio-waypoint for this controller and
// accepts it. A class of that name owned by another controller is left
// alone (controllerName is immutable), with a warning.
func (c *Controller) ensureClass(ctx context.Context) error {
	classes := c.gc.GatewayV1().GatewayClasses()
	gc, err := classes.Get(ctx, kube.WaypointGatewayClass, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		ac := gatewayapplyv1.GatewayClass(kube.WaypointGatewayClass).
			WithLabels(map[string]string{kube.LabelGatewayManaged: kube.ManagedMeshController}).
			WithSpec(gatewayapplyv1.GatewayClassSpec().
				WithControllerName(ControllerName).
				WithDescription("The default Istio waypoint GatewayClass (meshlite istiod-lite)"))
		gc, err = classes.Apply(ctx, ac, metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
		if err != nil {
			return fmt.Errorf("create GatewayClass %s: %w", kube.WaypointGatewayClass, err)
		}
		c.log.Info("created GatewayClass", "class", kube.WaypointGatewayClass, "controller", ControllerName)
	} else if err != nil {
		return fmt.Errorf("get GatewayClass %s: %w", kube.WaypointGatewayClass, err)
	}
	if gc.Spec.ControllerName != ControllerName {
		c.log.Warn("GatewayClass belongs to another controller; waypoints are still deployed for its Gateways",
			"class", gc.Name, "controller", gc.Spec.ControllerName)
		return nil
	}
	want := ClassStatus(gc, metav1.NewTime(c.now()))
	if equality.Semantic.DeepEqual(gc.Status.Conditions, want.Conditions) {
		return nil
	}
	ac := gatewayapplyv1.GatewayClass(gc.Name)
	ac.Status = &gatewayapplyv1.GatewayClassStatusApplyConfiguration{}
	if err := convert(want, ac.Status); err != nil {
		return err
	}
	if _, err := classes.ApplyStatus(ctx, ac, metav1.ApplyOptions{FieldManager: FieldManager, Force: true}); err != nil {
		return fmt.Errorf("accept GatewayClass %s: %w", gc.Name, err)
	}
	return nil
}

func (c *Controller) processNext(ctx context.Context, q workqueue.TypedRateLimitingInterface[string]) bool {
	key, quit := q.Get()
	if quit {
		return false
	}
	defer q.Done(key)
	if err := c.reconcile(ctx, key); err != nil {
		if ctx.Err() != nil {
			return true
		}
		c.log.Warn("waypoint not reconciled; retrying", "gateway", key, "err", err, "retries", q.NumRequeues(key))
		q.AddRateLimited(key)
		return true
	}
	q.Forget(key)
	return true
}

// reconcile applies the children of Gateway key and writes its status.
func (c *Controller) reconcile(ctx context.Context, key string) error {
	obj, exists, err := c.gateways.GetIndexer().GetByKey(key)
	if err != nil || !exists {
		return err // deleted: the garbage collector removes the children
	}
	gw, ok := obj.(*gatewayv1.Gateway)
	if !ok || string(gw.Spec.GatewayClassName) != kube.WaypointGatewayClass || gw.DeletionTimestamp != nil {
		return nil
	}
	opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	var svc *corev1.Service
	var applyErr error
	accepted := len(gw.Spec.Addresses) == 0 && hasHBONE(gw)
	if accepted {
		applyErr = func() error {
			if _, err := c.kc.CoreV1().ServiceAccounts(gw.Namespace).Apply(ctx, ServiceAccount(gw), opts); err != nil {
				return fmt.Errorf("apply ServiceAccount: %w", err)
			}
			if _, err := c.kc.AppsV1().Deployments(gw.Namespace).Apply(ctx, c.cfg.Deployment(gw), opts); err != nil {
				return fmt.Errorf("apply Deployment: %w", err)
			}
			s, err := c.kc.CoreV1().Services(gw.Namespace).Apply(ctx, Service(gw), opts)
			if err != nil {
				return fmt.Errorf("apply Service: %w", err)
			}
			svc = s
			return nil
		}()
		if applyErr != nil {
			c.log.Error("cannot deploy waypoint", "gateway", key, "err", applyErr)
		}
	}
	want := c.cfg.Status(gw, svc, applyErr, metav1.NewTime(c.now()))
	if !equality.Semantic.DeepEqual(gw.Status, want) {
		ac := gatewayapplyv1.Gateway(gw.Name, gw.Namespace)
		ac.Status = &gatewayapplyv1.GatewayStatusApplyConfiguration{}
		if err := convert(want, ac.Status); err != nil {
			return err
		}
		if _, err := c.gc.GatewayV1().Gateways(gw.Namespace).ApplyStatus(ctx, ac, opts); err != nil {
			if apierrors.IsNotFound(err) {
				return nil
			}
			return errors.Join(applyErr, fmt.Errorf("write status: %w", err))
		}
		c.log.Info("waypoint status written", "gateway", key, "programmed", programmed(want), "addresses", len(want.Addresses))
	}
	return applyErr
}

func hasHBONE(gw *gatewayv1.Gateway) bool {
	for _, l := range gw.Spec.Listeners {
		if l.Protocol == ProtocolHBONE {
			return true
		}
	}
	return false
}

func programmed(st gatewayv1.GatewayStatus) bool {
	for _, c := range st.Conditions {
		if c.Type == string(gatewayv1.GatewayConditionProgrammed) {
			return c.Status == metav1.ConditionTrue
		}
	}
	return false
}

// convert copies a typed status into its apply configuration (they share
// the JSON form).
func convert(from, to any) error {
	b, err := json.Marshal(from)
	if err != nil {
		return fmt.Errorf("encode status: %w", err)
	}
	if err := json.Unmarshal(b, to); err != nil {
		return fmt.Errorf("decode status: %w", err)
	}
	return nil
}
