package kubelet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
)

// Main is the body of `sandbox kubelet --config <path>`: it runs kubelet-lite
// for one node until ctx ends, then stops the node's pods and removes their
// network namespaces.
func Main(ctx context.Context, configPath string) error {
	cfg, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	log := slog.Default().With("component", "kubelet", "node", cfg.NodeName)
	// client-go and the streaming server log through klog.
	klog.SetSlogLogger(log)
	k, err := New(cfg, log)
	if err != nil {
		return err
	}
	return k.Run(ctx)
}

// Kubelet is kubelet-lite for one node.
type Kubelet struct {
	cfg    *Config
	log    *slog.Logger
	client kubernetes.Interface
	r      *runner

	podLister corelisters.PodLister
	recorder  record.EventRecorder

	mu      sync.Mutex
	workers map[types.UID]*podWorker
	// finished are pods whose worker is done; late informer events about
	// them must not start them again.
	finished map[types.UID]bool
	stopping bool // set once ctx ends: no new pod workers
	wg       sync.WaitGroup
	ctx      context.Context
}

// New builds a Kubelet from its config; Run starts it.
func New(cfg *Config, log *slog.Logger) (*Kubelet, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", cfg.Kubeconfig, err)
	}
	rc.UserAgent = "kubelet-lite/" + cfg.NodeName
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("create API client: %w", err)
	}
	k := &Kubelet{cfg: cfg, log: log, client: client, workers: map[types.UID]*podWorker{}, finished: map[types.UID]bool{}}
	k.r = newRunner(cfg, log, &apiClient{c: client}, []string{"/proc/self/exe", InitVerb})
	k.r.apiHost, k.r.apiPort, err = apiServerHostPort(rc)
	if err != nil {
		return nil, err
	}
	k.r.event = k.event
	return k, nil
}

// apiServerHostPort is where pods reach the API server: the address the
// kubelet itself uses, which is routable from the node (the sandbox has no
// kube-proxy to serve the kubernetes Service VIP).
func apiServerHostPort(rc *rest.Config) (string, string, error) {
	u, err := url.Parse(rc.Host)
	if err != nil || u.Host == "" {
		return "", "", fmt.Errorf("API server address %q is not a URL", rc.Host)
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "443"
	}
	if net.ParseIP(host) == nil {
		return "", "", fmt.Errorf("API server address %q: pods need an IP address, not a name", rc.Host)
	}
	return host, port, nil
}

// Run registers the node, serves the kubelet API, runs the pods bound to the
// node and keeps the node Ready until ctx ends. On return all its pods are
// stopped and their netns removed.
func (k *Kubelet) Run(ctx context.Context) error {
	defer k.r.close()
	k.ctx = ctx
	if err := k.r.cleanupLeftovers(ctx); err != nil {
		return err
	}
	if err := ensureNetnsDir(); err != nil {
		return err
	}

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: k.client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	k.recorder = broadcaster.NewRecorder(scheme.Scheme, v1.EventSource{Component: "kubelet", Host: k.cfg.NodeName})

	if err := k.registerNode(ctx); err != nil {
		return err
	}
	srv, err := k.startAPIServer(ctx)
	if err != nil {
		return err
	}

	factory := informers.NewSharedInformerFactoryWithOptions(k.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = "spec.nodeName=" + k.cfg.NodeName
		}))
	podInformer := factory.Core().V1().Pods()
	k.podLister = podInformer.Lister()
	if _, err := podInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { k.podChanged(obj) },
		UpdateFunc: func(_, obj any) { k.podChanged(obj) },
		DeleteFunc: func(obj any) { k.podDeleted(obj) },
	}); err != nil {
		return fmt.Errorf("watch pods: %w", err)
	}
	informerCtx, stopInformers := context.WithCancel(context.WithoutCancel(ctx))
	factory.Start(informerCtx.Done())

	var hb sync.WaitGroup
	hb.Add(1)
	go func() { defer hb.Done(); k.heartbeat(ctx) }()
	k.log.Info("kubelet running", "nodeIP", k.cfg.NodeIP, "podCIDR", k.cfg.PodCIDR)

	<-ctx.Done()
	k.log.Info("kubelet stopping: stopping pods")
	k.mu.Lock()
	k.stopping = true
	k.mu.Unlock()
	// Pod workers see ctx end and stop their pods; wait for them before
	// the informers go, so none is started meanwhile.
	k.wg.Wait()
	stopInformers()
	factory.Shutdown()
	hb.Wait()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx)
	k.log.Info("kubelet stopped")
	return nil
}

func (k *Kubelet) podChanged(obj any) {
	pod, ok := obj.(*v1.Pod)
	if !ok || pod.Spec.NodeName != k.cfg.NodeName {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stopping || k.finished[pod.UID] {
		return
	}
	if w, ok := k.workers[pod.UID]; ok {
		w.p.update(pod)
		w.p.notify()
		return
	}
	w := newPodWorker(k, pod)
	k.workers[pod.UID] = w
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		w.run(k.ctx)
		k.mu.Lock()
		delete(k.workers, pod.UID)
		k.mu.Unlock()
	}()
}

func (k *Kubelet) podDeleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	pod, ok := obj.(*v1.Pod)
	if !ok {
		return
	}
	k.mu.Lock()
	w := k.workers[pod.UID]
	k.mu.Unlock()
	if w != nil {
		w.gone.Store(true)
		w.p.notify()
	}
}

func (k *Kubelet) event(pod *v1.Pod, eventType, reason, msg string) {
	if k.recorder != nil {
		k.recorder.Event(pod, eventType, reason, msg)
	}
}

// apiClient is the runner's window to the API server.
type apiClient struct{ c kubernetes.Interface }

func (a *apiClient) configMap(ctx context.Context, ns, name string) (*v1.ConfigMap, error) {
	return a.c.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
}

func (a *apiClient) secret(ctx context.Context, ns, name string) (*v1.Secret, error) {
	return a.c.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
}

func (a *apiClient) token(ctx context.Context, pod *v1.Pod, audience string, exp int64) (string, time.Time, error) {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		ExpirationSeconds: &exp,
		BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if audience != "" {
		req.Spec.Audiences = []string{audience}
	}
	res, err := a.c.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", time.Time{}, fmt.Errorf("token for %s/%s: %w", pod.Namespace, sa, err)
	}
	if res.Status.Token == "" {
		return "", time.Time{}, errors.New("token request returned no token")
	}
	return res.Status.Token, res.Status.ExpirationTimestamp.Time, nil
}
