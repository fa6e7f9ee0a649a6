package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8stypes "k8s.io/apimachinery/pkg/types"

	"github.com/meshlite/meshlite/internal/kube"
	pb "github.com/meshlite/meshlite/proto/zds"
)

// wantEnrolled decides capture: the namespace or pod says ambient, the pod
// does not say none, it has its own netns and its namespace is not
// excluded.
func (a *Agent) wantEnrolled(pod *v1.Pod, ns *v1.Namespace) bool {
	if hostNetwork(pod) || a.excluded(pod.Namespace) {
		return false
	}
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Labels
	}
	return kube.AmbientEnrolled(nsLabels, pod.Labels)
}

func (a *Agent) excluded(ns string) bool {
	if len(a.cfg.CaptureNamespaces) > 0 && !slices.Contains(a.cfg.CaptureNamespaces, ns) {
		return true
	}
	return slices.Contains(a.cfg.ExcludeNamespaces, ns)
}

func terminal(p *v1.Pod) bool {
	return p.Status.Phase == v1.PodSucceeded || p.Status.Phase == v1.PodFailed
}

func workloadInfo(p *v1.Pod) *pb.WorkloadInfo {
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return &pb.WorkloadInfo{Name: p.Name, Namespace: p.Namespace, ServiceAccount: sa}
}

func statusIPs(p *v1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	if len(out) == 0 && p.Status.PodIP != "" {
		if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// lookup finds a pod and its namespace: from the informers, or from the API
// server for a pod the informer has not seen yet (a CNI ADD can come first).
// uid, when set, must match.
func (a *Agent) lookup(ctx context.Context, namespace, name, uid string) (*v1.Pod, *v1.Namespace, error) {
	pod, err := a.podLister.Pods(namespace).Get(name)
	if err != nil || !sameUID(pod, uid) {
		pod, err = a.kube.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
		}
		if !sameUID(pod, uid) {
			return nil, nil, fmt.Errorf("pod %s/%s has uid %s, not %s (recreated?)", namespace, name, pod.UID, uid)
		}
	}
	ns, err := a.nsLister.Get(namespace)
	if err != nil {
		ns, err = a.kube.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
		if err != nil {
			return nil, nil, fmt.Errorf("get namespace %s: %w", namespace, err)
		}
	}
	return pod, ns, nil
}

// annotationMirror on a static pod's mirror holds the static pod's uid,
// which is what the runtime passes the plugin.
const annotationMirror = "kubernetes.io/config.mirror"

// sameUID reports whether p is the pod the runtime calls uid.
func sameUID(p *v1.Pod, uid string) bool {
	return uid == "" || string(p.UID) == uid || (p.Annotations[annotationMirror] != "" && p.Annotations[annotationMirror] == uid)
}

// enroll redirects the pod's traffic inside netns and hands the pod to
// ztunnel. It takes ownership of netns (also on error). Call with the
// pod's key lock held.
func (a *Agent) enroll(pod *v1.Pod, netns *os.File, ips []netip.Addr) error {
	uid := string(pod.UID)
	log := a.log.With("pod", pod.Namespace+"/"+pod.Name, "uid", uid)
	if !isNetns(netns) {
		netns.Close()
		return fmt.Errorf("enroll pod %s/%s: %s is not a network namespace", pod.Namespace, pod.Name, netns.Name())
	}
	if err := a.podRules.Apply(netns); err != nil {
		netns.Close()
		a.metrics.enrollErrors.Inc()
		return fmt.Errorf("enroll pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	for _, ip := range ips {
		if err := a.hostRules.AddPod(ip, uid); err != nil {
			// Probes may fail, traffic is still captured: degraded, not fatal.
			log.Warn("add pod to the probe SNAT set", "ip", ip, "err", err)
		}
	}
	info := workloadInfo(pod)
	if err := a.zds.Add(uid, info, netns); err != nil {
		netns.Close()
		a.metrics.enrollErrors.Inc()
		return fmt.Errorf("enroll pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	a.mu.Lock()
	if old := a.pods[uid]; old != nil {
		old.close()
	}
	a.pods[uid] = &podState{key: pod.Namespace + "/" + pod.Name, uid: uid, info: info, ips: ips, netns: netns}
	a.mu.Unlock()
	log.Info("pod enrolled: traffic redirected, handed to ztunnel", "ips", ips, "ztunnelHolds", a.zds.Held(uid))
	return nil
}

// unenroll takes a pod out of the mesh: in-pod rules (when removeRules;
// not for a pod whose netns is going away), probe set, ZDS, state and the
// redirection annotation. Call with the pod's key lock held.
func (a *Agent) unenroll(ctx context.Context, st *podState, removeRules bool) error {
	log := a.log.With("pod", st.key, "uid", st.uid)
	var errs []error
	if removeRules && st.netns != nil {
		if err := a.podRules.Remove(st.netns); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ip := range st.ips {
		if err := a.hostRules.DelPod(ip); err != nil {
			errs = append(errs, err)
		}
	}
	a.zds.Del(st.uid)
	a.mu.Lock()
	if a.pods[st.uid] == st {
		delete(a.pods, st.uid)
	}
	a.mu.Unlock()
	st.close()
	if removeRules {
		if err := a.annotate(ctx, st.key, st.uid, false); err != nil {
			errs = append(errs, err)
		}
		log.Info("pod un-enrolled: rules removed, DelWorkload sent")
	} else {
		log.Info("pod forgotten: DelWorkload sent")
	}
	return errors.Join(errs...)
}

// annotate sets (or removes) ambient.istio.io/redirection=enabled. A pod
// that is gone, or was recreated with another uid, is left alone.
func (a *Agent) annotate(ctx context.Context, key, uid string, enabled bool) error {
	ns, name, _ := cutKey(key)
	var value any // nil removes it
	if enabled {
		value = kube.RedirectionEnabled
	}
	patch := map[string]any{"metadata": map[string]any{
		"annotations": map[string]any{kube.AnnotationRedirection: value},
	}}
	if uid != "" {
		// The precondition makes the patch fail on a recreated pod.
		patch["metadata"].(map[string]any)["uid"] = uid
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	_, err = a.kube.CoreV1().Pods(ns).Patch(ctx, name, k8stypes.MergePatchType, b, metav1.PatchOptions{})
	switch {
	case err == nil, isNotFound(err):
		return nil
	case uid != "" && (apierrors.IsInvalid(err) || apierrors.IsConflict(err)):
		// The uid precondition failed: the pod was recreated; its own
		// reconcile sets its annotation.
		a.log.Debug("not annotating a recreated pod", "pod", key, "uid", uid)
		return nil
	}
	return fmt.Errorf("annotate pod %s (%s=%v): %w", key, kube.AnnotationRedirection, enabled, err)
}

func cutKey(key string) (ns, name string, ok bool) {
	for i := 0; i < len(key); i++ {
		if key[i] == '/' {
			return key[:i], key[i+1:], true
		}
	}
	return "", key, false
}

func annotated(p *v1.Pod) bool {
	return p.Annotations[kube.AnnotationRedirection] == kube.RedirectionEnabled
}
