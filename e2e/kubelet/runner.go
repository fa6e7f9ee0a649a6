package kubelet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// apiAccess is what pod setup needs from the API server. The Kubelet
// implements it with its client; runtime tests without an API server use
// pods that need none of it (nil).
type apiAccess interface {
	configMap(ctx context.Context, ns, name string) (*v1.ConfigMap, error)
	secret(ctx context.Context, ns, name string) (*v1.Secret, error)
	// token asks the TokenRequest API for a token of the pod's service
	// account, bound to the pod; audience "" means the API server's default.
	token(ctx context.Context, pod *v1.Pod, audience string, expirationSeconds int64) (string, time.Time, error)
}

// runner runs the pods of this node: sandboxes (netns, CNI, pod dir),
// containers (processes, logs, restarts, probes), exec and port-forward. It
// does not talk to the API server itself (see apiAccess) and reports changes
// through each podRun's notify.
type runner struct {
	cfg      *Config
	log      *slog.Logger
	cni      *cniNet
	spawn    *spawner
	initArgv []string
	// netnsPrefix starts the names of pod netns (PodNetnsPrefix).
	netnsPrefix string
	api         apiAccess
	// apiHost/apiPort become KUBERNETES_SERVICE_HOST/PORT in pods.
	apiHost, apiPort string
	nodeCPU          int64
	nodeMemory       int64
	hostResolv       []byte
	lookups          lookups
	// event records a Kubernetes Event on the pod (no-op when nil).
	event func(pod *v1.Pod, eventType, reason, msg string)
	// backoffBase and backoffMax pace container restarts.
	backoffBase, backoffMax time.Duration

	mu   sync.Mutex
	pods map[types.UID]*podRun
}

func newRunner(cfg *Config, log *slog.Logger, api apiAccess, initArgv []string) *runner {
	hostResolv, _ := os.ReadFile("/etc/resolv.conf")
	prefix := PodNetnsPrefix
	if cfg.NetnsPrefix != "" {
		prefix = cfg.NetnsPrefix
	}
	return &runner{
		cfg:         cfg,
		log:         log,
		cni:         newCNINet(cfg),
		spawn:       newSpawner(),
		initArgv:    initArgv,
		netnsPrefix: prefix,
		api:         api,
		nodeCPU:     hostCPUs(),
		nodeMemory:  hostMemory(),
		hostResolv:  hostResolv,
		lookups:     defaultLookups(cfg.ImageBinDirs),
		backoffBase: time.Second,
		backoffMax:  30 * time.Second,
		pods:        map[types.UID]*podRun{},
	}
}

// close stops the spawner; any child still running gets SIGKILL.
func (r *runner) close() { r.spawn.close() }

func (r *runner) emit(pod *v1.Pod, eventType, reason, msg string) {
	if r.event != nil {
		r.event(pod, eventType, reason, msg)
	}
}

// lookup finds a pod run by namespace and name (the kubelet API's view).
func (r *runner) lookup(ns, name string) *podRun {
	r.mu.Lock()
	defer r.mu.Unlock()
	var found *podRun
	for _, p := range r.pods {
		pod := p.currentPod()
		if pod.Namespace == ns && pod.Name == name {
			// After a delete and re-create under the same name, prefer the one
			// that is not being torn down.
			if found == nil || pod.DeletionTimestamp == nil {
				found = p
			}
		}
	}
	return found
}

func (r *runner) podDir(uid types.UID) string { return filepath.Join(r.cfg.PodsDir, string(uid)) }

// podState is kept as pod.json in the pod dir, so a restarted kubelet knows
// what a previous one left.
type podState struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	UID         string `json:"uid"`
	NetNS       string `json:"netns,omitempty"`
	HostNetwork bool   `json:"hostNetwork,omitempty"`
}

// podRun is one pod's life on this node.
type podRun struct {
	r       *runner
	uid     types.UID
	dir     string
	log     *slog.Logger
	changed chan struct{}

	mu           sync.Mutex
	pod          *v1.Pod
	netns        string // "" for hostNetwork pods
	sandboxReady bool
	sandboxErr   string
	podIPs       []string
	startTime    time.Time
	initDone     bool
	stopping     bool
	initCtrs     []*container
	ctrs         []*container
	volumes      map[string]string // volume name -> host path
	tokens       map[string]tokenEntry
}

