package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"

	"github.com/meshlite/meshlite/cni/netnsfind"
	"github.com/meshlite/meshlite/internal/kube"
)

func (a *Agent) enqueue(key string) { a.queue.Add(key) }

func (a *Agent) enqueueObj(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err == nil {
		a.enqueue(key)
	}
}

// namespaceChanged requeues the namespace's pods when its enrollment label
// changed.
func (a *Agent) namespaceChanged(oldObj, newObj any) {
	o, ok1 := oldObj.(*v1.Namespace)
	n, ok2 := newObj.(*v1.Namespace)
	if ok1 && ok2 && o.Labels[kube.LabelDataplaneMode] == n.Labels[kube.LabelDataplaneMode] {
		return
	}
	a.enqueueNamespace(newObj)
}

func (a *Agent) enqueueNamespace(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	ns, ok := obj.(*v1.Namespace)
	if !ok {
		return
	}
	pods, err := a.podLister.Pods(ns.Name).List(labels.Everything())
	if err != nil {
		return
	}
	for _, p := range pods {
		a.enqueue(p.Namespace + "/" + p.Name)
	}
}

func (a *Agent) processNext(ctx context.Context) bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	if err := a.reconcile(ctx, key); err != nil {
		if ctx.Err() != nil {
			return true
		}
		a.log.Warn("reconcile pod; will retry", "pod", key, "err", err, "attempt", a.queue.NumRequeues(key)+1)
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

// reconcileAll reconciles every pod on the node once, in the caller's
// goroutine; a pod that fails is retried by the workers.
func (a *Agent) reconcileAll(ctx context.Context) {
	pods, err := a.podLister.List(labels.Everything())
	if err != nil {
		a.log.Error("list the node's pods", "err", err)
		return
	}
	start := time.Now()
	for _, p := range pods {
		key := p.Namespace + "/" + p.Name
		if err := a.reconcile(ctx, key); err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Warn("reconcile pod; will retry", "pod", key, "err", err)
			a.queue.AddRateLimited(key)
			// Left out of the snapshot, a pod the last agent redirected
			// would be dropped by ztunnel, its traffic refused until the
			// retry: have ztunnel keep it meanwhile.
			if annotated(p) && a.state(string(p.UID)) == nil {
				a.mu.Lock()
				a.kept[key] = string(p.UID)
				a.mu.Unlock()
				a.zds.Keep(string(p.UID), workloadInfo(p))
			}
		}
	}
	a.log.Info("node's pods reconciled", "pods", len(pods), "took", time.Since(start).Round(time.Millisecond))
}

// settleKept ends the keep of pod key (see Agent.kept) once it is
// enrolled again (Add replaced it) or is gone, recreated, finished or no
// longer redirected (ztunnel is told to drop it).
func (a *Agent) settleKept(key string, pod *v1.Pod) {
	a.mu.Lock()
	uid, ok := a.kept[key]
	a.mu.Unlock()
	if !ok {
		return
	}
	switch {
	case pod != nil && string(pod.UID) == uid && !terminal(pod) && a.state(uid) != nil:
	case pod != nil && string(pod.UID) == uid && !terminal(pod) && annotated(pod):
		return // still failing: keep
	default:
		a.zds.Del(uid)
	}
	a.mu.Lock()
	delete(a.kept, key)
	a.mu.Unlock()
}

