package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// The agent tells an uninstall (its DaemonSet deleted: unchain and release
// every pod) from a restart or upgrade (keep everything, fail closed). It
// cannot rely on reading the API at shutdown alone: `kubectl delete -f`, or
// deleting the namespace, removes the agent's ServiceAccount and RBAC along
// with the DaemonSet, and then every read fails. So the agent learns its
// DaemonSet from its own pod at start, watches it while it runs, and at
// shutdown trusts a deletion it saw over an API it can no longer read.

// ownerState is what the watch saw of the agent's DaemonSet.
type ownerState int

const (
	// ownerUnknown: not watched (yet): no pod name, the pod or its owner
	// not readable at start, or the watch not synced.
	ownerUnknown ownerState = iota
	// ownerPresent: watched, and present and not being deleted.
	ownerPresent
	// ownerGone: seen deleted, being deleted, or replaced by another
	// DaemonSet of the same name. Final.
	ownerGone
)

func (s ownerState) String() string {
	switch s {
	case ownerPresent:
		return "present"
	case ownerGone:
		return "gone"
	}
	return "unknown"
}

// liveState is what a read of the API at shutdown says.
type liveState int

const (
	// liveUnreadable: the pod or DaemonSet could not be read.
	liveUnreadable liveState = iota
	// liveNoOwner: the agent is not run by a DaemonSet (or has no pod name).
	liveNoOwner
	// livePresent: the DaemonSet is there and not being deleted.
	livePresent
	// liveGone: not found, being deleted, or another uid.
	liveGone
)

func (s liveState) String() string {
	switch s {
	case liveNoOwner:
		return "no DaemonSet owner"
	case livePresent:
		return "present"
	case liveGone:
		return "gone"
	}
	return "unreadable"
}

// decideUninstall is the shutdown decision. A deletion seen during the
// agent's life wins, whatever the API answers now; otherwise only a live
// read that finds the DaemonSet gone uninstalls. Anything else (present,
// unreadable, not a DaemonSet pod) stays installed: enrolled pods stay
// captured until an agent is back.
func decideUninstall(observed ownerState, live liveState) bool {
	return observed == ownerGone || live == liveGone
}

// ownerRef is the agent's owning DaemonSet.
type ownerRef struct {
	name string
	uid  types.UID
}

// daemonSetOwner finds the DaemonSet among a pod's ownerReferences.
func daemonSetOwner(pod *v1.Pod) (ownerRef, bool) {
	for _, o := range pod.OwnerReferences {
		if o.Kind == "DaemonSet" && (o.APIVersion == "" || o.APIVersion == appsv1.SchemeGroupVersion.String()) {
			return ownerRef{name: o.Name, uid: o.UID}, true
		}
	}
	return ownerRef{}, false
}

// classifyDaemonSet is what one read of the DaemonSet (the object, or the
// error of the read) says about the owner with uid.
func classifyDaemonSet(ds *appsv1.DaemonSet, err error, uid types.UID) (liveState, string) {
	switch {
	case isNotFound(err):
		return liveGone, "not found"
	case err != nil:
		return liveUnreadable, err.Error()
	case ds.UID != uid:
		return liveGone, fmt.Sprintf("replaced (uid %s, ours %s)", ds.UID, uid)
	case ds.DeletionTimestamp != nil:
		return liveGone, "being deleted"
	}
	return livePresent, "present"
}

// ownerWatch records what the watch saw of the owning DaemonSet.
type ownerWatch struct {
	mu     sync.Mutex
	owner  ownerRef
	state  ownerState
	reason string
}

func (w *ownerWatch) get() (ownerRef, ownerState, string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.owner, w.state, w.reason
}

func (w *ownerWatch) setOwner(o ownerRef) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.owner = o
}

// observe records a DaemonSet the watch delivered (added or updated);
// gone is final.
func (w *ownerWatch) observe(ds *appsv1.DaemonSet) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state == ownerGone {
		return
	}
	switch st, why := classifyDaemonSet(ds, nil, w.owner.uid); st {
	case liveGone:
		w.state, w.reason = ownerGone, why
	case livePresent:
		w.state, w.reason = ownerPresent, why
	}
}

// deleted records the DaemonSet's deletion. A deletion of another
// DaemonSet of the same name also means ours is gone (it had been
// replaced).
func (w *ownerWatch) deleted(why string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state != ownerGone {
		w.state, w.reason = ownerGone, why
	}
}

