package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/e2e/cluster/daemon"
	"github.com/meshlite/meshlite/e2e/cluster/pki"
)

// KubeVersion is the Kubernetes release the sandbox runs; it must match
// tools/kube/go.mod (a test checks).
const KubeVersion = "v1.34.4"

// Default ports of the control plane. etcd stays on loopback with ports
// away from its defaults, so a developer's own etcd does not clash.
const (
	DefaultEtcdClientPort = 23790
	DefaultEtcdPeerPort   = 23800
	DefaultAPIServerPort  = 6443
)

// Component names; each is a binary in the bin dir, a log file and a pid
// file.
const (
	Etcd              = "etcd"
	APIServer         = "kube-apiserver"
	ControllerManager = "kube-controller-manager"
	Scheduler         = "kube-scheduler"
)

// Components in start order.
var Components = []string{Etcd, APIServer, ControllerManager, Scheduler}

// Config describes a control plane.
type Config struct {
	// Dir holds everything: pki/, etcd/, logs/, run/ and kubeconfigs.
	Dir string
	// BinDir holds the four binaries (hack/kube-bins.sh builds them).
	BinDir string
	// HostIP is where the apiserver listens and what it advertises: the
	// host's underlay address, reachable from the host and every node.
	HostIP      netip.Addr
	ServiceCIDR netip.Prefix
	ClusterCIDR netip.Prefix
	// Nodes get kubelet client and serving certificates.
	Nodes []pki.Node
	Log   *slog.Logger

	// Ports; zero means the default.
	APIServerPort, EtcdClientPort, EtcdPeerPort int

	// SkipCRDGroups are API groups (GatewayAPIGroup, ...) whose CRDs Start
	// does not install, for tests of a cluster without them;
	// InstallCRDGroups adds them later. Empty: all of them.
	SkipCRDGroups []string
}

