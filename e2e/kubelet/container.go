package kubelet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"golang.org/x/sys/unix"
)

// container is one container of a pod and its successive instances
// (processes). Its fields after spec are guarded by the pod's mu.
type container struct {
	p    *podRun
	spec v1.Container
	init bool

	restartCount int32
	state        v1.ContainerState
	lastState    v1.ContainerState
	ready        bool
	started      bool
	done         bool // will not run again
	inst         *instance
	firstStart   chan struct{}
	everStarted  bool
}

// instance is one run of a container's process.
type instance struct {
	pid        int
	n          int32 // restart count at start; names the log file
	startedAt  time.Time
	logPath    string
	argv, env  []string
	exited     chan struct{} // closed once reaped
	logsDone   chan struct{} // closed once stdout/stderr are drained
	exitCode   int32
	finishedAt time.Time
	killReason string // set when the kubelet killed it (probe failure)
}

func newContainer(p *podRun, spec v1.Container, init bool) *container {
	return &container{
		p: p, spec: spec, init: init,
		state:      v1.ContainerState{Waiting: &v1.ContainerStateWaiting{Reason: "ContainerCreating"}},
		firstStart: make(chan struct{}),
	}
}

// isSidecar reports an init container with restartPolicy Always, which runs
// alongside the regular containers.
func (c *container) isSidecar() bool {
	return c.init && c.spec.RestartPolicy != nil && *c.spec.RestartPolicy == v1.ContainerRestartPolicyAlways
}

// shouldRestart applies the restart policy to an exit code.
func shouldRestart(policy v1.RestartPolicy, init, sidecar bool, code int32) bool {
	if sidecar {
		return true
	}
	if init {
		// Init containers run to success unless the pod never restarts.
		return code != 0 && policy != v1.RestartPolicyNever
	}
	switch policy {
	case v1.RestartPolicyNever:
		return false
	case v1.RestartPolicyOnFailure:
		return code != 0
	default:
		return true
	}
}

// restartBackoff is the wait before restart number n (1-based) of a
// container: base, doubled per restart, capped.
func restartBackoff(n int32, base, max time.Duration) time.Duration {
	d := base
	for i := int32(1); i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return d
}

// supervise runs the container until it will not run again (by restart
// policy) or ctx ends. It reports whether the last run exited 0.
func (c *container) supervise(ctx context.Context) bool {
	p := c.p
	failures := int32(0)
	defer func() {
		p.mu.Lock()
		c.done = true
		p.mu.Unlock()
		p.notify()
	}()
	for {
		if ctx.Err() != nil {
			return false
		}
		inst, err := c.start(ctx)
		if err != nil {
			var se *startError
			now := time.Now()
			if errors.As(err, &se) {
				// It was started and failed before the binary ran.
				p.mu.Lock()
				c.setTerminated(128, "StartError", se.msg, now, now)
				p.mu.Unlock()
				p.log.Warn("container failed to start", "container", c.spec.Name, "err", se.msg)
				p.r.emit(p.currentPod(), v1.EventTypeWarning, "Failed", fmt.Sprintf("Error: %s", se.msg))
				if !shouldRestart(p.currentPod().Spec.RestartPolicy, c.init, c.isSidecar(), 128) {
					return false
				}
			} else {
				reason := "CreateContainerError"
				switch {
				case errors.Is(err, errImageBinary):
					reason = "ErrImagePull"
				case errors.Is(err, errConfig):
					reason = "CreateContainerConfigError"
				}
				p.mu.Lock()
				c.setState(v1.ContainerState{Waiting: &v1.ContainerStateWaiting{Reason: reason, Message: err.Error()}})
				p.mu.Unlock()
				p.log.Warn("cannot create container", "container", c.spec.Name, "reason", reason, "err", err)
				p.r.emit(p.currentPod(), v1.EventTypeWarning, "Failed", fmt.Sprintf("Error: %s", err))
			}
			p.notify()
			failures++
			if !sleepCtx(ctx, restartBackoff(failures, p.r.backoffBase, p.r.backoffMax)) {
				return false
			}
			continue
		}
		p.notify()
		probeCtx, stopProbes := context.WithCancel(ctx)
		if !c.init || c.isSidecar() {
			go c.runProbes(probeCtx, inst)
		}
		<-inst.exited
		stopProbes()

		p.mu.Lock()
		msg := ""
		if inst.killReason != "" {
			msg = inst.killReason
		}
		reason := "Completed"
		if inst.exitCode != 0 {
			reason = "Error"
		}
		c.setTerminated(inst.exitCode, reason, msg, inst.startedAt, inst.finishedAt)
		c.inst = nil
		c.ready = false
		p.mu.Unlock()
		p.log.Info("container exited", "container", c.spec.Name, "exitCode", inst.exitCode)
		p.notify()

		if ctx.Err() != nil {
			return inst.exitCode == 0
		}
		if !shouldRestart(p.currentPod().Spec.RestartPolicy, c.init, c.isSidecar(), inst.exitCode) {
			return inst.exitCode == 0
		}
		// A container that ran for a while starts its backoff afresh.
		if inst.finishedAt.Sub(inst.startedAt) > 2*p.r.backoffMax {
			failures = 0
		}
		failures++
		d := restartBackoff(failures, p.r.backoffBase, p.r.backoffMax)
		p.mu.Lock()
		c.setState(v1.ContainerState{Waiting: &v1.ContainerStateWaiting{
			Reason:  "CrashLoopBackOff",
			Message: fmt.Sprintf("back-off %s restarting failed container=%s pod=%s", d, c.spec.Name, p.currentPodNameLocked()),
		}})
		p.mu.Unlock()
		p.notify()
		if inst.exitCode != 0 {
			p.r.emit(p.currentPod(), v1.EventTypeWarning, "BackOff", "Back-off restarting failed container "+c.spec.Name)
		}
		if !sleepCtx(ctx, d) {
			return false
		}
		p.mu.Lock()
		c.restartCount++
		p.mu.Unlock()
	}
}

