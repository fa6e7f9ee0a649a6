package kubelet

import (
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func running(name string, ready bool) ctrSnap {
	return ctrSnap{status: v1.ContainerStatus{Name: name, Ready: ready, State: v1.ContainerState{Running: &v1.ContainerStateRunning{}}}}
}

func terminated(name string, code int32, done bool) ctrSnap {
	return ctrSnap{done: done, status: v1.ContainerStatus{Name: name, State: v1.ContainerState{Terminated: &v1.ContainerStateTerminated{ExitCode: code}}}}
}

func waiting(name string, restarts int32) ctrSnap {
	return ctrSnap{status: v1.ContainerStatus{Name: name, RestartCount: restarts, State: v1.ContainerState{Waiting: &v1.ContainerStateWaiting{Reason: "X"}}}}
}

func TestPodPhase(t *testing.T) {
	cases := []struct {
		name   string
		policy v1.RestartPolicy
		snap   podSnapshot
		want   v1.PodPhase
	}{
		{"nothing started", v1.RestartPolicyAlways, podSnapshot{initDone: true, ctrs: []ctrSnap{waiting("a", 0)}}, v1.PodPending},
		{"one running one not yet", v1.RestartPolicyAlways, podSnapshot{initDone: true, ctrs: []ctrSnap{running("a", true), waiting("b", 0)}}, v1.PodPending},
		{"all running", v1.RestartPolicyAlways, podSnapshot{initDone: true, ctrs: []ctrSnap{running("a", true), running("b", false)}}, v1.PodRunning},
		{"crash looping counts as running", v1.RestartPolicyAlways, podSnapshot{initDone: true, ctrs: []ctrSnap{waiting("a", 3)}}, v1.PodRunning},
		{"exited, will restart", v1.RestartPolicyAlways, podSnapshot{initDone: true, ctrs: []ctrSnap{terminated("a", 1, false)}}, v1.PodRunning},
		{"all succeeded", v1.RestartPolicyNever, podSnapshot{initDone: true, ctrs: []ctrSnap{terminated("a", 0, true), terminated("b", 0, true)}}, v1.PodSucceeded},
		{"one failed", v1.RestartPolicyNever, podSnapshot{initDone: true, ctrs: []ctrSnap{terminated("a", 0, true), terminated("b", 2, true)}}, v1.PodFailed},
		{"one still running", v1.RestartPolicyNever, podSnapshot{initDone: true, ctrs: []ctrSnap{terminated("a", 2, true), running("b", true)}}, v1.PodRunning},
		{"init running", v1.RestartPolicyAlways, podSnapshot{init: []ctrSnap{running("i", false)}, ctrs: []ctrSnap{waiting("a", 0)}}, v1.PodPending},
		{"init failed, never restart", v1.RestartPolicyNever, podSnapshot{init: []ctrSnap{terminated("i", 1, true)}, ctrs: []ctrSnap{waiting("a", 0)}}, v1.PodFailed},
		{"init failed, will retry", v1.RestartPolicyOnFailure, podSnapshot{init: []ctrSnap{terminated("i", 1, false)}, ctrs: []ctrSnap{waiting("a", 0)}}, v1.PodPending},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			pod.Spec.RestartPolicy = tc.policy
			if got := podPhase(pod, tc.snap); got != tc.want {
				t.Fatalf("phase = %s, want %s", got, tc.want)
			}
		})
	}
}

func condition(st v1.PodStatus, typ v1.PodConditionType) *v1.PodCondition {
	for i := range st.Conditions {
		if st.Conditions[i].Type == typ {
			return &st.Conditions[i]
		}
	}
	return nil
}

func TestComputePodStatus_ConditionsAndPreservation(t *testing.T) {
	pod := testPod()
	pod.Spec.RestartPolicy = v1.RestartPolicyAlways
	earlier := metav1.NewTime(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
	old := v1.PodStatus{
		Phase:    v1.PodPending,
		QOSClass: v1.PodQOSBestEffort,
		Conditions: []v1.PodCondition{
			{Type: v1.PodScheduled, Status: v1.ConditionTrue, LastTransitionTime: earlier},
			{Type: v1.PodReadyToStartContainers, Status: v1.ConditionTrue, LastTransitionTime: earlier},
		},
	}
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	snap := podSnapshot{
		sandboxReady: true, podIPs: []string{"10.244.1.9"}, hostIP: "172.30.0.11",
		startTime: now.Add(-time.Minute), initDone: true,
		ctrs: []ctrSnap{running("a", true), running("b", false)},
	}
	st := computePodStatus(pod, old, snap, now)
	if st.Phase != v1.PodRunning || st.PodIP != "10.244.1.9" || st.HostIP != "172.30.0.11" || st.QOSClass != v1.PodQOSBestEffort {
		t.Fatalf("status = %+v", st)
	}
	if c := condition(st, v1.PodScheduled); c == nil || !c.LastTransitionTime.Equal(&earlier) {
		t.Fatal("PodScheduled (not ours) must be kept as is")
	}
	if c := condition(st, v1.PodReadyToStartContainers); c.Status != v1.ConditionTrue || !c.LastTransitionTime.Equal(&earlier) {
		t.Fatal("an unchanged condition keeps its transition time")
	}
	ready := condition(st, v1.PodReady)
	if ready.Status != v1.ConditionFalse || ready.Reason != "ContainersNotReady" || ready.Message != "containers with unready status: [b]" {
		t.Fatalf("Ready = %+v", ready)
	}
	// b becomes ready: Ready flips, at the new time.
	snap.ctrs[1] = running("b", true)
	st2 := computePodStatus(pod, st, snap, now.Add(time.Minute))
	if c := condition(st2, v1.PodReady); c.Status != v1.ConditionTrue || !c.LastTransitionTime.Time.Equal(now.Add(time.Minute)) {
		t.Fatalf("Ready after b ready = %+v", c)
	}
	if c := condition(st2, v1.ContainersReady); c.Status != v1.ConditionTrue {
		t.Fatal("ContainersReady must be True")
	}
	// Terminal is final even if a later snapshot looks different.
	term := st2
	term.Phase = v1.PodSucceeded
	if got := computePodStatus(pod, term, snap, now); got.Phase != v1.PodSucceeded {
		t.Fatalf("terminal phase changed to %s", got.Phase)
	}
}

func TestComputePodStatus_ReadinessGates(t *testing.T) {
	pod := testPod()
	pod.Spec.ReadinessGates = []v1.PodReadinessGate{{ConditionType: "example.com/lb"}}
	snap := podSnapshot{sandboxReady: true, initDone: true, ctrs: []ctrSnap{running("a", true)}}
	st := computePodStatus(pod, v1.PodStatus{}, snap, time.Now())
	if c := condition(st, v1.PodReady); c.Status != v1.ConditionFalse || c.Reason != "ReadinessGatesNotReady" {
		t.Fatalf("Ready without gate condition = %+v", c)
	}
	withGate := v1.PodStatus{Conditions: []v1.PodCondition{{Type: "example.com/lb", Status: v1.ConditionTrue}}}
	st = computePodStatus(pod, withGate, snap, time.Now())
	if c := condition(st, v1.PodReady); c.Status != v1.ConditionTrue {
		t.Fatalf("Ready with gate True = %+v", c)
	}
	if condition(st, "example.com/lb") == nil {
		t.Fatal("gate condition must be kept")
	}
}