func (c *Config) defaults() {
	if c.APIServerPort == 0 {
		c.APIServerPort = DefaultAPIServerPort
	}
	if c.EtcdClientPort == 0 {
		c.EtcdClientPort = DefaultEtcdClientPort
	}
	if c.EtcdPeerPort == 0 {
		c.EtcdPeerPort = DefaultEtcdPeerPort
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// Server is the apiserver's URL.
func (c Config) Server() string {
	port := c.APIServerPort
	if port == 0 {
		port = DefaultAPIServerPort
	}
	return "https://" + netip.AddrPortFrom(c.HostIP, uint16(port)).String()
}

// Layout is where a control plane keeps its files.
type Layout struct {
	Dir, LogDir, RunDir, EtcdDir string
	PKI                          pki.Paths
	// AdminKubeconfig has system:masters rights.
	AdminKubeconfig   string
	ControllerManager string // kubeconfig
	Scheduler         string // kubeconfig
}

// LayoutOf returns the file layout under dir.
func LayoutOf(dir string) Layout {
	return Layout{
		Dir:               dir,
		LogDir:            filepath.Join(dir, "logs"),
		RunDir:            filepath.Join(dir, "run"),
		EtcdDir:           filepath.Join(dir, "etcd"),
		PKI:               pki.Layout(filepath.Join(dir, "pki")),
		AdminKubeconfig:   filepath.Join(dir, "kubeconfig"),
		ControllerManager: filepath.Join(dir, "controller-manager.kubeconfig"),
		Scheduler:         filepath.Join(dir, "scheduler.kubeconfig"),
	}
}

// LogFile is a component's log file.
func (l Layout) LogFile(component string) string {
	return filepath.Join(l.LogDir, component+".log")
}

// PidFile is a component's pid file.
func (l Layout) PidFile(component string) string {
	return filepath.Join(l.RunDir, component+".pid")
}

// MissingBinaries lists the control-plane binaries absent from binDir.
func MissingBinaries(binDir string) []string {
	var missing []string
	for _, c := range Components {
		if st, err := os.Stat(filepath.Join(binDir, c)); err != nil || st.Mode()&0o111 == 0 {
			missing = append(missing, c)
		}
	}
	return missing
}

// Start issues the PKI, starts the four components and waits until the
// apiserver is ready and the CRDs are installed. It returns the layout of
// what it made. On error, components it started keep running: the caller
// stops them with Stop (it knows better whether to keep logs).
func Start(ctx context.Context, cfg Config) (Layout, error) {
	cfg.defaults()
	l := LayoutOf(cfg.Dir)
	log := cfg.Log
	if missing := MissingBinaries(cfg.BinDir); len(missing) > 0 {
		return l, fmt.Errorf("control-plane binaries %v missing in %s: run hack/kube-bins.sh", missing, cfg.BinDir)
	}
	for _, d := range []string{l.LogDir, l.RunDir, l.EtcdDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return l, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if err := portsFree(cfg); err != nil {
		return l, err
	}
	started := time.Now()
	if err := issue(cfg, l); err != nil {
		return l, err
	}
	log.Debug("PKI issued", "dir", l.PKI.Dir, "took", time.Since(started))

	if err := startEtcd(cfg, l); err != nil {
		return l, err
	}
	if err := waitEtcd(ctx, cfg, l); err != nil {
		return l, err
	}
	log.Debug("etcd ready", "took", time.Since(started))

	if err := start(cfg, l, APIServer, apiserverArgs(cfg, l)); err != nil {
		return l, err
	}
	cs, err := adminClient(l)
	if err != nil {
		return l, err
	}
	if err := waitReady(ctx, l, cs); err != nil {
		return l, err
	}
	log.Debug("kube-apiserver ready", "took", time.Since(started))

	// The controller manager and scheduler connect on their own; start them
	// while the CRDs go in.
	if err := start(cfg, l, ControllerManager, controllerManagerArgs(cfg, l)); err != nil {
		return l, err
	}
	if err := start(cfg, l, Scheduler, schedulerArgs(l)); err != nil {
		return l, err
	}
	rc, err := RESTConfig(l.AdminKubeconfig)
	if err != nil {
		return l, err
	}
	if err := installCRDs(ctx, rc, log, func(g string) bool { return !slices.Contains(cfg.SkipCRDGroups, g) }); err != nil {
		return l, err
	}
	log.Info("control plane ready", "server", cfg.Server(), "took", time.Since(started).Round(time.Millisecond))
	return l, nil
}

func issue(cfg Config, l Layout) error {
	host := net.IP(cfg.HostIP.AsSlice())
	kubeSvc := net.IP(cfg.ServiceCIDR.Masked().Addr().Next().AsSlice())
	_, err := pki.Generate(l.PKI.Dir, pki.Request{
		APIServerIPs: []net.IP{net.ParseIP("127.0.0.1"), host, kubeSvc},
		APIServerDNS: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		Nodes: cfg.Nodes,
	})
	if err != nil {
		return err
	}
	server := cfg.Server()
	p := l.PKI
	for _, k := range []struct{ path, cert, key string }{
		{l.AdminKubeconfig, p.AdminCert, p.AdminKey},
		{l.ControllerManager, p.ControllerManagerCert, p.ControllerManagerKey},
		{l.Scheduler, p.SchedulerCert, p.SchedulerKey},
	} {
		if err := WriteKubeconfig(k.path, server, p.CACert, k.cert, k.key); err != nil {
			return err
		}
	}
	return nil
}

// NodeKubeconfig writes the kubeconfig node's kubelet uses to reach server.
func (l Layout) NodeKubeconfig(path, server, node string) error {
	cert, key := l.PKI.KubeletClient(node)
	return WriteKubeconfig(path, server, l.PKI.CACert, cert, key)
}

func start(cfg Config, l Layout, name string, args []string) error {
	pid, err := daemon.Start(daemon.Spec{
		Path:    filepath.Join(cfg.BinDir, name),
		Args:    args,
		LogFile: l.LogFile(name),
		PidFile: l.PidFile(name),
	})
	if err != nil {
		return err
	}
	cfg.Log.Debug("started", "component", name, "pid", pid)
	return nil
}

func startEtcd(cfg Config, l Layout) error {
	client := fmt.Sprintf("http://127.0.0.1:%d", cfg.EtcdClientPort)
	peer := fmt.Sprintf("http://127.0.0.1:%d", cfg.EtcdPeerPort)
	return start(cfg, l, Etcd, []string{
		"--name=sandbox",
		"--data-dir=" + l.EtcdDir,
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=sandbox=" + peer,
		// A test cluster: losing the last writes on a host crash is fine,
		// fsync latency on every write is not.
		"--unsafe-no-fsync",
		"--log-level=warn",
	})
}

func apiserverArgs(cfg Config, l Layout) []string {
	p := l.PKI
	// The advertised address is routable from every node, so the
	// kubernetes Service's endpoints can be real; the apiserver refuses a
	// loopback one (used by tests of this package alone).
	reconciler := "lease"
	if cfg.HostIP.IsLoopback() {
		reconciler = "none"
	}
	return []string{
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", cfg.EtcdClientPort),
		"--bind-address=" + cfg.HostIP.String(),
		"--advertise-address=" + cfg.HostIP.String(),
		fmt.Sprintf("--secure-port=%d", cfg.APIServerPort),
		"--tls-cert-file=" + p.APIServerCert,
		"--tls-private-key-file=" + p.APIServerKey,
		"--tls-min-version=VersionTLS13",
		"--client-ca-file=" + p.CACert,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--service-cluster-ip-range=" + cfg.ServiceCIDR.String(),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.ServiceAccountPub,
		"--service-account-signing-key-file=" + p.ServiceAccountKey,
		"--kubelet-client-certificate=" + p.APIServerKubeletCert,
		"--kubelet-client-key=" + p.APIServerKubeletKey,
		"--kubelet-certificate-authority=" + p.CACert,
		"--kubelet-preferred-address-types=InternalIP",
		"--endpoint-reconciler-type=" + reconciler,
		"--profiling=false",
		"--v=1",
	}
}

func controllerManagerArgs(cfg Config, l Layout) []string {
	p := l.PKI
	return []string{
		"--kubeconfig=" + l.ControllerManager,
		"--leader-elect=false",
		"--secure-port=0",
		"--controllers=*",
		"--use-service-account-credentials=true",
		"--root-ca-file=" + p.CACert,
		"--service-account-private-key-file=" + p.ServiceAccountKey,
		"--cluster-signing-cert-file=" + p.CACert,
		"--cluster-signing-key-file=" + p.CAKey,
		// Nodes bring their pod CIDR (kubelet-lite's config), as with a
		// CNI that does its own IPAM.
		"--allocate-node-cidrs=false",
		"--cluster-cidr=" + cfg.ClusterCIDR.String(),
		"--service-cluster-ip-range=" + cfg.ServiceCIDR.String(),
		"--profiling=false",
		"--v=1",
	}
}

func schedulerArgs(l Layout) []string {
	return []string{
		"--kubeconfig=" + l.Scheduler,
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false",
		"--v=1",
	}
}

// portsFree fails early with a clear message when something else holds a
// control-plane port.
func portsFree(cfg Config) error {
	addrs := []string{
		fmt.Sprintf("127.0.0.1:%d", cfg.EtcdClientPort),
		fmt.Sprintf("127.0.0.1:%d", cfg.EtcdPeerPort),
		netip.AddrPortFrom(cfg.HostIP, uint16(cfg.APIServerPort)).String(),
	}
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("control-plane address %s is taken (another sandbox or etcd/apiserver running?): %w", a, err)
		}
		ln.Close()
	}
	return nil
}

func waitEtcd(ctx context.Context, cfg Config, l Layout) error {
	url := fmt.Sprintf("http://127.0.0.1:%d/health", cfg.EtcdClientPort)
	c := &http.Client{Timeout: time.Second}
	return poll(ctx, 30*time.Second, l, Etcd, func() error {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"true"`) {
			return fmt.Errorf("etcd health: %s %s", resp.Status, b)
		}
		return nil
	})
}

func adminClient(l Layout) (*kubernetes.Clientset, error) {
	rc, err := RESTConfig(l.AdminKubeconfig)
	if err != nil {
		return nil, err
	}
	rc.Timeout = 2 * time.Second
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("admin client: %w", err)
	}
	return cs, nil
}

func waitReady(ctx context.Context, l Layout, cs *kubernetes.Clientset) error {
	return poll(ctx, 90*time.Second, l, APIServer, func() error {
		_, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	})
}

// poll calls check until it succeeds, the component dies, or the time runs
// out; errors name the component and quote its log's tail.
func poll(ctx context.Context, timeout time.Duration, l Layout, component string, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		if !daemon.AliveFromFile(l.PidFile(component)) {
			return fmt.Errorf("%s exited; end of %s:\n%s", component, l.LogFile(component), Tail(l.LogFile(component), 20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last: %v); end of %s:\n%s", component, ctx.Err(), last, l.LogFile(component), Tail(l.LogFile(component), 20))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Tail returns the last n lines of a file (for error messages).
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Healthy reports whether every component runs and the apiserver is ready.
func Healthy(ctx context.Context, l Layout) error {
	for _, c := range Components {
		if !daemon.AliveFromFile(l.PidFile(c)) {
			return fmt.Errorf("%s is not running", c)
		}
	}
	cs, err := adminClient(l)
	if err != nil {
		return err
	}
	if _, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx); err != nil {
		return fmt.Errorf("kube-apiserver not ready: %w", err)
	}
	return nil
}

// Stop stops the components in reverse start order. It is idempotent.
func Stop(l Layout) error {
	var errs []error
	for i := len(Components) - 1; i >= 0; i-- {
		if err := daemon.StopFromFile(l.PidFile(Components[i]), 10*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("stop %s: %w", Components[i], err))
		}
	}
	return errors.Join(errs...)
}