// reconcile brings one pod to what its labels ask for.
func (a *Agent) reconcile(ctx context.Context, key string) error {
	unlock := a.locks.lock(key)
	defer unlock()
	ns, name, _ := cutKey(key)
	pod, err := a.podLister.Pods(ns).Get(name)
	if err != nil && !isNotFound(err) {
		return err
	}
	defer a.settleKept(key, pod)
	// Forget what belongs to a pod that is gone, finished or recreated.
	for _, st := range a.statesFor(key) {
		if pod == nil || string(pod.UID) != st.uid || terminal(pod) {
			if err := a.unenroll(ctx, st, false); err != nil {
				a.log.Warn("forget pod", "pod", key, "err", err)
			}
		}
	}
	if pod == nil || terminal(pod) {
		return nil
	}
	nsObj, err := a.nsLister.Get(ns)
	if err != nil && !isNotFound(err) {
		return err
	}
	uid := string(pod.UID)
	want := a.wantEnrolled(pod, nsObj)
	st := a.state(uid)
	switch {
	case want && st == nil:
		ips := statusIPs(pod)
		if len(ips) == 0 {
			return nil // not started yet: its CNI ADD enrolls it
		}
		netns, err := a.finder.Find(ips, uid)
		if err != nil {
			if errors.Is(err, netnsfind.ErrNotFound) && pod.DeletionTimestamp != nil {
				return nil // going away
			}
			return fmt.Errorf("enroll running pod: %w", err)
		}
		a.log.Info("enrolling a running pod", "pod", key, "netns", netns.Name())
		if err := a.enroll(pod, netns, ips); err != nil {
			return err
		}
		st = a.state(uid)
	case !want && st != nil:
		return a.unenroll(ctx, st, true)
	case !want && annotated(pod):
		// Captured by an earlier agent and unlabelled since: clean up.
		return a.releaseOrphan(ctx, key, pod)
	}
	if want && st != nil && a.zds.Held(uid) && !annotated(pod) {
		if err := a.annotate(ctx, key, uid, true); err != nil {
			return err
		}
		a.log.Info("pod marked redirected", "pod", key)
	}
	return nil
}

// releaseOrphan removes the rules and the annotation of a pod that an
// earlier agent captured and that is no longer enrolled.
func (a *Agent) releaseOrphan(ctx context.Context, key string, pod *v1.Pod) error {
	if ips := statusIPs(pod); len(ips) > 0 {
		netns, err := a.finder.Find(ips, string(pod.UID))
		if err == nil {
			err = a.podRules.Remove(netns)
			netns.Close()
			if err != nil {
				return err
			}
		} else if !errors.Is(err, netnsfind.ErrNotFound) {
			return err
		}
		for _, ip := range ips {
			a.hostRules.DelPod(ip)
		}
	}
	if err := a.annotate(ctx, key, string(pod.UID), false); err != nil {
		return err
	}
	a.log.Info("pod un-enrolled (captured before this agent started)", "pod", key)
	return nil
}

// watchHeld requeues enrolled pods whenever ztunnel's holdings change, so
// the annotation follows.
func (a *Agent) watchHeld(ctx context.Context) error {
	for {
		ch := a.zds.Changed()
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		}
		// Coalesce bursts (a snapshot acks many pods).
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(50 * time.Millisecond):
		}
		for _, k := range a.keys() {
			a.enqueue(k)
		}
	}
}

// gcProbeSet drops IPs of pods the agent no longer holds from the probe
// set (left by pods that went while the agent was down).
func (a *Agent) gcProbeSet(ctx context.Context) error {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		members, err := a.hostRules.Members()
		if err != nil {
			a.log.Warn("list the probe SNAT set", "err", err)
			continue
		}
		keep := map[netip.Addr]bool{}
		a.mu.Lock()
		for _, st := range a.pods {
			for _, ip := range st.ips {
				keep[ip] = true
			}
		}
		a.mu.Unlock()
		for _, m := range members {
			if !keep[m] {
				if err := a.hostRules.DelPod(m); err == nil {
					a.log.Info("removed a stale IP from the probe SNAT set", "ip", m)
				}
			}
		}
	}
}

// verifyRules checks every enrolled pod's rules each VerifyInterval and
// re-applies them where they drifted (someone flushed a chain, say).
func (a *Agent) verifyRules(ctx context.Context) error {
	t := time.NewTicker(a.cfg.VerifyInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		for _, key := range a.keys() {
			unlock := a.locks.lock(key)
			for _, st := range a.statesFor(key) {
				if st.netns == nil {
					continue
				}
				err := a.podRules.Check(st.netns)
				if err == nil {
					continue
				}
				a.log.Warn("in-pod rules drifted; re-applying", "pod", key, "err", err)
				if err := a.podRules.Apply(st.netns); err != nil {
					a.log.Error("re-apply in-pod rules", "pod", key, "err", err)
				}
			}
			unlock()
		}
	}
}
