package kubelet

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	coordv1 "k8s.io/api/coordination/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"

	"golang.org/x/sys/unix"
)

const (
	// KubeletPort is where the kubelet API listens on the node IP.
	KubeletPort = 10250
	// KubeletVersion is what the Node reports (the sandbox's control plane).
	KubeletVersion = "v1.34.4"

	leaseNamespace      = "kube-node-lease"
	leaseDuration       = 40 * time.Second
	leaseRenewInterval  = 10 * time.Second
	nodeStatusInterval  = 60 * time.Second
	registerRetryPeriod = time.Second
)

// nodeCapacity is what each sandbox node offers the scheduler. The nodes
// share one small machine; generous numbers keep resource requests of real
// charts from leaving pods Pending, which is not what the sandbox tests.
var nodeCapacity = v1.ResourceList{
	v1.ResourceCPU:              resource.MustParse("32"),
	v1.ResourceMemory:           resource.MustParse("128Gi"),
	v1.ResourcePods:             resource.MustParse("110"),
	v1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
}

func hostCPUs() int64 { return int64(runtime.NumCPU()) }

// hostMemory is MemTotal from /proc/meminfo, in bytes (1 GiB if unknown).
func hostMemory() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 1 << 30
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "MemTotal:" {
			if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				return kb * 1024
			}
		}
	}
	return 1 << 30
}

func (k *Kubelet) nodeObject() *v1.Node {
	return &v1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.cfg.NodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname":  k.cfg.NodeName,
				"kubernetes.io/os":        "linux",
				"kubernetes.io/arch":      runtime.GOARCH,
				"beta.kubernetes.io/os":   "linux",
				"beta.kubernetes.io/arch": runtime.GOARCH,
			},
		},
		Spec: v1.NodeSpec{PodCIDR: k.cfg.PodCIDR, PodCIDRs: []string{k.cfg.PodCIDR}},
	}
}

// registerNode creates the Node (or adopts the one a previous run made)
// and posts a Ready status; it retries until the API server answers.
func (k *Kubelet) registerNode(ctx context.Context) error {
	for {
		err := k.tryRegisterNode(ctx)
		if err == nil {
			k.log.Info("node registered")
			return nil
		}
		k.log.Warn("register node; retrying", "err", err)
		if !sleepCtx(ctx, registerRetryPeriod) {
			return fmt.Errorf("register node %s: %w", k.cfg.NodeName, err)
		}
	}
}

func (k *Kubelet) tryRegisterNode(ctx context.Context) error {
	nodes := k.client.CoreV1().Nodes()
	_, err := nodes.Create(ctx, k.nodeObject(), metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create node: %w", err)
	}
	if apierrors.IsAlreadyExists(err) {
		existing, err := nodes.Get(ctx, k.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("get node: %w", err)
		}
		if existing.Spec.PodCIDR != "" && existing.Spec.PodCIDR != k.cfg.PodCIDR {
			return fmt.Errorf("node %s exists with podCIDR %s, config says %s", k.cfg.NodeName, existing.Spec.PodCIDR, k.cfg.PodCIDR)
		}
	}
	return k.updateNodeStatus(ctx)
}

// nodeStatus is the node's status as of now; conditions keep their
// transition times from old.
func (k *Kubelet) nodeStatus(old v1.NodeStatus, now time.Time) v1.NodeStatus {
	t := metav1.NewTime(now)
	conds := []v1.NodeCondition{
		{Type: v1.NodeMemoryPressure, Status: v1.ConditionFalse, Reason: "KubeletHasSufficientMemory", Message: "kubelet has sufficient memory available"},
		{Type: v1.NodeDiskPressure, Status: v1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", Message: "kubelet has no disk pressure"},
		{Type: v1.NodePIDPressure, Status: v1.ConditionFalse, Reason: "KubeletHasSufficientPID", Message: "kubelet has sufficient PID available"},
		{Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady", Message: "kubelet is posting ready status"},
	}
	for i := range conds {
		conds[i].LastHeartbeatTime = t
		conds[i].LastTransitionTime = t
		for _, o := range old.Conditions {
			if o.Type == conds[i].Type && o.Status == conds[i].Status {
				conds[i].LastTransitionTime = o.LastTransitionTime
			}
		}
	}
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	machineID, _ := os.ReadFile("/etc/machine-id")
	bootID, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return v1.NodeStatus{
		Capacity:    nodeCapacity.DeepCopy(),
		Allocatable: nodeCapacity.DeepCopy(),
		Conditions:  conds,
		// Only the InternalIP: the API server reaches the kubelet by the first
		// address type it prefers, and node names do not resolve here.
		Addresses:       []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: k.cfg.NodeIP}},
		DaemonEndpoints: v1.NodeDaemonEndpoints{KubeletEndpoint: v1.DaemonEndpoint{Port: KubeletPort}},
		NodeInfo: v1.NodeSystemInfo{
			MachineID:               strings.TrimSpace(string(machineID)),
			SystemUUID:              strings.TrimSpace(string(machineID)),
			BootID:                  strings.TrimSpace(string(bootID)),
			KernelVersion:           unix.ByteSliceToString(uts.Release[:]),
			OSImage:                 "meshlite sandbox node",
			ContainerRuntimeVersion: "sandbox://" + KubeletVersion,
			KubeletVersion:          KubeletVersion,
			OperatingSystem:         "linux",
			Architecture:            runtime.GOARCH,
		},
	}
}

func (k *Kubelet) updateNodeStatus(ctx context.Context) error {
	nodes := k.client.CoreV1().Nodes()
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		node, err := nodes.Get(ctx, k.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("get node: %w", err)
		}
		node.Status = k.nodeStatus(node.Status, time.Now())
		if _, err := nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update node status: %w", err)
		}
		return nil
	})
}

// heartbeat renews the node lease every 10 s and posts node status every
// minute, which is what the node lifecycle controller watches.
func (k *Kubelet) heartbeat(ctx context.Context) {
	leaseTick := time.NewTicker(leaseRenewInterval)
	defer leaseTick.Stop()
	statusTick := time.NewTicker(nodeStatusInterval)
	defer statusTick.Stop()
	k.renewLease(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-leaseTick.C:
			k.renewLease(ctx)
		case <-statusTick.C:
			if err := k.updateNodeStatus(ctx); err != nil && ctx.Err() == nil {
				k.log.Warn("node status heartbeat", "err", err)
			}
		}
	}
}

func (k *Kubelet) renewLease(ctx context.Context) {
	leases := k.client.CoordinationV1().Leases(leaseNamespace)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, k.cfg.NodeName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		lease = &coordv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: k.cfg.NodeName, Namespace: leaseNamespace},
			Spec: coordv1.LeaseSpec{
				HolderIdentity:       ptr.To(k.cfg.NodeName),
				LeaseDurationSeconds: ptr.To(int32(leaseDuration / time.Second)),
				RenewTime:            &now,
			},
		}
		if node, err := k.client.CoreV1().Nodes().Get(ctx, k.cfg.NodeName, metav1.GetOptions{}); err == nil {
			lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
		}
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
	case err == nil:
		lease.Spec.HolderIdentity = ptr.To(k.cfg.NodeName)
		lease.Spec.LeaseDurationSeconds = ptr.To(int32(leaseDuration / time.Second))
		lease.Spec.RenewTime = &now
		_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	}
	if err != nil && ctx.Err() == nil {
		k.log.Warn("renew node lease", "err", err)
	}
}
