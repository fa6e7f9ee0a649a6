package kubelet

import (
	"fmt"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// podSnapshot is what the runner knows of a pod at one moment, the input of
// computePodStatus.
type podSnapshot struct {
	sandboxReady bool
	sandboxErr   string
	podIPs       []string
	hostIP       string
	startTime    time.Time
	initDone     bool
	init         []ctrSnap
	ctrs         []ctrSnap
}

type ctrSnap struct {
	status  v1.ContainerStatus
	done    bool // will not run again
	sidecar bool
}

func (p *podRun) snapshot() podSnapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := podSnapshot{
		sandboxReady: p.sandboxReady,
		sandboxErr:   p.sandboxErr,
		podIPs:       append([]string(nil), p.podIPs...),
		hostIP:       p.r.cfg.NodeIP,
		startTime:    p.startTime,
		initDone:     p.initDone,
	}
	for _, c := range p.initCtrs {
		s.init = append(s.init, ctrSnap{status: c.status(), done: c.done, sidecar: c.isSidecar()})
	}
	for _, c := range p.ctrs {
		s.ctrs = append(s.ctrs, ctrSnap{status: c.status(), done: c.done})
	}
	return s
}

// everRan reports a container that has run at least once.
func everRan(st v1.ContainerStatus) bool {
	return st.State.Running != nil || st.State.Terminated != nil || st.LastTerminationState.Terminated != nil || st.RestartCount > 0
}

// podPhase follows the kubelet: Pending until every container has started
// once, Running while any runs or will restart, Succeeded/Failed when all
// are done.
func podPhase(pod *v1.Pod, s podSnapshot) v1.PodPhase {
	if !s.initDone {
		for _, c := range s.init {
			t := c.status.State.Terminated
			if !c.sidecar && c.done && t != nil && t.ExitCode != 0 && pod.Spec.RestartPolicy == v1.RestartPolicyNever {
				return v1.PodFailed
			}
		}
		return v1.PodPending
	}
	var running, waiting, succeeded, failed int
	for _, c := range s.ctrs {
		st := c.status
		switch {
		case st.State.Running != nil:
			running++
		case st.State.Terminated != nil && c.done:
			if st.State.Terminated.ExitCode == 0 {
				succeeded++
			} else {
				failed++
			}
		case everRan(st):
			running++ // restarting
		default:
			waiting++
		}
	}
	switch {
	case waiting > 0:
		return v1.PodPending
	case running > 0:
		return v1.PodRunning
	case failed > 0:
		return v1.PodFailed
	case succeeded > 0:
		return v1.PodSucceeded
	}
	return v1.PodPending
}

func isTerminal(phase v1.PodPhase) bool { return phase == v1.PodSucceeded || phase == v1.PodFailed }

