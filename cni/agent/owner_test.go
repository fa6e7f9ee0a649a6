package agent

import (
	"errors"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
)

func TestDecideUninstall(t *testing.T) {
	for _, tc := range []struct {
		observed ownerState
		live     liveState
		want     bool
	}{
		// The bug this guards: DaemonSet and its RBAC deleted together;
		// the watch saw the deletion, the API no longer answers.
		{ownerGone, liveUnreadable, true},
		{ownerGone, livePresent, true}, // replaced by a DaemonSet of the same name
		{ownerGone, liveGone, true},
		{ownerGone, liveNoOwner, true},
		// Deleted just before shutdown, event not delivered: the live read
		// decides.
		{ownerPresent, liveGone, true},
		{ownerUnknown, liveGone, true},
		// A restart or upgrade: stay installed, fail closed.
		{ownerPresent, livePresent, false},
		{ownerUnknown, livePresent, false},
		// Nothing seen and nothing readable: stay installed.
		{ownerPresent, liveUnreadable, false},
		{ownerUnknown, liveUnreadable, false},
		// Not a DaemonSet pod: never uninstall.
		{ownerUnknown, liveNoOwner, false},
		{ownerPresent, liveNoOwner, false},
	} {
		if got := decideUninstall(tc.observed, tc.live); got != tc.want {
			t.Errorf("observed %s, live %s: uninstall = %v, want %v", tc.observed, tc.live, got, tc.want)
		}
	}
}

func ds(uid string, deleting bool) *appsv1.DaemonSet {
	d := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "cni", Namespace: "sys", UID: types.UID(uid)}}
	if deleting {
		now := metav1.Now()
		d.DeletionTimestamp = &now
	}
	return d
}

func TestClassifyDaemonSet(t *testing.T) {
	gr := schema.GroupResource{Group: "apps", Resource: "daemonsets"}
	for _, tc := range []struct {
		name string
		ds   *appsv1.DaemonSet
		err  error
		want liveState
	}{
		{"present", ds("u1", false), nil, livePresent},
		{"being deleted", ds("u1", true), nil, liveGone},
		{"replaced", ds("u2", false), nil, liveGone},
		{"not found", nil, apierrors.NewNotFound(gr, "cni"), liveGone},
		{"forbidden", nil, apierrors.NewForbidden(gr, "cni", errors.New("RBAC gone")), liveUnreadable},
		{"unauthorized", nil, apierrors.NewUnauthorized("token of a deleted ServiceAccount"), liveUnreadable},
		{"network", nil, errors.New("connection refused"), liveUnreadable},
	} {
		if got, why := classifyDaemonSet(tc.ds, tc.err, "u1"); got != tc.want || why == "" {
			t.Errorf("%s: %s (%q), want %s", tc.name, got, why, tc.want)
		}
	}
}

func TestOwnerWatchRecordsDeletion(t *testing.T) {
	newWatch := func() *ownerWatch {
		w := &ownerWatch{}
		w.setOwner(ownerRef{name: "cni", uid: "u1"})
		return w
	}
	state := func(w *ownerWatch) ownerState { _, s, _ := w.get(); return s }

	w := newWatch()
	if state(w) != ownerUnknown {
		t.Fatalf("before any event: %s", state(w))
	}
	w.observe(ds("u1", false))
	if state(w) != ownerPresent {
		t.Fatalf("after add: %s", state(w))
	}
	w.observe(ds("u1", false)) // a rollout updates it
	if state(w) != ownerPresent {
		t.Fatalf("after update: %s", state(w))
	}
	w.deleted("deleted")
	if state(w) != ownerGone {
		t.Fatalf("after delete: %s", state(w))
	}
	// Gone is final: a new DaemonSet of the same name is not ours.
	w.observe(ds("u1", false))
	if _, s, why := w.get(); s != ownerGone || why != "deleted" {
		t.Errorf("after a later add: %s (%s)", s, why)
	}

	w = newWatch()
	w.observe(ds("u1", false))
	w.observe(ds("u1", true)) // foreground deletion, or a namespace going
	if _, s, why := w.get(); s != ownerGone || why != "being deleted" {
		t.Errorf("deletionTimestamp: %s (%s)", s, why)
	}

	w = newWatch()
	w.observe(ds("u2", false)) // deleted and recreated between two watches
	if state(w) != ownerGone {
		t.Errorf("replaced: %s", state(w))
	}
}

func TestDaemonSetOwner(t *testing.T) {
	pod := &v1.Pod{ObjectMeta: metav1.ObjectMeta{OwnerReferences: []metav1.OwnerReference{
		{APIVersion: "v1", Kind: "Node", Name: "node-0", UID: "n"},
		{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "istio-cni-node", UID: "u1"},
	}}}
	if o, ok := daemonSetOwner(pod); !ok || o.name != "istio-cni-node" || o.uid != "u1" {
		t.Errorf("owner %+v %v", o, ok)
	}
	pod.OwnerReferences = pod.OwnerReferences[:1]
	if _, ok := daemonSetOwner(pod); ok {
		t.Error("a pod without a DaemonSet owner has one")
	}
	pod.OwnerReferences = []metav1.OwnerReference{{APIVersion: "example.com/v1", Kind: "DaemonSet", Name: "x"}}
	if _, ok := daemonSetOwner(pod); ok {
		t.Error("a DaemonSet kind of another API group taken for apps/v1")
	}
}