// newPodRun registers a pod with the runner.
func (r *runner) newPodRun(pod *v1.Pod) *podRun {
	p := &podRun{
		r:       r,
		uid:     pod.UID,
		dir:     r.podDir(pod.UID),
		log:     r.log.With("pod", pod.Namespace+"/"+pod.Name, "uid", string(pod.UID)),
		changed: make(chan struct{}, 1),
		pod:     pod,
		tokens:  map[string]tokenEntry{},
	}
	for i := range pod.Spec.InitContainers {
		p.initCtrs = append(p.initCtrs, newContainer(p, pod.Spec.InitContainers[i], true))
	}
	for i := range pod.Spec.Containers {
		p.ctrs = append(p.ctrs, newContainer(p, pod.Spec.Containers[i], false))
	}
	r.mu.Lock()
	r.pods[pod.UID] = p
	r.mu.Unlock()
	return p
}

// forget unregisters the pod run.
func (r *runner) forget(p *podRun) {
	r.mu.Lock()
	if r.pods[p.uid] == p {
		delete(r.pods, p.uid)
	}
	r.mu.Unlock()
}

func (p *podRun) notify() {
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

func (p *podRun) currentPod() *v1.Pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pod
}

// update records a newer version of the pod object (labels, annotations,
// deletion timestamp; the spec of a running pod is immutable in what we use).
func (p *podRun) update(pod *v1.Pod) {
	p.mu.Lock()
	p.pod = pod
	p.mu.Unlock()
}

func (p *podRun) hostNetwork() bool { return p.currentPod().Spec.HostNetwork }

// setupSandbox gives the pod its dir, network namespace (CNI ADD), resolv.conf,
// hosts and volumes. It is retried by the caller until it succeeds; what a
// failed attempt made is undone.
func (p *podRun) setupSandbox(ctx context.Context) (err error) {
	pod := p.currentPod()
	defer func() {
		p.mu.Lock()
		if err != nil {
			p.sandboxErr = err.Error()
		} else {
			p.sandboxErr = ""
		}
		p.mu.Unlock()
		p.notify()
	}()
	for _, d := range []string{p.dir, filepath.Join(p.dir, "logs"), filepath.Join(p.dir, "volumes")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return fmt.Errorf("create pod dir: %w", err)
		}
	}
	st := podState{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID), HostNetwork: pod.Spec.HostNetwork}
	if !pod.Spec.HostNetwork {
		st.NetNS = p.r.netnsPath(string(pod.UID))
	}
	if err := writeJSONFile(filepath.Join(p.dir, "pod.json"), st); err != nil {
		return err
	}

	var ips []string
	if pod.Spec.HostNetwork {
		ips = []string{p.r.cfg.NodeIP}
	} else {
		if err := createNetns(st.NetNS); err != nil {
			return fmt.Errorf("create pod netns: %w", err)
		}
		addrs, err := p.r.cni.add(ctx, pod, st.NetNS)
		if err != nil {
			if derr := deleteNetns(st.NetNS); derr != nil {
				p.log.Warn("remove netns after failed CNI ADD", "err", derr)
			}
			return fmt.Errorf("set up pod network: %w", err)
		}
		for _, a := range addrs {
			ips = append(ips, a.String())
		}
	}
	p.mu.Lock()
	p.netns = st.NetNS
	p.podIPs = ips
	p.mu.Unlock()

	if err := p.writeNameFiles(pod, ips); err != nil {
		p.teardownNetwork(context.WithoutCancel(ctx))
		return err
	}
	vols, err := p.setupVolumes(ctx, pod)
	if err != nil {
		p.teardownNetwork(context.WithoutCancel(ctx))
		return err
	}
	p.mu.Lock()
	p.volumes = vols
	p.sandboxReady = true
	if p.startTime.IsZero() {
		p.startTime = time.Now()
	}
	p.mu.Unlock()
	p.log.Info("pod sandbox ready", "ips", ips, "netns", st.NetNS)
	return nil
}

// writeNameFiles writes the pod's resolv.conf and hosts file.
func (p *podRun) writeNameFiles(pod *v1.Pod, ips []string) error {
	cfg := p.r.cfg
	if rc, ok := podResolvConf(pod, cfg.ClusterDNS, cfg.ClusterDomain, p.r.hostResolv); ok {
		if err := writeFileAtomic(filepath.Join(p.dir, "resolv.conf"), []byte(rc), 0o644); err != nil {
			return fmt.Errorf("write resolv.conf: %w", err)
		}
	}
	if !pod.Spec.HostNetwork {
		if err := writeFileAtomic(filepath.Join(p.dir, "hosts"), []byte(podHostsFile(pod, ips, cfg.ClusterDomain)), 0o644); err != nil {
			return fmt.Errorf("write hosts: %w", err)
		}
	}
	return nil
}

