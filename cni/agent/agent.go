package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshlite/meshlite/cni/install"
	"github.com/meshlite/meshlite/cni/netnsfind"
	"github.com/meshlite/meshlite/cni/plugin"
	"github.com/meshlite/meshlite/cni/rules"
	"github.com/meshlite/meshlite/cni/zds"
)

// Config is the agent's configuration; paths are as the agent's container
// sees them (hostPath mounts of the node's directories).
type Config struct {
	// NodeName is the node the agent serves (downward API spec.nodeName).
	NodeName string
	// PodNamespace and PodName name the agent's own pod, whose owning
	// DaemonSet the agent watches to tell an uninstall (DaemonSet deleted)
	// from a restart. Empty: never uninstall on exit.
	PodNamespace, PodName string

	// CNIConfDir and CNIBinDir are the node's net.d and CNI bin dir.
	CNIConfDir string
	CNIBinDir  string
	// PluginBinary is the mesh-cni binary to install.
	PluginBinary string
	// HostRoot is where the node's root is for the runtime that runs the
	// plugin, relative to the agent's view: "" on a real node (hostPath
	// /var/run/x is /var/run/x for both); the sandbox gives each node its
	// own root. It prefixes the socket path written into the conflist.
	HostRoot string
	// SocketPath is the plugin socket (plugin.DefaultAgentSocket).
	SocketPath string
	// ZDSSocket is the ZDS socket (zds.DefaultSocket).
	ZDSSocket string
	// AddTimeout is how long a plugin ADD waits for ztunnel.
	AddTimeout time.Duration
	// ExcludeNamespaces are never captured (and skipped by the plugin).
	ExcludeNamespaces []string
	// CaptureNamespaces, when set, limits the mesh to these namespaces
	// (a staged rollout, or tests sharing a cluster); the plugin lets pods
	// elsewhere start without asking.
	CaptureNamespaces []string
	// ReadyAddr serves /readyz, MetricsAddr /metrics ("" disables).
	ReadyAddr, MetricsAddr string
	// Rules tunes the rule set (probe SNAT address, DNS capture).
	Rules rules.Config
	// Workers reconcile pods in parallel.
	Workers int
	// VerifyInterval is how often every enrolled pod's rules are checked
	// and repaired if someone changed them (0: a minute).
	VerifyInterval time.Duration
}

func (c *Config) defaults() {
	if c.SocketPath == "" {
		c.SocketPath = plugin.DefaultAgentSocket
	}
	if c.ZDSSocket == "" {
		c.ZDSSocket = zds.DefaultSocket
	}
	if c.AddTimeout == 0 {
		c.AddTimeout = plugin.DefaultAddTimeout
	}
	if c.Workers == 0 {
		c.Workers = 2
	}
	if c.VerifyInterval == 0 {
		c.VerifyInterval = time.Minute
	}
}

// Agent is the running node agent.
type Agent struct {
	cfg  Config
	log  *slog.Logger
	kube kubernetes.Interface

	podRules  *rules.Pod
	hostRules *rules.Host
	zds       *zds.Server
	inst      *install.Installer
	finder    *netnsfind.Finder
	metrics   *metrics

	nsInformer, podInformer cache.SharedIndexInformer
	nsLister                listersv1.NamespaceLister
	podLister               listersv1.PodLister
	queue                   workqueue.TypedRateLimitingInterface[string]

	locks keyLocks
	mu    sync.Mutex
	pods  map[string]*podState // by pod uid
	// kept: pods (by key, to their uid) that were redirected before this
	// agent started and that it could not re-enroll before the first ZDS
	// snapshot; ztunnel is told to keep serving them (zds.Server.Keep)
	// until a retry enrolls them or they go.
	kept map[string]string

	// owner is what the agent saw of its DaemonSet (uninstall or restart).
	owner ownerWatch

	synced    atomic.Bool
	listening atomic.Bool
	pluginLn  *net.UnixListener
}

