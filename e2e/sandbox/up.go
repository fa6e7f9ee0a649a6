package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/cluster/daemon"
	"github.com/meshlite/meshlite/e2e/cluster/pki"
	"github.com/meshlite/meshlite/e2e/kubelet"
	"github.com/meshlite/meshlite/e2e/netlab"
)

// Cluster-wide addresses and names kubelet-lite passes to pods.
const (
	ClusterDNS    = "10.96.0.10" // instance 0; netlab.Plan.ClusterDNS in general
	ClusterDomain = "cluster.local"
	// KubeletPort is where each kubelet-lite serves the kubelet API.
	KubeletPort = 10250
)

// Options configure Up. Zero values take the defaults noted.
type Options struct {
	// StateDir holds everything the sandbox makes (StateDirFromEnv()).
	StateDir string
	// Nodes is the node count (2).
	Nodes int
	// RepoRoot is the meshlite checkout (RepoRoot()).
	RepoRoot string
	// KubeBinDir holds etcd and the control-plane binaries
	// (KubeBinDir(RepoRoot)).
	KubeBinDir string
	// CNIPluginDir holds the reference CNI plugins (CNIPluginDir(RepoRoot)).
	CNIPluginDir string
	// KubeletBin is run as `<KubeletBin> kubelet --config F` in each node
	// (<RepoRoot>/bin/sandbox).
	KubeletBin string
	// ImageBinDirs map image names to binaries (<RepoRoot>/bin).
	ImageBinDirs []string
	// Persistent marks the sandbox as one tests must not tear down.
	Persistent bool
	// ReadyTimeout bounds the wait for Nodes and the default service
	// account (2 minutes).
	ReadyTimeout time.Duration
	Log          *slog.Logger
}

func (o *Options) defaults() error {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.StateDir == "" {
		o.StateDir = StateDirFromEnv()
	}
	o.StateDir = absDir(o.StateDir)
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	if o.RepoRoot == "" {
		r, err := RepoRoot()
		if err != nil {
			return err
		}
		o.RepoRoot = r
	}
	if o.KubeBinDir == "" {
		o.KubeBinDir = KubeBinDir(o.RepoRoot)
	}
	if o.CNIPluginDir == "" {
		o.CNIPluginDir = CNIPluginDir(o.RepoRoot)
	}
	if o.KubeletBin == "" {
		o.KubeletBin = filepath.Join(o.RepoRoot, "bin", "sandbox")
	}
	if len(o.ImageBinDirs) == 0 {
		o.ImageBinDirs = []string{filepath.Join(o.RepoRoot, "bin")}
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 2 * time.Minute
	}
	return nil
}

// ErrNotRoot is returned when the sandbox is driven without root.
var ErrNotRoot = errors.New("the sandbox needs root (network namespaces, mounts, iptables)")

// checkPrereqs fails with what to run when something Up needs is missing.
func checkPrereqs(o *Options) error {
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	var errs []error
	if missing := cluster.MissingBinaries(o.KubeBinDir); len(missing) > 0 {
		errs = append(errs, fmt.Errorf("kube binaries %v missing in %s: run hack/kube-bins.sh", missing, o.KubeBinDir))
	}
	for _, p := range netlab.ReferencePlugins {
		if _, err := os.Stat(filepath.Join(o.CNIPluginDir, p)); err != nil {
			errs = append(errs, fmt.Errorf("CNI plugin %s missing in %s: run hack/cni-plugins.sh", p, o.CNIPluginDir))
			break
		}
	}
	if st, err := os.Stat(o.KubeletBin); err != nil || st.Mode()&0o111 == 0 {
		errs = append(errs, fmt.Errorf("kubelet binary %s missing: build it with go build -o bin/sandbox ./e2e/cmd/sandbox", o.KubeletBin))
	}
	return errors.Join(errs...)
}

