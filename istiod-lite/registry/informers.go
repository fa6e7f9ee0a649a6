package registry

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gatewayinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	policyv1alpha1 "github.com/meshlite/meshlite/istiod-lite/api/policy/v1alpha1"
	"github.com/meshlite/meshlite/istiod-lite/model"
)

// API is an optional API: a group of informers made only when the cluster
// serves the resources, at start or later, when their CRDs are installed.
type API int

// The optional APIs, in the order they are taken up when several appear at
// once (ReferenceGrants before the rest of the Gateway API, so what reads
// both finds the grants already there).
const (
	AuthorizationPolicies API = iota
	PeerAuthentications
	TrafficPolicies
	ReferenceGrants
	// GatewayAPI is Gateways, HTTPRoutes and GRPCRoutes
	// (gateway.networking.k8s.io/v1), taken up together.
	GatewayAPI
	numAPIs
)

var apiResources = [numAPIs][]schema.GroupVersionResource{
	AuthorizationPolicies: {model.AuthorizationPolicyGVR},
	PeerAuthentications:   {model.PeerAuthenticationGVR},
	TrafficPolicies:       {policyv1alpha1.Resource},
	ReferenceGrants:       {gatewayv1beta1.SchemeGroupVersion.WithResource("referencegrants")},
	GatewayAPI: {
		gatewayv1.SchemeGroupVersion.WithResource("gateways"),
		gatewayv1.SchemeGroupVersion.WithResource("httproutes"),
		gatewayv1.SchemeGroupVersion.WithResource("grpcroutes"),
	},
}

func (a API) String() string {
	switch a {
	case AuthorizationPolicies:
		return "AuthorizationPolicy"
	case PeerAuthentications:
		return "PeerAuthentication"
	case TrafficPolicies:
		return "TrafficPolicy"
	case ReferenceGrants:
		return "ReferenceGrant"
	case GatewayAPI:
		return "Gateway API"
	}
	return fmt.Sprintf("API(%d)", int(a))
}

// Resources lists what the API is made of.
func (a API) Resources() []schema.GroupVersionResource { return apiResources[a] }

// Informers are the shared informers the registry reads. Other parts (the
// CA's pod index) may share them; add indexers and handlers before Start.
//
// The informers of an optional API are nil while the cluster does not
// serve it. One the cluster serves at NewInformers is made there; one that
// appears later (its CRDs installed while istiod-lite runs) is made by the
// CRD watcher Start runs, which sets its fields and then calls every
// OnServed hook before starting it. After Start, read those fields only
// from a hook (the watcher's goroutine writes them).
type Informers struct {
	Namespaces, Nodes, Pods, Services, EndpointSlices cache.SharedIndexInformer
	// Gateways, HTTPRoutes and GRPCRoutes are gateway.networking.k8s.io/v1
	// objects (GatewayAPI); nil until the cluster serves them: there are
	// then no waypoints and no routes.
	Gateways, HTTPRoutes, GRPCRoutes cache.SharedIndexInformer
	// ReferenceGrants are gateway.networking.k8s.io/v1beta1 objects; nil
	// when the cluster does not serve that API: no route may then use a
	// Service of another namespace.
	ReferenceGrants cache.SharedIndexInformer
	// AuthorizationPolicies and PeerAuthentications deliver
	// security.istio.io/v1 objects as unstructured; nil while that API is
	// not served (there are then no such policies).
	AuthorizationPolicies, PeerAuthentications cache.SharedIndexInformer
	// TrafficPolicies deliver policy.meshlite.io/v1alpha1 objects as
	// unstructured; nil when the cluster does not serve that API (the CRD
	// is not installed): there are then no TrafficPolicies.
	TrafficPolicies cache.SharedIndexInformer

	kubeFactory    informers.SharedInformerFactory
	gatewayFactory gatewayinformers.SharedInformerFactory
	dynFactory     dynamicinformer.DynamicSharedInformerFactory
	dc             dynamic.Interface
	log            *slog.Logger

	mu     sync.Mutex
	active [numAPIs]bool
	hooks  []func(API) error
	// crds sees CustomResourceDefinitions (trimmed to what served needs);
	// poke wakes the watcher.
	crds cache.SharedIndexInformer
	poke chan struct{}
	wg   sync.WaitGroup
}

