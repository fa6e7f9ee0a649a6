package sandbox

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/cluster/manifest"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/internal/nsenter"
)

// Sandbox is a running sandbox cluster.
type Sandbox struct {
	Dir    string
	State  State
	Plan   netlab.Plan
	Layout cluster.Layout

	rc      *rest.Config
	cs      *kubernetes.Clientset
	applier *manifest.Applier
	log     *slog.Logger
}

// Open attaches to the sandbox whose state is in dir (it does not check
// its health; see Healthy).
func Open(dir string, log *slog.Logger) (*Sandbox, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir = absDir(dir)
	st, err := loadState(dir)
	if err != nil {
		return nil, fmt.Errorf("open sandbox in %s: %w", dir, err)
	}
	return open(dir, st, log)
}

func open(dir string, st *State, log *slog.Logger) (*Sandbox, error) {
	sb := &Sandbox{Dir: dir, State: *st, Plan: planFor(st), Layout: cluster.LayoutOf(dir), log: log}
	rc, err := cluster.RESTConfig(sb.Layout.AdminKubeconfig)
	if err != nil {
		return nil, err
	}
	sb.rc = rc
	if sb.cs, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	if sb.applier, err = manifest.NewApplier(rc, "meshlite-sandbox-test"); err != nil {
		return nil, err
	}
	return sb, nil
}

func planFor(st *State) netlab.Plan {
	p := netlab.PlanFor(st.Instance, st.Nodes)
	if st.Prefix != "" {
		p.Prefix = st.Prefix
	}
	return p
}

// Kubeconfig is the admin kubeconfig's path (kubectl --kubeconfig).
func (s *Sandbox) Kubeconfig() string { return s.Layout.AdminKubeconfig }

// RESTConfig returns a copy of the admin client configuration.
func (s *Sandbox) RESTConfig() *rest.Config { return rest.CopyConfig(s.rc) }

// Client is an admin clientset.
func (s *Sandbox) Client() kubernetes.Interface { return s.cs }

// NodeName is node i's name.
func (s *Sandbox) NodeName(i int) string { return s.Plan.NodeName(i) }

// NodeDir is node i's directory (kubelet config, root, pods).
func (s *Sandbox) NodeDir(i int) string { return filepath.Join(s.Dir, "nodes", s.Plan.NodeName(i)) }

// NodeRoot is node i's root directory layout (hostPath volumes resolve
// under it).
func (s *Sandbox) NodeRoot(i int) netlab.NodeRoot {
	return netlab.NodeRootAt(filepath.Join(s.NodeDir(i), "root"))
}

// Apply server-side-applies the objects in a YAML (multi-document) string
// and returns them as stored.
func (s *Sandbox) Apply(ctx context.Context, yaml string) ([]*unstructured.Unstructured, error) {
	return s.applier.ApplyYAML(ctx, []byte(yaml))
}

// Delete deletes the objects in a YAML string (absent ones are fine).
func (s *Sandbox) Delete(ctx context.Context, yaml string) error {
	objs, err := manifest.Decode([]byte(yaml))
	if err != nil {
		return err
	}
	return s.applier.Delete(ctx, objs...)
}

// WaitFor polls cond until it returns true, returns an error, or timeout
// passes; what names the condition in the error.
func (s *Sandbox) WaitFor(ctx context.Context, timeout time.Duration, what string, cond func(context.Context) (bool, error)) error {
	return WaitFor(ctx, timeout, what, cond)
}

// WaitFor polls cond every 100ms until it returns true, returns an error,
// or timeout passes.
func WaitFor(ctx context.Context, timeout time.Duration, what string, cond func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ok, err := cond(ctx)
		if err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: not true after %v", what, timeout)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// WaitPodsRunning waits until exactly n pods match selector in namespace
// ns, each Running and Ready with an IP, and returns them.
func (s *Sandbox) WaitPodsRunning(ctx context.Context, ns, selector string, n int, timeout time.Duration) ([]corev1.Pod, error) {
	var pods []corev1.Pod
	var last string
	err := s.WaitFor(ctx, timeout, fmt.Sprintf("%d running pods %q in %s", n, selector, ns), func(ctx context.Context) (bool, error) {
		l, err := s.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, nil // the apiserver may be briefly busy; keep polling
		}
		pods = pods[:0]
		last = ""
		for _, p := range l.Items {
			if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && podReady(&p) {
				pods = append(pods, p)
			} else {
				last += fmt.Sprintf(" %s=%s", p.Name, p.Status.Phase)
			}
		}
		return len(pods) == n && last == "", nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w (not running:%s)", err, last)
	}
	return pods, nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// PodNetnsName is the name of the network namespace kubelet-lite made for
// the pod with uid.
func (s *Sandbox) PodNetnsName(uid string) string { return s.Plan.Prefix + "-pod-" + uid }

// PodNetns returns the path of the running pod ns/name's network namespace.
func (s *Sandbox) PodNetns(ctx context.Context, ns, name string) (string, error) {
	p, err := s.cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get pod %s/%s: %w", ns, name, err)
	}
	if p.Spec.HostNetwork {
		for i := 0; i < s.Plan.Nodes; i++ {
			if s.Plan.NodeName(i) == p.Spec.NodeName {
				return netlab.NetnsPath(s.Plan.NodeNetns(i)), nil
			}
		}
		return "", fmt.Errorf("pod %s/%s: host-network pod on unknown node %q", ns, name, p.Spec.NodeName)
	}
	return netlab.NetnsPath(s.PodNetnsName(string(p.UID))), nil
}

// Dial opens a TCP connection to addr (an IP literal and port) from inside
// the network namespace of pod ns/name.
func (s *Sandbox) Dial(ctx context.Context, ns, name, addr string) (net.Conn, error) {
	path, err := s.PodNetns(ctx, ns, name)
	if err != nil {
		return nil, err
	}
	var c net.Conn
	err = nsenter.DoPath(path, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from pod %s/%s: %w", addr, ns, name, err)
	}
	return c, nil
}