// computePodStatus builds the status a kubelet would post, keeping from
// old what it does not own (conditions of other writers, qosClass) and the
// transition times of conditions that did not change.
func computePodStatus(pod *v1.Pod, old v1.PodStatus, s podSnapshot, now time.Time) v1.PodStatus {
	st := *old.DeepCopy()
	st.Phase = podPhase(pod, s)
	if old.Phase == v1.PodSucceeded || old.Phase == v1.PodFailed {
		st.Phase = old.Phase // terminal is final
	}
	st.HostIP = s.hostIP
	st.HostIPs = []v1.HostIP{{IP: s.hostIP}}
	if len(s.podIPs) > 0 {
		st.PodIP = s.podIPs[0]
		st.PodIPs = nil
		for _, ip := range s.podIPs {
			st.PodIPs = append(st.PodIPs, v1.PodIP{IP: ip})
		}
	}
	if !s.startTime.IsZero() && st.StartTime == nil {
		t := metav1.NewTime(s.startTime)
		st.StartTime = &t
	}
	st.ObservedGeneration = pod.Generation

	st.InitContainerStatuses = nil
	for _, c := range s.init {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.status)
	}
	st.ContainerStatuses = nil
	var unready []string
	for _, c := range s.ctrs {
		st.ContainerStatuses = append(st.ContainerStatuses, c.status)
		if !c.status.Ready {
			unready = append(unready, c.status.Name)
		}
	}
	for _, c := range s.init {
		if c.sidecar && !c.status.Ready {
			unready = append(unready, c.status.Name)
		}
	}

	cond := func(t v1.PodConditionType, ok bool, reason, msg string) v1.PodCondition {
		c := v1.PodCondition{Type: t, Status: v1.ConditionFalse, Reason: reason, Message: msg, ObservedGeneration: pod.Generation}
		if ok {
			c.Status, c.Reason, c.Message = v1.ConditionTrue, "", ""
		}
		return c
	}
	var conds []v1.PodCondition
	sandboxMsg := ""
	if !s.sandboxReady {
		sandboxMsg = s.sandboxErr
	}
	conds = append(conds, cond(v1.PodReadyToStartContainers, s.sandboxReady, "", sandboxMsg))
	var notInit []string
	if !s.initDone {
		for _, c := range s.init {
			if t := c.status.State.Terminated; t == nil || t.ExitCode != 0 {
				notInit = append(notInit, c.status.Name)
			}
		}
	}
	conds = append(conds, cond(v1.PodInitialized, s.initDone, "ContainersNotInitialized",
		fmt.Sprintf("containers with incomplete status: [%s]", strings.Join(notInit, " "))))

	ready := s.initDone && len(unready) == 0 && st.Phase == v1.PodRunning
	reason, msg := "ContainersNotReady", fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " "))
	if isTerminal(st.Phase) {
		reason, msg = "PodCompleted", ""
	}
	conds = append(conds, cond(v1.ContainersReady, ready, reason, msg))
	podReady := ready
	for _, g := range pod.Spec.ReadinessGates {
		if !conditionTrue(old.Conditions, g.ConditionType) {
			podReady = false
			if !isTerminal(st.Phase) {
				reason = "ReadinessGatesNotReady"
				msg = fmt.Sprintf("corresponding condition of pod readiness gate %q does not exist or is not True", g.ConditionType)
			}
		}
	}
	conds = append(conds, cond(v1.PodReady, podReady, reason, msg))

	st.Conditions = mergeConditions(old.Conditions, conds, now)
	return st
}

func conditionTrue(conds []v1.PodCondition, t v1.PodConditionType) bool {
	for _, c := range conds {
		if c.Type == t {
			return c.Status == v1.ConditionTrue
		}
	}
	return false
}

// ownedConditions are the pod conditions the kubelet writes.
var ownedConditions = map[v1.PodConditionType]bool{
	v1.PodReadyToStartContainers: true, v1.PodInitialized: true, v1.ContainersReady: true, v1.PodReady: true,
}

// mergeConditions replaces the owned conditions, keeps the others, and keeps
// a condition's transition time while its status does not change.
func mergeConditions(old, owned []v1.PodCondition, now time.Time) []v1.PodCondition {
	prev := map[v1.PodConditionType]v1.PodCondition{}
	var out []v1.PodCondition
	for _, c := range old {
		prev[c.Type] = c
		if !ownedConditions[c.Type] {
			out = append(out, c)
		}
	}
	for _, c := range owned {
		if p, ok := prev[c.Type]; ok && p.Status == c.Status {
			c.LastTransitionTime = p.LastTransitionTime
			c.LastProbeTime = p.LastProbeTime
		} else {
			c.LastTransitionTime = metav1.NewTime(now.Truncate(time.Second))
		}
		out = append(out, c)
	}
	order := map[v1.PodConditionType]int{
		v1.PodReadyToStartContainers: 0, v1.PodInitialized: 1, v1.PodReady: 2, v1.ContainersReady: 3, v1.PodScheduled: 4,
	}
	sort.SliceStable(out, func(i, j int) bool {
		oi, ok := order[out[i].Type]
		if !ok {
			oi = 5
		}
		oj, ok := order[out[j].Type]
		if !ok {
			oj = 5
		}
		return oi < oj
	})
	return out
}