// watchOwner learns the owning DaemonSet from the agent's pod (retrying
// until runCtx ends) and then watches it until watchCtx ends. The watch
// outlives runCtx on purpose, so that an event still arriving while the
// agent shuts down counts.
func (a *Agent) watchOwner(runCtx, watchCtx context.Context) {
	ns, podName := a.cfg.PodNamespace, a.cfg.PodName
	var owner ownerRef
	for backoff := 500 * time.Millisecond; ; backoff = min(2*backoff, 15*time.Second) {
		pod, err := a.kube.CoreV1().Pods(ns).Get(runCtx, podName, metav1.GetOptions{})
		if err == nil {
			var ok bool
			if owner, ok = daemonSetOwner(pod); !ok {
				a.log.Info("own pod has no DaemonSet owner: will never uninstall on exit", "pod", ns+"/"+podName)
				return
			}
			break
		}
		a.log.Warn("cannot read own pod to learn its DaemonSet; retrying", "pod", ns+"/"+podName, "err", err)
		select {
		case <-runCtx.Done():
			return
		case <-time.After(backoff):
		}
	}
	a.owner.setOwner(owner)

	factory := informers.NewSharedInformerFactoryWithOptions(a.kube, 0,
		informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", owner.name).String()
		}))
	inf := factory.Apps().V1().DaemonSets().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if ds, ok := obj.(*appsv1.DaemonSet); ok {
				a.owner.observe(ds)
			}
		},
		UpdateFunc: func(_, obj any) {
			if ds, ok := obj.(*appsv1.DaemonSet); ok {
				a.owner.observe(ds)
			}
		},
		DeleteFunc: func(any) { a.owner.deleted("deleted") },
	}); err != nil {
		a.log.Error("cannot watch own DaemonSet", "err", err)
		return
	}
	go inf.Run(watchCtx.Done())
	if !cache.WaitForCacheSync(watchCtx.Done(), inf.HasSynced) {
		return
	}
	if _, exists, _ := inf.GetStore().GetByKey(ns + "/" + owner.name); !exists {
		// Deleted before the agent got to watch it.
		a.owner.deleted("not found when the watch started")
	}
	_, st, why := a.owner.get()
	a.log.Info("watching own DaemonSet", "daemonset", owner.name, "uid", string(owner.uid), "state", st.String(), "reason", why)
}

// liveOwnerState reads the owning DaemonSet now: by the name and uid
// learnt at start, or else through the agent's pod.
func (a *Agent) liveOwnerState(ctx context.Context, owner ownerRef) (liveState, string) {
	if owner.name == "" {
		pod, err := a.kube.CoreV1().Pods(a.cfg.PodNamespace).Get(ctx, a.cfg.PodName, metav1.GetOptions{})
		if err != nil {
			return liveUnreadable, "own pod: " + err.Error()
		}
		var ok bool
		if owner, ok = daemonSetOwner(pod); !ok {
			return liveNoOwner, "own pod has no DaemonSet owner"
		}
	}
	ds, err := a.kube.AppsV1().DaemonSets(a.cfg.PodNamespace).Get(ctx, owner.name, metav1.GetOptions{})
	return classifyDaemonSet(ds, err, owner.uid)
}

// shouldUninstall is true when the agent's DaemonSet was seen deleted
// during its life, or is found deleted (or being deleted) now; a restart,
// an upgrade or a node drain leaves it installed, and so does an API it
// cannot read without having seen a deletion (fail closed).
func (a *Agent) shouldUninstall(ctx context.Context) bool {
	if a.cfg.PodName == "" || a.cfg.PodNamespace == "" {
		return false
	}
	owner, observed, why := a.owner.get()
	live, liveWhy := liveUnreadable, ""
	if observed != ownerGone {
		live, liveWhy = a.liveOwnerState(ctx, owner)
		// The watch may have delivered the deletion meanwhile.
		owner, observed, why = a.owner.get()
	}
	uninstall := decideUninstall(observed, live)
	log := a.log.With("daemonset", owner.name, "observed", observed.String(), "observedReason", why)
	if liveWhy != "" {
		log = log.With("live", live.String(), "liveReason", liveWhy)
	}
	switch {
	case uninstall:
		log.Info("own DaemonSet is gone: uninstalling")
	case live == liveUnreadable:
		log.Warn("cannot read own DaemonSet and saw no deletion; staying installed")
	default:
		log.Info("own DaemonSet is still there: staying installed")
	}
	return uninstall
}