// run starts the init containers in order, then the containers, and returns
// when none will run again or ctx ends. Stopping processes is killAll's job.
func (p *podRun) run(ctx context.Context) {
	go p.refreshVolumesLoop(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, c := range p.initCtrs {
		if c.isSidecar() {
			wg.Add(1)
			go func() { defer wg.Done(); c.supervise(ctx) }()
			select {
			case <-c.firstStart:
			case <-ctx.Done():
				return
			}
			continue
		}
		if ok := c.supervise(ctx); !ok {
			return // pod failed (restartPolicy Never) or is stopping
		}
	}
	p.mu.Lock()
	p.initDone = true
	p.mu.Unlock()
	p.notify()
	if ctx.Err() != nil {
		return
	}
	for _, c := range p.ctrs {
		wg.Add(1)
		go func() { defer wg.Done(); c.supervise(ctx) }()
	}
	wg.Wait()
	// Sidecars end when the regular containers are done.
	for _, c := range p.initCtrs {
		if c.isSidecar() {
			c.stop(p.gracePeriod())
		}
	}
}

func (p *podRun) gracePeriod() time.Duration {
	pod := p.currentPod()
	if pod.DeletionGracePeriodSeconds != nil {
		return time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	}
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		return time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	return 30 * time.Second
}

// killAll stops every container: SIGTERM to each process group, SIGKILL
// after grace. Containers started after this call are killed at once.
func (p *podRun) killAll(grace time.Duration) {
	p.mu.Lock()
	p.stopping = true
	all := append(append([]*container(nil), p.ctrs...), p.initCtrs...)
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range all {
		wg.Add(1)
		go func() { defer wg.Done(); c.stop(grace) }()
	}
	wg.Wait()
}

// teardownNetwork kills what is left in the pod netns, runs CNI DEL and
// removes the netns. It is idempotent.
func (p *podRun) teardownNetwork(ctx context.Context) {
	p.mu.Lock()
	netns := p.netns
	p.netns = ""
	p.sandboxReady = false
	p.mu.Unlock()
	if netns == "" {
		return
	}
	teardownPodNetwork(ctx, p.r.cni, p.log, string(p.uid), netns)
}

func teardownPodNetwork(ctx context.Context, cni *cniNet, log *slog.Logger, uid, netns string) {
	if isNetns(netns) {
		if n, err := killNetnsProcesses(netns); err != nil {
			log.Warn("kill processes left in pod netns", "err", err)
		} else if n > 0 {
			log.Info("killed processes left in pod netns", "count", n)
			time.Sleep(50 * time.Millisecond)
		}
	}
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = cni.del(ctx, uid, netns); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		log.Error("CNI DEL failed; the pod's address may leak", "err", err)
	}
	if err := deleteNetns(netns); err != nil {
		log.Error("remove pod netns", "err", err)
	}
}

// removeDir deletes the pod's dir (logs, volumes, tokens).
func (p *podRun) removeDir() error {
	if err := os.RemoveAll(p.dir); err != nil {
		return fmt.Errorf("remove pod dir %s: %w", p.dir, err)
	}
	return nil
}

// firstIP is the pod's primary IP ("" before the sandbox is up).
func (p *podRun) firstIP() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.podIPs) == 0 {
		return ""
	}
	return p.podIPs[0]
}

func (p *podRun) container(name string) *container {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range append(append([]*container(nil), p.ctrs...), p.initCtrs...) {
		if c.spec.Name == name {
			return c
		}
	}
	return nil
}

// cleanupLeftovers removes what pods of an earlier kubelet run left in
// PodsDir: processes, CNI attachments, netns and the dirs. A fresh kubelet
// starts every pod anew.
func (r *runner) cleanupLeftovers(ctx context.Context) error {
	entries, err := os.ReadDir(r.cfg.PodsDir)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return fmt.Errorf("list pods dir: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		uid := e.Name()
		dir := filepath.Join(r.cfg.PodsDir, uid)
		log := r.log.With("uid", uid)
		recs, err := readPidRecords(filepath.Join(dir, "pids"))
		if err != nil {
			log.Warn("read pid records of leftover pod", "err", err)
		}
		killRecorded(recs)
		var st podState
		if b, err := os.ReadFile(filepath.Join(dir, "pod.json")); err == nil {
			_ = json.Unmarshal(b, &st)
		}
		netns := st.NetNS
		if netns == "" && !st.HostNetwork {
			netns = r.netnsPath(uid)
		}
		if netns != "" {
			teardownPodNetwork(ctx, r.cni, log, uid, netns)
		}
		if err := os.RemoveAll(dir); err != nil {
			log.Warn("remove leftover pod dir", "err", err)
		}
		log.Info("cleaned up pod left by an earlier kubelet", "pod", st.Namespace+"/"+st.Name)
	}
	return nil
}

func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return writeFileAtomic(path, b, 0o640)
}

// writeFileAtomic replaces path by a rename, so a reader (or a bind mount of
// the parent dir) never sees a half-written file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// sleepCtx waits d or until ctx ends; it reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

var errNotRunning = errors.New("container is not running")