// Up makes sure a healthy sandbox with opts.Nodes nodes runs and returns
// it. A healthy sandbox already running is reused (Up is then a no-op,
// except that Persistent can turn a test's sandbox into a kept one); an
// unhealthy or half-made one is torn down and made anew. The caller holds
// the change lock (LockChanges).
func Up(ctx context.Context, opts Options) (sb *Sandbox, reused bool, err error) {
	if err := opts.defaults(); err != nil {
		return nil, false, err
	}
	log := opts.Log
	if os.Geteuid() != 0 {
		return nil, false, ErrNotRoot
	}
	if st, err := loadState(opts.StateDir); err == nil {
		sb, err := open(opts.StateDir, st, log)
		if err == nil {
			err = sb.waitHealthy(ctx, 20*time.Second)
		}
		if err == nil {
			if st.Nodes != opts.Nodes {
				return nil, false, fmt.Errorf("a sandbox with %d nodes runs (state %s); run `sandbox down` first to get %d", st.Nodes, opts.StateDir, opts.Nodes)
			}
			if opts.Persistent && !st.Persistent {
				sb.State.Persistent = true
				if err := saveState(opts.StateDir, &sb.State); err != nil {
					return nil, false, err
				}
			}
			log.Info("sandbox already up", "nodes", st.Nodes, "kubeconfig", sb.Kubeconfig())
			return sb, true, nil
		}
		log.Warn("sandbox unhealthy; recreating", "err", err)
	}
	// Whatever is left of an earlier sandbox (a failed up, a crash) goes.
	if err := Down(ctx, opts.StateDir, log); err != nil {
		return nil, false, fmt.Errorf("clean up the previous sandbox: %w", err)
	}
	if err := checkPrereqs(&opts); err != nil {
		return nil, false, err
	}
	started := time.Now()
	sb, err = create(ctx, opts)
	if err != nil {
		return nil, false, fmt.Errorf("%w\n(logs in %s; `sandbox down` cleans up)", err, filepath.Join(opts.StateDir, "logs"))
	}
	sb.State.Ready = true
	sb.State.UpSeconds = time.Since(started).Seconds()
	if err := saveState(opts.StateDir, &sb.State); err != nil {
		return nil, false, err
	}
	log.Info("sandbox up", "nodes", opts.Nodes, "took", time.Since(started).Round(time.Millisecond), "kubeconfig", sb.Kubeconfig())
	return sb, false, nil
}

func create(ctx context.Context, o Options) (*Sandbox, error) {
	instance := InstanceFromEnv()
	plan := netlab.PlanFor(instance, o.Nodes)
	if err := plan.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	kubeletBin, err := filepath.Abs(o.KubeletBin)
	if err != nil {
		return nil, err
	}
	st := &State{
		Nodes:      o.Nodes,
		Prefix:     plan.Prefix,
		Instance:   instance,
		Persistent: o.Persistent,
		StartedAt:  time.Now().UTC(),
		RepoRoot:   o.RepoRoot,
		KubeBinDir: o.KubeBinDir,
		KubeletBin: kubeletBin,
	}
	// Saved first, so `down` after a failure here knows what to remove.
	if err := saveState(o.StateDir, st); err != nil {
		return nil, err
	}

	t0 := time.Now()
	net, err := netlab.Create(plan, o.Log)
	if err != nil {
		return nil, err
	}
	st.MadeNetnsMount = net.MadeNetnsMount
	if err := saveState(o.StateDir, st); err != nil {
		return nil, err
	}
	o.Log.Debug("network ready", "took", time.Since(t0))

	nodes := make([]pki.Node, o.Nodes)
	for i := range nodes {
		nodes[i] = pki.Node{Name: plan.NodeName(i), IP: ip(plan.NodeIP(i))}
	}
	ccfg := cluster.Config{
		Dir:         o.StateDir,
		BinDir:      o.KubeBinDir,
		HostIP:      plan.HostIP(),
		ServiceCIDR: plan.ServiceCIDR,
		ClusterCIDR: plan.PodSupernet,
		Nodes:       nodes,
		// Instance 0 keeps the default ports; others sit beside it.
		EtcdClientPort: etcdPort(instance, cluster.DefaultEtcdClientPort),
		EtcdPeerPort:   etcdPort(instance, cluster.DefaultEtcdPeerPort),
		Log:            o.Log,
	}
	layout, err := cluster.Start(ctx, ccfg)
	if err != nil {
		return nil, err
	}
	sb, err := open(o.StateDir, st, o.Log)
	if err != nil {
		return nil, err
	}

	// The kubernetes Service VIP (first address of the service range)
	// leads to the apiserver from every node and pod.
	vip := netip.AddrPortFrom(plan.ServiceCIDR.Masked().Addr().Next(), 443)
	apiserver := netip.AddrPortFrom(plan.HostIP(), cluster.DefaultAPIServerPort)
	for i := 0; i < o.Nodes; i++ {
		if err := netlab.ForwardVIP(plan.NodeNetns(i), vip, apiserver); err != nil {
			return nil, err
		}
		if err := sb.startNode(i, layout, ccfg.Server(), o); err != nil {
			return nil, err
		}
	}
	if err := sb.waitNodesReady(ctx, o.ReadyTimeout); err != nil {
		return nil, err
	}
	return sb, nil
}