// NewInformers builds the informers (not started). Objects are trimmed of
// what nothing here reads, which keeps a large cluster's memory down. An
// optional API's informers are made only when the apiserver serves it, so
// a cluster without some CRDs (the Gateway API's, often) still syncs.
func NewInformers(kc kubernetes.Interface, gc gatewayclient.Interface, dc dynamic.Interface, resync time.Duration, log *slog.Logger) (*Informers, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	kf := informers.NewSharedInformerFactory(kc, resync)
	gf := gatewayinformers.NewSharedInformerFactory(gc, resync)
	df := dynamicinformer.NewDynamicSharedInformerFactory(dc, resync)
	in := &Informers{
		Namespaces:     kf.Core().V1().Namespaces().Informer(),
		Nodes:          kf.Core().V1().Nodes().Informer(),
		Pods:           kf.Core().V1().Pods().Informer(),
		Services:       kf.Core().V1().Services().Informer(),
		EndpointSlices: kf.Discovery().V1().EndpointSlices().Informer(),
		kubeFactory:    kf,
		gatewayFactory: gf,
		dynFactory:     df,
		dc:             dc,
		log:            log,
		poke:           make(chan struct{}, 1),
	}
	for _, inf := range in.all() {
		if err := inf.SetTransform(trim); err != nil {
			return nil, err
		}
	}
	for a := range numAPIs {
		var missing []string
		for _, r := range a.Resources() {
			if !served(kc, r) {
				missing = append(missing, r.Resource+"."+r.Group+"/"+r.Version)
			}
		}
		if len(missing) > 0 {
			log.Info("API not served; taken up when its CRDs are installed", "api", a.String(), "missing", missing)
			continue
		}
		if _, err := in.make(a); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// make creates the informers of a (not started), sets their fields and
// marks a active.
func (in *Informers) make(a API) ([]cache.SharedIndexInformer, error) {
	gw := in.gatewayFactory.Gateway()
	var made []cache.SharedIndexInformer
	switch a {
	case AuthorizationPolicies, PeerAuthentications, TrafficPolicies:
		made = append(made, in.dynFactory.ForResource(a.Resources()[0]).Informer())
	case ReferenceGrants:
		made = append(made, gw.V1beta1().ReferenceGrants().Informer())
	case GatewayAPI:
		made = append(made, gw.V1().Gateways().Informer(), gw.V1().HTTPRoutes().Informer(), gw.V1().GRPCRoutes().Informer())
	}
	for _, inf := range made {
		if err := inf.SetTransform(trim); err != nil {
			return nil, fmt.Errorf("informers of %s: %w", a, err)
		}
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	switch a {
	case AuthorizationPolicies:
		in.AuthorizationPolicies = made[0]
	case PeerAuthentications:
		in.PeerAuthentications = made[0]
	case TrafficPolicies:
		in.TrafficPolicies = made[0]
	case ReferenceGrants:
		in.ReferenceGrants = made[0]
	case GatewayAPI:
		in.Gateways, in.HTTPRoutes, in.GRPCRoutes = made[0], made[1], made[2]
	}
	in.active[a] = true
	return made, nil
}

// Served reports whether the informers of a exist (the API is served).
func (in *Informers) Served(a API) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.active[a]
}

// OnServed registers f (before Start) to be called, on the CRD watcher's
// goroutine, when an optional API not served at NewInformers appears:
// after its informer fields are set and before they start, so f may add
// handlers and indexers. The informers' own initial lists then deliver
// every existing object as an add. An error from f is logged.
func (in *Informers) OnServed(f func(API) error) {
	in.mu.Lock()
	in.hooks = append(in.hooks, f)
	in.mu.Unlock()
}

func (in *Informers) all() []cache.SharedIndexInformer {
	in.mu.Lock()
	defer in.mu.Unlock()
	all := []cache.SharedIndexInformer{in.Namespaces, in.Nodes, in.Pods, in.Services, in.EndpointSlices}
	for _, inf := range []cache.SharedIndexInformer{in.Gateways, in.HTTPRoutes, in.GRPCRoutes, in.AuthorizationPolicies,
		in.PeerAuthentications, in.TrafficPolicies, in.ReferenceGrants} {
		if inf != nil {
			all = append(all, inf)
		}
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

// Start starts every informer, and the CRD watcher that takes up an
// optional API when its CRDs are installed; Shutdown stops them and waits.
func (in *Informers) Start(ctx context.Context) {
	in.kubeFactory.Start(ctx.Done())
	in.gatewayFactory.Start(ctx.Done())
	in.dynFactory.Start(ctx.Done())
	in.startCRDWatch(ctx)
}

// Shutdown waits for the informers and the CRD watcher to stop (cancel
// Start's ctx first).
func (in *Informers) Shutdown() {
	in.wg.Wait()
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