// New builds the agent. It checks the iptables flavour and renders the
// rules, but changes nothing on the node until Run.
func New(cfg Config, kube kubernetes.Interface, log *slog.Logger) (*Agent, error) {
	cfg.defaults()
	if cfg.NodeName == "" {
		return nil, errors.New("agent: node name is required (NODE_NAME from the downward API)")
	}
	tables, err := rules.NewTables()
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	podRules, err := rules.NewPod(tables, cfg.Rules)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	hostRules, err := rules.NewHost(tables, cfg.Rules)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	log = log.With("node", cfg.NodeName)
	inst, err := newInstaller(cfg, log)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: log, kube: kube,
		podRules: podRules, hostRules: hostRules,
		zds:    zds.NewServer(cfg.ZDSSocket, log),
		inst:   inst,
		finder: netnsfind.New(log),
		pods:   map[string]*podState{},
		kept:   map[string]string{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "pods"}),
	}
	a.metrics = newMetrics(a)
	nsFactory := informers.NewSharedInformerFactory(kube, 0)
	podFactory := informers.NewSharedInformerFactoryWithOptions(kube, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
		}))
	a.nsInformer = nsFactory.Core().V1().Namespaces().Informer()
	a.nsLister = nsFactory.Core().V1().Namespaces().Lister()
	a.podInformer = podFactory.Core().V1().Pods().Informer()
	a.podLister = podFactory.Core().V1().Pods().Lister()
	if _, err := a.podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    a.enqueueObj,
		UpdateFunc: func(_, n any) { a.enqueueObj(n) },
		DeleteFunc: a.enqueueObj,
	}); err != nil {
		return nil, err
	}
	if _, err := a.nsInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    a.enqueueNamespace,
		UpdateFunc: func(o, n any) { a.namespaceChanged(o, n) },
		DeleteFunc: a.enqueueNamespace,
	}); err != nil {
		return nil, err
	}
	return a, nil
}

// Run starts everything and blocks until ctx ends; then it stops, and
// uninstalls itself if its DaemonSet is gone (seen deleted while it ran, or
// found deleted now).
func (a *Agent) Run(ctx context.Context) error {
	a.log.Info("CNI agent starting", "zds", a.cfg.ZDSSocket, "pluginSocket", a.cfg.SocketPath,
		"confDir", a.cfg.CNIConfDir, "binDir", a.cfg.CNIBinDir)
	if err := a.hostRules.Ensure(); err != nil {
		return fmt.Errorf("node probe SNAT: %w", err)
	}
	if err := a.zds.Listen(); err != nil {
		return err
	}
	if err := a.listenPlugin(); err != nil {
		return err
	}

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	// The DaemonSet watch runs until the shutdown decision is made, past
	// runCtx.
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	if a.cfg.PodName != "" && a.cfg.PodNamespace != "" {
		go a.watchOwner(runCtx, watchCtx)
	}
	var wg sync.WaitGroup
	var failOnce sync.Once
	var failed error // the first part that stopped on its own
	goRun := func(name string, fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(runCtx); err != nil {
				a.log.Error("agent part stopped; shutting down", "part", name, "err", err)
				failOnce.Do(func() { failed = fmt.Errorf("%s: %w", name, err) })
				stop()
			}
		}()
	}
	goRun("http", a.serveHTTP)
	zdsSynced := make(chan struct{})
	a.zds.Synced = zdsSynced
	goRun("zds", a.zds.Run)
	goRun("plugin", a.servePlugin)
	go a.nsInformer.Run(runCtx.Done())
	go a.podInformer.Run(runCtx.Done())
	if !cache.WaitForCacheSync(runCtx.Done(), a.nsInformer.HasSynced, a.podInformer.HasSynced) {
		stop()
		wg.Wait()
		a.queue.ShutDown()
		if failed != nil {
			return failed
		}
		return fmt.Errorf("informers did not sync: %w", ctx.Err())
	}
	a.synced.Store(true)
	a.log.Info("informers synced")
	// Re-find the node's enrolled pods before ztunnel gets a snapshot
	// (see zds.Server.Synced). The plugin server already runs; the per-pod
	// locks order it with this pass, and the workers start after.
	a.reconcileAll(runCtx)
	close(zdsSynced)

	// Chain only once the plugin can reach us: from here pods on this node
	// wait for the agent's word.
	if err := a.inst.Install(); err != nil {
		a.log.Warn("CNI plugin not chained yet; watching for a network config", "err", err)
	}
	goRun("install", a.inst.Run)
	for i := 0; i < a.cfg.Workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a.processNext(runCtx) {
			}
		}()
	}
	goRun("held-watch", a.watchHeld)
	goRun("ipset-gc", a.gcProbeSet)
	goRun("verify", a.verifyRules)

	<-runCtx.Done()
	a.log.Info("CNI agent stopping")
	a.closePlugin()
	a.queue.ShutDown()
	wg.Wait()

	cctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	uninstall := a.shouldUninstall(cctx)
	stopWatch()
	if uninstall {
		if err := a.Uninstall(cctx); err != nil {
			a.log.Error("uninstall incomplete", "err", err)
			return err
		}
	} else {
		a.log.Info("leaving the plugin chained and pods redirected: enrolled pods stay captured (fail closed) until the agent is back")
	}
	a.closeAll()
	if failed != nil {
		return failed
	}
	return ctx.Err()
}

