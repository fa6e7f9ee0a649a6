package ca

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshlite/meshlite/internal/kube"
)

// ignoredNamespaces never get the root ConfigMap, as in Istio.
var ignoredNamespaces = map[string]bool{
	"kube-system": true, "kube-public": true, "kube-node-lease": true, "local-path-storage": true,
}

// RootPublisher keeps the istio-ca-root-cert ConfigMap, holding the mesh
// root, in every namespace, and puts it back when someone changes or deletes
// it.
type RootPublisher struct {
	client     kubernetes.Interface
	rootPEM    string
	namespaces cache.SharedIndexInformer
	configMaps cache.SharedIndexInformer
	cmLister   listersv1.ConfigMapLister
	nsLister   listersv1.NamespaceLister
	queue      workqueue.TypedRateLimitingInterface[string]
	log        *slog.Logger
}

// NewRootPublisher registers handlers on a namespace informer and on a
// ConfigMap informer (which may be limited to the istio-ca-root-cert name);
// call it before the informers start.
func NewRootPublisher(client kubernetes.Interface, rootPEM []byte, namespaces, configMaps cache.SharedIndexInformer, log *slog.Logger) (*RootPublisher, error) {
	p := &RootPublisher{
		client:     client,
		rootPEM:    string(rootPEM),
		namespaces: namespaces,
		configMaps: configMaps,
		cmLister:   listersv1.NewConfigMapLister(configMaps.GetIndexer()),
		nsLister:   listersv1.NewNamespaceLister(namespaces.GetIndexer()),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "root-cert-publisher"}),
		log: log,
	}
	if _, err := namespaces.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { p.enqueueNamespace(o) },
		UpdateFunc: func(_, o any) { p.enqueueNamespace(o) },
	}); err != nil {
		return nil, fmt.Errorf("watch namespaces: %w", err)
	}
	cmHandler := func(o any) {
		if cm, ok := o.(*corev1.ConfigMap); ok && cm.Name == kube.CARootConfigMap {
			p.queue.Add(cm.Namespace)
		}
	}
	if _, err := configMaps.AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(_, o any) { cmHandler(o) },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			cmHandler(o)
		},
	}); err != nil {
		return nil, fmt.Errorf("watch configmaps: %w", err)
	}
	return p, nil
}

func (p *RootPublisher) enqueueNamespace(o any) {
	if ns, ok := o.(*corev1.Namespace); ok {
		p.queue.Add(ns.Name)
	}
}

// Run writes ConfigMaps until ctx ends; the informers must be started.
func (p *RootPublisher) Run(ctx context.Context) error {
	defer p.queue.ShutDown()
	if !cache.WaitForCacheSync(ctx.Done(), p.namespaces.HasSynced, p.configMaps.HasSynced) {
		return nil
	}
	go func() {
		<-ctx.Done()
		p.queue.ShutDown()
	}()
	for {
		ns, quit := p.queue.Get()
		if quit {
			return nil
		}
		if err := p.ensure(ctx, ns); err != nil && ctx.Err() == nil {
			p.log.Warn("publishing the root certificate failed; retrying", "namespace", ns, "err", err)
			p.queue.AddRateLimited(ns)
		} else {
			p.queue.Forget(ns)
		}
		p.queue.Done(ns)
	}
}

func (p *RootPublisher) ensure(ctx context.Context, name string) error {
	if ignoredNamespaces[name] {
		return nil
	}
	ns, err := p.nsLister.Get(name)
	if apierrors.IsNotFound(err) || (err == nil && ns.Status.Phase == corev1.NamespaceTerminating) {
		return nil
	}
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	data := map[string]string{kube.CARootConfigMapKey: p.rootPEM}
	cm, err := p.cmLister.ConfigMaps(name).Get(kube.CARootConfigMap)
	if apierrors.IsNotFound(err) {
		_, err = p.client.CoreV1().ConfigMaps(name).Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: kube.CARootConfigMap, Namespace: name, Labels: map[string]string{"istio.io/config": "true"}},
			Data:       data,
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("configmap %s/%s appeared meanwhile", name, kube.CARootConfigMap)
		}
		if err == nil {
			p.log.Debug("published the root certificate", "namespace", name)
		}
		return err
	}
	if err != nil {
		return err
	}
	if cm.Data[kube.CARootConfigMapKey] == p.rootPEM {
		return nil
	}
	cm = cm.DeepCopy()
	cm.Data = data
	_, err = p.client.CoreV1().ConfigMaps(name).Update(ctx, cm, metav1.UpdateOptions{})
	if err == nil {
		p.log.Info("restored the root certificate ConfigMap", "namespace", name)
	}
	return err
}
