package deploytest

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

// meshLogs follows the log of every mesh pod while a rollout replaces
// them: a deleted pod's log is gone with it, and a failed connection
// during an upgrade is explained only by the pods that were stopping.
type meshLogs struct {
	mu   sync.Mutex
	logs map[string]*strings.Builder // "pod (node)" -> log
	wg   sync.WaitGroup
}

// followMeshLogs polls the mesh namespace and follows each running pod's
// first container until ctx ends.
func followMeshLogs(ctx context.Context, sb *sandbox.Sandbox) *meshLogs {
	m := &meshLogs{logs: map[string]*strings.Builder{}}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		for ctx.Err() == nil {
			l, err := sb.Client().CoreV1().Pods(meshinstall.Namespace).List(ctx, metav1.ListOptions{})
			if err == nil {
				for i := range l.Items {
					m.follow(ctx, sb, &l.Items[i])
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(300 * time.Millisecond):
			}
		}
	}()
	return m
}

func (m *meshLogs) follow(ctx context.Context, sb *sandbox.Sandbox, p *corev1.Pod) {
	if p.Status.Phase != corev1.PodRunning || len(p.Spec.Containers) == 0 {
		return
	}
	key := fmt.Sprintf("%s (%s)", p.Name, p.Spec.NodeName)
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.logs[key]; ok {
		return
	}
	b := &strings.Builder{}
	m.logs[key] = b
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		w := lockedWriter{mu: &m.mu, b: b}
		if err := sb.Logs(ctx, meshinstall.Namespace, p.Name, p.Spec.Containers[0].Name, true, w); err != nil && ctx.Err() == nil {
			fmt.Fprintf(w, "(log stream ended: %v)\n", err)
		}
	}()
}

// String is every followed log, pod by pod.
func (m *meshLogs) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	keys := make([]string, 0, len(m.logs))
	for k := range m.logs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&out, "--- log of %s/%s:\n%s\n", meshinstall.Namespace, k, m.logs[k].String())
	}
	return out.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}