func (p *podRun) currentPodNameLocked() string {
	return p.pod.Name + "_" + p.pod.Namespace + "(" + string(p.uid) + ")"
}

// setTerminated records a finished run; callers hold the pod's mu.
func (c *container) setTerminated(code int32, reason, msg string, started, finished time.Time) {
	c.setState(v1.ContainerState{Terminated: &v1.ContainerStateTerminated{
		ExitCode:    code,
		Reason:      reason,
		Message:     msg,
		StartedAt:   metav1.NewTime(started),
		FinishedAt:  metav1.NewTime(finished),
		ContainerID: c.containerID(),
	}})
}

// setState moves to a new state; leaving a terminated state makes it the
// last termination state, as `kubectl describe` shows it. Callers hold the
// pod's mu.
func (c *container) setState(s v1.ContainerState) {
	if c.state.Terminated != nil && s.Terminated == nil {
		c.lastState = c.state
	}
	c.state = s
}

// containerID names the current run, in the runtime://id form.
func (c *container) containerID() string {
	return fmt.Sprintf("sandbox://%s/%s/%d", c.p.uid, c.spec.Name, c.restartCount)
}

// errConfig marks a container whose configuration cannot be built yet
// (a missing configmap or secret key): it is retried.
var errConfig = errors.New("container config")

