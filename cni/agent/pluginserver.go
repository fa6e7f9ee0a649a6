package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/meshlite/meshlite/cni/agentapi"
	"github.com/meshlite/meshlite/cni/zds"
)

// listenPlugin opens the plugin socket (root only: it takes netns fds).
func (a *Agent) listenPlugin() error {
	p := a.cfg.SocketPath
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("create plugin socket dir: %w", err)
	}
	if st, err := os.Lstat(p); err == nil {
		if st.Mode()&fs.ModeSocket == 0 {
			return fmt.Errorf("plugin socket path %s exists and is not a socket", p)
		}
		os.Remove(p)
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: p, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("listen on plugin socket %s: %w", p, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(p, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("restrict plugin socket: %w", err)
	}
	a.pluginLn = ln
	a.listening.Store(true)
	return nil
}

func (a *Agent) closePlugin() {
	a.listening.Store(false)
	if a.pluginLn != nil {
		a.pluginLn.Close()
	}
}

// servePlugin answers plugin requests, one goroutine per connection.
func (a *Agent) servePlugin(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, a.closePlugin)
	defer stop()
	for {
		c, err := a.pluginLn.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			a.log.Error("accept plugin connection", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			a.handlePluginConn(ctx, c)
		}()
	}
}

func (a *Agent) handlePluginConn(ctx context.Context, c *net.UnixConn) {
	req, netns, err := agentapi.ReadRequest(c, 5*time.Second)
	if err != nil {
		a.log.Error("bad request from the CNI plugin", "err", err)
		a.metrics.pluginRequests.WithLabelValues("invalid", "error").Inc()
		agentapi.WriteResponse(c, &agentapi.Response{Error: err.Error()})
		return
	}
	start := time.Now()
	resp := a.handle(ctx, req, netns)
	a.metrics.pluginRequests.WithLabelValues(req.Command, stateLabel(resp)).Inc()
	log := a.log.With("cmd", req.Command, "pod", req.PodNamespace+"/"+req.PodName, "uid", req.PodUID,
		"state", resp.State, "took", time.Since(start).Round(time.Millisecond))
	if resp.Error != "" {
		log.Warn("CNI request failed", "err", resp.Error)
	} else if req.Command != agentapi.CmdStatus {
		log.Info("CNI request")
	}
	if err := agentapi.WriteResponse(c, resp); err != nil {
		log.Warn("answer the CNI plugin", "err", err)
	}
}

func stateLabel(r *agentapi.Response) string {
	if r.Error != "" {
		return "error"
	}
	return r.State
}

func errResp(format string, args ...any) *agentapi.Response {
	return &agentapi.Response{Error: fmt.Sprintf(format, args...)}
}

// handle serves one request. It owns netns (closes it, or passes it to
// enroll).
func (a *Agent) handle(ctx context.Context, req *agentapi.Request, netns *os.File) *agentapi.Response {
	owned := netns != nil
	defer func() {
		if owned {
			netns.Close()
		}
	}()
	switch req.Command {
	case agentapi.CmdStatus:
		if ok, why := a.Ready(); !ok {
			return errResp("agent not ready: %s", why)
		}
		return &agentapi.Response{State: agentapi.StateReady}
	case agentapi.CmdDel:
		return a.handleDel(ctx, req)
	case agentapi.CmdAdd, agentapi.CmdCheck:
	default:
		return errResp("unknown command %q", req.Command)
	}
	if netns == nil {
		return errResp("%s of pod %s/%s came without the pod's netns", req.Command, req.PodNamespace, req.PodName)
	}
	if !isNetns(netns) {
		return errResp("%s of pod %s/%s: the descriptor passed is not a network namespace", req.Command, req.PodNamespace, req.PodName)
	}
	timeout := req.Timeout()
	if timeout <= 0 {
		timeout = a.cfg.AddTimeout
	}
	// Answer a little before the plugin gives up, so it gets a clear state.
	rctx, cancel := context.WithTimeout(ctx, max(timeout-time.Second, timeout/2))
	defer cancel()
	key := req.PodNamespace + "/" + req.PodName
	unlock := a.locks.lock(key)
	pod, ns, err := a.lookup(rctx, req.PodNamespace, req.PodName, req.PodUID)
	if err != nil {
		unlock()
		// Without the pod we cannot tell whether to capture it: fail closed.
		return errResp("cannot decide whether to capture pod %s: %v", key, err)
	}
	uid := string(pod.UID)
	want := a.wantEnrolled(pod, ns)
	if req.Command == agentapi.CmdCheck {
		defer unlock()
		return a.check(want, uid, netns)
	}
	if !want {
		if st := a.state(uid); st != nil {
			// It was enrolled and is no longer: a re-ADD after unlabelling.
			if err := a.unenroll(rctx, st, true); err != nil {
				unlock()
				return errResp("un-enroll pod %s: %v", key, err)
			}
		}
		unlock()
		return &agentapi.Response{State: agentapi.StateNotEnrolled}
	}
	ips, err := req.PodIPs()
	if err != nil || len(ips) == 0 {
		ips = statusIPs(pod)
	}
	owned = false
	if err := a.enroll(pod, netns, ips); err != nil {
		unlock()
		return errResp("%v", err)
	}
	unlock()
	err = a.zds.WaitHeld(rctx, uid)
	switch {
	case err == nil:
		actx, acancel := context.WithTimeout(ctx, 5*time.Second)
		defer acancel()
		if err := a.annotate(actx, key, uid, true); err != nil {
			// The reconciler retries; the pod is captured either way.
			a.log.Warn("annotate pod; will retry", "pod", key, "err", err)
			a.enqueue(key)
		}
		return &agentapi.Response{State: agentapi.StateHeld}
	case errors.Is(err, zds.ErrUnknown):
		return errResp("pod %s left the mesh while waiting for ztunnel; retry", key)
	default:
		a.log.Warn("ztunnel has not taken the pod; it stays blocked", "pod", key, "uid", uid,
			"waited", timeout, "ztunnelConnections", a.zds.Connected())
		return &agentapi.Response{State: agentapi.StatePending}
	}
}

func (a *Agent) check(want bool, uid string, netns *os.File) *agentapi.Response {
	if !want {
		return &agentapi.Response{State: agentapi.StateNotEnrolled}
	}
	if a.state(uid) == nil {
		return errResp("pod is enrolled but the agent has not set it up")
	}
	if err := a.podRules.Check(netns); err != nil {
		return errResp("%v", err)
	}
	if !a.zds.Held(uid) {
		return &agentapi.Response{State: agentapi.StatePending}
	}
	return &agentapi.Response{State: agentapi.StateHeld}
}

func (a *Agent) handleDel(ctx context.Context, req *agentapi.Request) *agentapi.Response {
	key := req.PodNamespace + "/" + req.PodName
	unlock := a.locks.lock(key)
	defer unlock()
	for _, st := range a.statesFor(key) {
		if req.PodUID != "" && st.uid != req.PodUID {
			continue
		}
		// The netns is being torn down: no rules to remove.
		if err := a.unenroll(ctx, st, false); err != nil {
			return errResp("remove pod %s: %v", key, err)
		}
	}
	return &agentapi.Response{State: agentapi.StateRemoved}
}
