package registry

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gatewayinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/istiod-lite/model"
)

// Informers are the shared informers the registry reads. Other parts (the
// CA's pod index) may share them; add indexers and handlers before Start.
type Informers struct {
	Namespaces, Nodes, Pods, Services, EndpointSlices cache.SharedIndexInformer
	// Gateways, HTTPRoutes and GRPCRoutes are gateway.networking.k8s.io/v1
	// objects.
	Gateways, HTTPRoutes, GRPCRoutes cache.SharedIndexInformer
	// ReferenceGrants are gateway.networking.k8s.io/v1beta1 objects; nil
	// when the cluster does not serve that API: no route may then use a
	// Service of another namespace.
	ReferenceGrants cache.SharedIndexInformer
	// AuthorizationPolicies and PeerAuthentications deliver
	// security.istio.io/v1 objects as unstructured.
	AuthorizationPolicies, PeerAuthentications cache.SharedIndexInformer
	// TrafficPolicies deliver policy.meshlite.io/v1alpha1 objects as
	// unstructured; nil when the cluster does not serve that API (the CRD
	// is not installed): there are then no TrafficPolicies.
	TrafficPolicies cache.SharedIndexInformer

	kubeFactory    informers.SharedInformerFactory
	gatewayFactory gatewayinformers.SharedInformerFactory
	dynFactory     dynamicinformer.DynamicSharedInformerFactory
}

// NewInformers builds the informers (not started). Objects are trimmed of
// what nothing here reads, which keeps a large cluster's memory down. The
// TrafficPolicy informer is made only when the apiserver serves that API,
// so a cluster without the CRD still syncs.
func NewInformers(kc kubernetes.Interface, gc gatewayclient.Interface, dc dynamic.Interface, resync time.Duration) (*Informers, error) {
	kf := informers.NewSharedInformerFactory(kc, resync)
	gf := gatewayinformers.NewSharedInformerFactory(gc, resync)
	df := dynamicinformer.NewDynamicSharedInformerFactory(dc, resync)
	in := &Informers{
		Namespaces:            kf.Core().V1().Namespaces().Informer(),
		Nodes:                 kf.Core().V1().Nodes().Informer(),
		Pods:                  kf.Core().V1().Pods().Informer(),
		Services:              kf.Core().V1().Services().Informer(),
		EndpointSlices:        kf.Discovery().V1().EndpointSlices().Informer(),
		Gateways:              gf.Gateway().V1().Gateways().Informer(),
		HTTPRoutes:            gf.Gateway().V1().HTTPRoutes().Informer(),
		GRPCRoutes:            gf.Gateway().V1().GRPCRoutes().Informer(),
		AuthorizationPolicies: df.ForResource(model.AuthorizationPolicyGVR).Informer(),
		PeerAuthentications:   df.ForResource(model.PeerAuthenticationGVR).Informer(),
		kubeFactory:           kf,
		gatewayFactory:        gf,
		dynFactory:            df,
	}
	if served(kc, policyv1alpha1.Resource) {
		in.TrafficPolicies = df.ForResource(policyv1alpha1.Resource).Informer()
	}
	if served(kc, gatewayv1beta1.SchemeGroupVersion.WithResource("referencegrants")) {
		in.ReferenceGrants = gf.Gateway().V1beta1().ReferenceGrants().Informer()
	}
	for _, inf := range in.all() {
		if err := inf.SetTransform(trim); err != nil {
			return nil, err
		}
	}
	return in, nil
}

func (in *Informers) all() []cache.SharedIndexInformer {
	all := []cache.SharedIndexInformer{in.Namespaces, in.Nodes, in.Pods, in.Services, in.EndpointSlices,
		in.Gateways, in.HTTPRoutes, in.GRPCRoutes, in.AuthorizationPolicies, in.PeerAuthentications}
	if in.TrafficPolicies != nil {
		all = append(all, in.TrafficPolicies)
	}
	if in.ReferenceGrants != nil {
		all = append(all, in.ReferenceGrants)
	}
	return all
}

// served reports whether the apiserver serves r (a missing CRD is not an
// error: the resource is then simply absent).
func served(kc kubernetes.Interface, r schema.GroupVersionResource) bool {
	l, err := kc.Discovery().ServerResourcesForGroupVersion(r.GroupVersion().String())
	if err != nil {
		return false
	}
	for _, x := range l.APIResources {
		if x.Name == r.Resource {
			return true
		}
	}
	return false
}

// Start starts every informer; Shutdown stops them and waits.
func (in *Informers) Start(ctx context.Context) {
	in.kubeFactory.Start(ctx.Done())
	in.gatewayFactory.Start(ctx.Done())
	in.dynFactory.Start(ctx.Done())
}

// Shutdown waits for the informers to stop (cancel Start's ctx first).
func (in *Informers) Shutdown() {
	in.kubeFactory.Shutdown()
	in.gatewayFactory.Shutdown()
	in.dynFactory.Shutdown()
}

// HasSynced reports whether every informer has listed.
func (in *Informers) HasSynced() bool {
	for _, inf := range in.all() {
		if !inf.HasSynced() {
			return false
		}
	}
	return true
}

// trim drops managed fields everywhere, and from pods the container
// statuses and all of the spec the mesh does not read.
func trim(obj any) (any, error) {
	if m, ok := obj.(metav1.ObjectMetaAccessor); ok {
		m.GetObjectMeta().SetManagedFields(nil)
	}
	if u, ok := obj.(interface {
		SetManagedFields([]metav1.ManagedFieldsEntry)
	}); ok {
		u.SetManagedFields(nil)
	}
	if p, ok := obj.(*corev1.Pod); ok {
		var containers []corev1.Container
		for _, c := range p.Spec.Containers {
			if len(c.Ports) > 0 {
				containers = append(containers, corev1.Container{Name: c.Name, Ports: c.Ports})
			}
		}
		p.Spec = corev1.PodSpec{
			Containers:         containers,
			ServiceAccountName: p.Spec.ServiceAccountName,
			NodeName:           p.Spec.NodeName,
			HostNetwork:        p.Spec.HostNetwork,
			Hostname:           p.Spec.Hostname,
			Subdomain:          p.Spec.Subdomain,
		}
		p.Status.InitContainerStatuses = nil
		p.Status.ContainerStatuses = nil
		p.Status.EphemeralContainerStatuses = nil
	}
	return obj, nil
}