// start launches a new instance through kubelet-init.
func (c *container) start(ctx context.Context) (*instance, error) {
	p := c.p
	r := p.r
	pod := p.currentPod()
	p.mu.Lock()
	podIPs := append([]string(nil), p.podIPs...)
	netns := p.netns
	n := c.restartCount
	p.mu.Unlock()

	hostname, _ := podHostname(pod, r.cfg.ClusterDomain)
	env, err := buildEnv(&c.spec, envContext{
		pod: pod, hostname: hostname, podIPs: podIPs, hostIP: r.cfg.NodeIP,
		apiHost: r.apiHost, apiPort: r.apiPort,
		nodeCPU: r.nodeCPU, nodeMemory: r.nodeMemory,
		configMap: p.getConfigMap(ctx), secret: p.getSecret(ctx),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errConfig, err)
	}
	lookup := envLookup(env)
	command := expandAll(c.spec.Command, lookup)
	args := expandAll(c.spec.Args, lookup)
	argv, err := resolveArgv(c.spec.Image, command, args, r.lookups)
	if err != nil {
		return nil, err
	}
	mounts, err := p.containerMounts(&c.spec)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errConfig, err)
	}
	spec := &initSpec{
		Mode:   "run",
		NetNS:  netns,
		Mounts: mounts,
		Argv:   argv,
		Env:    env,
		Dir:    c.spec.WorkingDir,
	}
	if !pod.Spec.HostNetwork {
		spec.Hostname = hostname
	}
	spec.UID, spec.GID, spec.Groups = runAs(pod, &c.spec)

	cmd, err := initCommand(r.initArgv, spec)
	if err != nil {
		return nil, err
	}
	logDir := filepath.Join(p.dir, "logs", c.spec.Name)
	if err := os.MkdirAll(logDir, 0o750); err != nil {
		return nil, fmt.Errorf("create log dir: %w", err)
	}
	logPath := filepath.Join(logDir, fmt.Sprintf("%d.log", n))
	lw, err := openLogWriter(logPath)
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		lw.wait()
		return nil, fmt.Errorf("create stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		lw.wait()
		return nil, fmt.Errorf("create stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.SysProcAttr.Setpgid = true
	startErr := startInit(r.spawn, cmd)
	outW.Close()
	errW.Close()
	lw.copyFrom(outR, "stdout")
	lw.copyFrom(errR, "stderr")
	if startErr != nil {
		go lw.wait()
		return nil, startErr
	}
	inst := &instance{
		pid: cmd.Process.Pid, n: n, startedAt: time.Now(), logPath: logPath,
		argv: argv, env: env,
		exited: make(chan struct{}), logsDone: make(chan struct{}),
	}
	if err := appendPidRecord(filepath.Join(p.dir, "pids"), inst.pid); err != nil {
		p.log.Warn("record container pid", "err", err)
	}
	go func() {
		_ = cmd.Wait()
		inst.exitCode = exitCode(cmd.ProcessState)
		inst.finishedAt = time.Now()
		// What the process started in its group goes with it, as with a
		// container's pid namespace.
		_ = unix.Kill(-inst.pid, unix.SIGKILL)
		close(inst.exited)
		lw.wait()
		close(inst.logsDone)
	}()

	p.mu.Lock()
	stopping := p.stopping
	c.inst = inst
	c.setState(v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: metav1.NewTime(inst.startedAt)}})
	c.started = c.spec.StartupProbe == nil
	c.ready = c.started && c.spec.ReadinessProbe == nil
	first := !c.everStarted
	c.everStarted = true
	p.mu.Unlock()
	if first {
		close(c.firstStart)
	}
	if stopping {
		// killAll ran while this instance was being started.
		_ = unix.Kill(-inst.pid, unix.SIGKILL)
	}
	p.log.Info("container started", "container", c.spec.Name, "pid", inst.pid, "argv", argv)
	r.emit(pod, v1.EventTypeNormal, "Started", "Started container "+c.spec.Name)
	return inst, nil
}

func expandAll(in []string, lookup func(string) (string, bool)) []string {
	if in == nil {
		return nil
	}
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = expandVars(s, lookup)
	}
	return out
}

// envLookup looks names up in a NAME=value list (last one wins).
func envLookup(env []string) func(string) (string, bool) {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// runAs picks the uid/gid a container runs as (container securityContext
// over pod securityContext); nil keeps root.
func runAs(pod *v1.Pod, c *v1.Container) (uid, gid *int64, groups []int64) {
	if psc := pod.Spec.SecurityContext; psc != nil {
		uid, gid = psc.RunAsUser, psc.RunAsGroup
		groups = append(groups, psc.SupplementalGroups...)
		if psc.FSGroup != nil {
			groups = append(groups, *psc.FSGroup)
		}
	}
	if sc := c.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			uid = sc.RunAsUser
		}
		if sc.RunAsGroup != nil {
			gid = sc.RunAsGroup
		}
	}
	if uid != nil && gid == nil {
		zero := int64(0)
		gid = &zero
	}
	return uid, gid, groups
}

// stop ends the current instance: SIGTERM to its process group, SIGKILL
// after grace. It returns once the process is reaped.
func (c *container) stop(grace time.Duration) {
	c.p.mu.Lock()
	inst := c.inst
	c.p.mu.Unlock()
	if inst == nil {
		return
	}
	inst.signal(unix.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-inst.exited:
	case <-t.C:
		inst.signal(unix.SIGKILL)
		<-inst.exited
	}
}

func (in *instance) signal(sig syscall.Signal) {
	select {
	case <-in.exited:
		return // reaped: the pid may be someone else's now
	default:
	}
	_ = unix.Kill(-in.pid, sig)
}