// etcdPort moves a default etcd port out of the way of other instances.
func etcdPort(instance, def int) int {
	if instance == 0 {
		return def
	}
	return def + 1000 + 2*instance
}

// kubeletLog and kubeletPid are node i's kubelet log and pid files.
func (s *Sandbox) kubeletLog(i int) string {
	return filepath.Join(s.Layout.LogDir, "kubelet-"+s.Plan.NodeName(i)+".log")
}

func (s *Sandbox) kubeletPid(i int) string {
	return filepath.Join(s.Layout.RunDir, "kubelet-"+s.Plan.NodeName(i)+".pid")
}

// KubeletConfigPath is node i's kubelet-lite configuration file.
func (s *Sandbox) KubeletConfigPath(i int) string { return filepath.Join(s.NodeDir(i), "kubelet.json") }

func (s *Sandbox) startNode(i int, l cluster.Layout, server string, o Options) error {
	p := s.Plan
	name := p.NodeName(i)
	dir := s.NodeDir(i)
	root := s.NodeRoot(i)
	if err := root.Prepare(o.CNIPluginDir, p.PodCIDR(i)); err != nil {
		return fmt.Errorf("node %s: %w", name, err)
	}
	podsDir := filepath.Join(dir, "pods")
	if err := os.MkdirAll(podsDir, 0o755); err != nil {
		return fmt.Errorf("node %s: %w", name, err)
	}
	kc := filepath.Join(dir, "kubeconfig")
	if err := l.NodeKubeconfig(kc, server, name); err != nil {
		return fmt.Errorf("node %s: %w", name, err)
	}
	cert, key := l.PKI.KubeletServing(name)
	cfg := kubelet.Config{
		NodeName:      name,
		NodeIP:        p.NodeIP(i).String(),
		PodCIDR:       p.PodCIDR(i).String(),
		Kubeconfig:    kc,
		RootDir:       root.Dir,
		CNIConfDir:    root.CNIConfDir,
		CNIBinDir:     root.CNIBinDir,
		CNICacheDir:   root.CNICache,
		PodsDir:       podsDir,
		ImageBinDirs:  o.ImageBinDirs,
		ClusterDNS:    p.ClusterDNS().String(),
		NetnsPrefix:   s.PodNetnsName(""),
		ClusterDomain: ClusterDomain,
		ServingCert:   cert,
		ServingKey:    key,
		ClientCAFile:  l.PKI.CACert,
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return fmt.Errorf("node %s: encode kubelet config: %w", name, err)
	}
	if err := os.WriteFile(s.KubeletConfigPath(i), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("node %s: write kubelet config: %w", name, err)
	}
	pid, err := daemon.Start(daemon.Spec{
		Path:    s.State.KubeletBin,
		Args:    []string{"kubelet", "--config", s.KubeletConfigPath(i)},
		Dir:     dir,
		LogFile: s.kubeletLog(i),
		PidFile: s.kubeletPid(i),
		Netns:   netlab.NetnsPath(p.NodeNetns(i)),
	})
	if err != nil {
		return fmt.Errorf("node %s: start kubelet: %w", name, err)
	}
	s.log.Debug("kubelet started", "node", name, "pid", pid)
	return nil
}

