package kubelet

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// shutdownGrace caps the grace period of pods when the kubelet itself stops
// (sandbox down), so the node goes away promptly.
const shutdownGrace = 3 * time.Second

// podWorker owns one pod on this node: it drives the runner through the
// pod's life, posts its status and finalizes its deletion.
type podWorker struct {
	k    *Kubelet
	p    *podRun
	log  *slog.Logger
	gone atomic.Bool // the pod object is gone from the API server
	// fresh asks latestPod to read from the API server (after a conflict).
	fresh bool
}

func newPodWorker(k *Kubelet, pod *v1.Pod) *podWorker {
	p := k.r.newPodRun(pod)
	return &podWorker{k: k, p: p, log: p.log}
}

// run lives as long as the pod on this node (or until the kubelet stops).
func (w *podWorker) run(ctx context.Context) {
	p := w.p
	defer w.k.r.forget(p)
	pod := p.currentPod()

	podCtx, stopPod := context.WithCancel(context.Background())
	defer stopPod()
	lifecycleDone := make(chan struct{})
	// A pod already finished, or being deleted, before we saw it (kubelet
	// restart) is not started again.
	if isTerminal(pod.Status.Phase) || pod.DeletionTimestamp != nil {
		close(lifecycleDone)
	} else {
		w.log.Info("pod added")
		go func() {
			defer close(lifecycleDone)
			w.lifecycle(podCtx)
		}()
	}

	finished := lifecycleDone
	networkDown := false
	resync := time.NewTicker(10 * time.Second)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			grace := min(p.gracePeriod(), shutdownGrace)
			w.stop(stopPod, lifecycleDone, grace)
			w.cleanup()
			return
		case <-p.changed:
		case <-resync.C:
		case <-finished:
			finished = nil
		}
		pod = p.currentPod()
		if w.gone.Load() {
			w.log.Info("pod removed from the API server; stopping it")
			w.stop(stopPod, lifecycleDone, p.gracePeriod())
			w.cleanup()
			return
		}
		if pod.DeletionTimestamp != nil {
			w.log.Info("pod deleted; stopping it", "grace", p.gracePeriod())
			w.stop(stopPod, lifecycleDone, max(p.gracePeriod(), time.Second))
			w.syncStatus(ctx)
			w.finalize(ctx)
			w.cleanup()
			return
		}
		w.syncStatus(ctx)
		if finished == nil && !networkDown && podCtx.Err() == nil {
			// Every container is done: like a kubelet, release the sandbox
			// (IP, netns) but keep logs until the pod is deleted.
			p.teardownNetwork(context.WithoutCancel(ctx))
			networkDown = true
			w.log.Info("pod finished; network torn down", "phase", w.lastPhase())
		}
	}
}

func (w *podWorker) lastPhase() v1.PodPhase {
	return podPhase(w.p.currentPod(), w.p.snapshot())
}

// lifecycle sets the sandbox up (retrying) and runs the containers.
func (w *podWorker) lifecycle(ctx context.Context) {
	p := w.p
	for attempt := int32(1); ; attempt++ {
		err := p.setupSandbox(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		w.log.Warn("pod sandbox setup failed; retrying", "attempt", attempt, "err", err)
		w.k.event(p.currentPod(), v1.EventTypeWarning, "FailedCreatePodSandBox", fmt.Sprintf("Failed to create pod sandbox: %v", err))
		if !sleepCtx(ctx, restartBackoff(attempt, p.r.backoffBase, p.r.backoffMax)) {
			return
		}
	}
	p.run(ctx)
}

// stop ends the pod's processes: no more (re)starts, SIGTERM, SIGKILL after
// grace; then the network goes.
func (w *podWorker) stop(stopPod context.CancelFunc, lifecycleDone <-chan struct{}, grace time.Duration) {
	stopPod()
	w.p.killAll(grace)
	<-lifecycleDone
	w.p.teardownNetwork(context.Background())
}

func (w *podWorker) cleanup() {
	if err := w.p.removeDir(); err != nil {
		w.log.Warn("remove pod dir", "err", err)
	}
	w.k.mu.Lock()
	w.k.finished[w.p.uid] = true
	w.k.mu.Unlock()
	w.log.Info("pod cleaned up")
}

// finalize deletes the pod object with grace 0 once its containers are
// stopped, as a kubelet does to complete a graceful deletion.
func (w *podWorker) finalize(ctx context.Context) {
	pod := w.p.currentPod()
	zero := int64(0)
	for attempt := int32(1); ; attempt++ {
		err := w.k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: &zero,
			Preconditions:      metav1.NewUIDPreconditions(string(pod.UID)),
		})
		if err == nil || apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return
		}
		w.log.Warn("delete pod after stopping it", "err", err)
		if !sleepCtx(ctx, restartBackoff(attempt, time.Second, 10*time.Second)) {
			return
		}
	}
}

// syncStatus posts the pod's status when it differs from the API server's.
func (w *podWorker) syncStatus(ctx context.Context) {
	p := w.p
	snap := p.snapshot()
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		pod := w.latestPod(ctx)
		if pod == nil {
			return nil
		}
		st := computePodStatus(pod, pod.Status, snap, time.Now())
		if equality.Semantic.DeepEqual(st, pod.Status) {
			return nil
		}
		upd := pod.DeepCopy()
		upd.Status = st
		_, err := w.k.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			w.fresh = true
		}
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		w.log.Warn("update pod status", "err", err)
	}
}

// latestPod is the informer's copy of the pod, or a fresh one after a
// conflict (the cache lags behind our own writes).
func (w *podWorker) latestPod(ctx context.Context) *v1.Pod {
	cur := w.p.currentPod()
	if w.fresh {
		w.fresh = false
		pod, err := w.k.client.CoreV1().Pods(cur.Namespace).Get(ctx, cur.Name, metav1.GetOptions{})
		if err == nil && pod.UID == cur.UID {
			return pod
		}
		return nil
	}
	if w.k.podLister != nil {
		if pod, err := w.k.podLister.Pods(cur.Namespace).Get(cur.Name); err == nil && pod.UID == cur.UID {
			return pod
		}
	}
	return cur
}