// kill ends this instance because a probe failed; the supervisor restarts
// it per restart policy.
func (c *container) kill(inst *instance, reason string, grace time.Duration) {
	c.p.mu.Lock()
	if c.inst != inst {
		c.p.mu.Unlock()
		return
	}
	inst.killReason = reason
	c.p.mu.Unlock()
	c.p.log.Info("killing container", "container", c.spec.Name, "reason", reason)
	c.p.r.emit(c.p.currentPod(), v1.EventTypeNormal, "Killing", fmt.Sprintf("Container %s %s, will be restarted", c.spec.Name, reason))
	inst.signal(unix.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-inst.exited:
	case <-t.C:
		inst.signal(unix.SIGKILL)
		<-inst.exited
	}
}

// runningInstance is the container's live instance, or an error.
func (c *container) runningInstance() (*instance, error) {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.inst == nil {
		return nil, fmt.Errorf("container %s: %w", c.spec.Name, errNotRunning)
	}
	return c.inst, nil
}

// status is the container's v1.ContainerStatus; callers hold the pod's mu.
func (c *container) status() v1.ContainerStatus {
	st := v1.ContainerStatus{
		Name:                 c.spec.Name,
		Image:                c.spec.Image,
		ImageID:              "sandbox://" + imageBinaryName(c.spec.Image),
		State:                c.state,
		LastTerminationState: c.lastState,
		Ready:                c.ready,
		RestartCount:         c.restartCount,
	}
	started := c.started && c.state.Running != nil
	st.Started = &started
	if c.state.Running != nil || c.state.Terminated != nil {
		st.ContainerID = c.containerID()
	}
	return st
}

// runProbes runs the startup probe, then readiness and liveness, for one
// instance until ctx ends.
func (c *container) runProbes(ctx context.Context, inst *instance) {
	p := c.p
	host := p.firstIP()
	target := probeTarget{
		host:  host,
		ports: c.spec.Ports,
		exec: func(ctx context.Context, cmd []string) (int, []byte, error) {
			var out limitedBuffer
			code, err := p.r.execInContainer(ctx, p, c, cmd, nil, &out, &out, false, nil)
			return code, out.Bytes(), err
		},
	}
	if sp := c.spec.StartupProbe; sp != nil {
		if !c.probeLoop(ctx, inst, startupProbe, sp, target) {
			return
		}
	}
	done := make(chan struct{}, 2)
	n := 0
	if rp := c.spec.ReadinessProbe; rp != nil {
		n++
		go func() { c.probeLoop(ctx, inst, readinessProbe, rp, target); done <- struct{}{} }()
	}
	if lp := c.spec.LivenessProbe; lp != nil {
		n++
		go func() { c.probeLoop(ctx, inst, livenessProbe, lp, target); done <- struct{}{} }()
	}
	for ; n > 0; n-- {
		<-done
	}
}

// probeLoop runs one probe periodically. For a startup probe it returns true
// once the container has started; the others run until ctx ends.
func (c *container) probeLoop(ctx context.Context, inst *instance, kind probeKind, pr *v1.Probe, target probeTarget) bool {
	p := c.p
	tr := newProbeTracker(kind, pr)
	delay := time.Until(inst.startedAt.Add(time.Duration(pr.InitialDelaySeconds) * time.Second))
	if !sleepCtx(ctx, delay) {
		return false
	}
	tick := time.NewTicker(probePeriod(pr))
	defer tick.Stop()
	for {
		ok, msg := runProbe(ctx, pr, target)
		if ctx.Err() != nil {
			return false
		}
		if !ok {
			p.r.emit(p.currentPod(), v1.EventTypeWarning, "Unhealthy", fmt.Sprintf("%s probe failed: %s", capitalize(string(kind)), msg))
		}
		v := tr.observe(ok)
		if v.kill {
			grace := p.gracePeriod()
			if pr.TerminationGracePeriodSeconds != nil {
				grace = time.Duration(*pr.TerminationGracePeriodSeconds) * time.Second
			}
			c.kill(inst, fmt.Sprintf("failed %s probe", kind), grace)
			return false
		}
		if v.changed {
			p.mu.Lock()
			if c.inst == inst {
				switch kind {
				case readinessProbe:
					c.ready = v.result
				case startupProbe:
					c.started = v.result
					c.ready = c.started && c.spec.ReadinessProbe == nil
				}
			}
			p.mu.Unlock()
			p.notify()
			if kind == startupProbe && v.result {
				return true
			}
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// limitedBuffer keeps the first 64 KiB written (probe output).
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 64<<10 - len(l.b); room > 0 {
		if len(p) < room {
			room = len(p)
		}
		l.b = append(l.b, p[:room]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) Bytes() []byte { return l.b }