func (a *Agent) closeAll() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for uid, st := range a.pods {
		st.close()
		delete(a.pods, uid)
	}
}

// Uninstall removes the plugin from the node's CNI config and bin dir,
// takes every pod it captured out of the mesh (rules, ZDS, annotation) and
// removes the node-side rules.
func (a *Agent) Uninstall(ctx context.Context) error {
	var errs []error
	if err := a.inst.Uninstall(); err != nil {
		errs = append(errs, err)
	}
	a.mu.Lock()
	states := make([]*podState, 0, len(a.pods))
	for _, st := range a.pods {
		states = append(states, st)
	}
	a.mu.Unlock()
	for _, st := range states {
		unlock := a.locks.lock(st.key)
		if err := a.unenroll(ctx, st, true); err != nil {
			errs = append(errs, err)
		}
		unlock()
	}
	if err := a.hostRules.Remove(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	a.log.Info("uninstalled: plugin unchained, pods released, node rules removed", "pods", len(states))
	return nil
}

// Ready says whether the agent can serve the plugin, and if not why.
func (a *Agent) Ready() (bool, string) {
	switch {
	case !a.listening.Load():
		return false, "plugin socket not listening"
	case !a.synced.Load():
		return false, "informers not synced"
	case a.inst.Chained() == "":
		return false, "plugin not chained into the node's CNI config"
	}
	return true, "ok"
}

func isNotFound(err error) bool { return apierrors.IsNotFound(err) }

// hostNetwork pods are never captured (they have no netns of their own).
func hostNetwork(p *v1.Pod) bool { return p.Spec.HostNetwork }

// UninstallNode undoes the node-side install without the API server: the
// plugin's conflist entries, its binary and the node's probe SNAT rules.
// Pods keep their rules (`cni-agent uninstall`, for a node being retired).
func UninstallNode(cfg Config, log *slog.Logger) error {
	cfg.defaults()
	tables, err := rules.NewTables()
	if err != nil {
		return err
	}
	host, err := rules.NewHost(tables, cfg.Rules)
	if err != nil {
		return err
	}
	inst, err := newInstaller(cfg, log)
	if err != nil {
		return err
	}
	return errors.Join(inst.Uninstall(), host.Remove())
}

func newInstaller(cfg Config, log *slog.Logger) (*install.Installer, error) {
	entry := map[string]any{
		"type":         plugin.Type,
		"agent_socket": filepath.Join(cfg.HostRoot, cfg.SocketPath),
		"add_timeout":  cfg.AddTimeout.String(),
	}
	if len(cfg.ExcludeNamespaces) > 0 {
		entry["exclude_namespaces"] = cfg.ExcludeNamespaces
	}
	if len(cfg.CaptureNamespaces) > 0 {
		entry["capture_namespaces"] = cfg.CaptureNamespaces
	}
	return install.New(install.Config{
		ConfDir: cfg.CNIConfDir, BinDir: cfg.CNIBinDir, PluginBinary: cfg.PluginBinary,
		PluginName: plugin.Type, Entry: entry,
	}, log)
}