// waitNodesReady waits for every Node to be Ready and for the default
// service account (without which pods are refused).
func (s *Sandbox) waitNodesReady(ctx context.Context, timeout time.Duration) error {
	var last error
	err := WaitFor(ctx, timeout, fmt.Sprintf("%d Ready nodes and the default service account", s.Plan.Nodes), func(ctx context.Context) (bool, error) {
		for i := 0; i < s.Plan.Nodes; i++ {
			if !daemon.AliveFromFile(s.kubeletPid(i)) {
				return false, fmt.Errorf("kubelet of %s exited; end of %s:\n%s", s.Plan.NodeName(i), s.kubeletLog(i), cluster.Tail(s.kubeletLog(i), 20))
			}
		}
		last = s.nodesReady(ctx)
		if last != nil {
			return false, nil
		}
		if _, err := s.cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			last = fmt.Errorf("default service account: %w", err)
			return false, nil
		}
		return true, nil
	})
	if err != nil && last != nil {
		return fmt.Errorf("%w: %v", err, last)
	}
	return err
}

// nodesReady checks that each of the plan's nodes exists and is Ready.
func (s *Sandbox) nodesReady(ctx context.Context) error {
	for i := 0; i < s.Plan.Nodes; i++ {
		n, err := s.cs.CoreV1().Nodes().Get(ctx, s.Plan.NodeName(i), metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("node %s: %w", s.Plan.NodeName(i), err)
		}
		if !nodeReady(n) {
			return fmt.Errorf("node %s not Ready", n.Name)
		}
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Healthy reports whether the sandbox is complete and working: `up`
// finished, every process runs, every namespace exists, the apiserver is
// ready and every Node is Ready.
func (s *Sandbox) Healthy(ctx context.Context) error {
	if !s.State.Ready {
		return errors.New("sandbox `up` did not finish")
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cluster.Healthy(ctx, s.Layout); err != nil {
		return err
	}
	for i := 0; i < s.Plan.Nodes; i++ {
		if !daemon.AliveFromFile(s.kubeletPid(i)) {
			return fmt.Errorf("kubelet of %s is not running", s.Plan.NodeName(i))
		}
		if _, err := os.Stat(netlab.NetnsPath(s.Plan.NodeNetns(i))); err != nil {
			return fmt.Errorf("node namespace: %w", err)
		}
	}
	return s.nodesReady(ctx)
}

// waitHealthy gives a sandbox whose processes all run up to patience to
// answer as healthy: under load (parallel test binaries, builds) the
// apiserver can be slow, and tearing down a sandbox others use is worse than
// waiting. A dead process or an unfinished up fails at once.
func (s *Sandbox) waitHealthy(ctx context.Context, patience time.Duration) error {
	deadline := time.Now().Add(patience)
	for {
		err := s.Healthy(ctx)
		if err == nil || !s.State.Ready || !s.processesAlive() || time.Now().After(deadline) {
			return err
		}
		s.log.Debug("sandbox not healthy yet", "err", err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Second):
		}
	}
}

func (s *Sandbox) processesAlive() bool {
	for _, c := range cluster.Components {
		if !daemon.AliveFromFile(s.Layout.PidFile(c)) {
			return false
		}
	}
	for i := 0; i < s.Plan.Nodes; i++ {
		if !daemon.AliveFromFile(s.kubeletPid(i)) {
			return false
		}
	}
	return true
}

func ip(a netip.Addr) net.IP { return net.IP(a.AsSlice()) }
