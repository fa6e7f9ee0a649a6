package agent

import (
	"net/netip"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	pb "github.com/meshlite/meshlite/proto/zds"
)

// podState is an enrolled pod the agent holds: its identity for ZDS, its
// IPs (for the probe set) and its open netns.
type podState struct {
	key   string // namespace/name
	uid   string
	info  *pb.WorkloadInfo
	ips   []netip.Addr
	netns *os.File
}

func (s *podState) close() {
	if s.netns != nil {
		s.netns.Close()
		s.netns = nil
	}
}

// keyLocks serialises work on one pod (by namespace/name) between plugin
// requests and the reconciler.
type keyLocks struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	sync.Mutex
	refs int
}

func (k *keyLocks) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}

// isNetns reports whether f is a network namespace (nsfs).
func isNetns(f *os.File) bool {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return false
	}
	return st.Type == unix.NSFS_MAGIC
}

func (a *Agent) state(uid string) *podState {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pods[uid]
}

// statesFor lists the states of pods named key (one, or a stale one left
// by a pod recreated under the same name).
func (a *Agent) statesFor(key string) []*podState {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []*podState
	for _, s := range a.pods {
		if s.key == key {
			out = append(out, s)
		}
	}
	return out
}

func (a *Agent) keys() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]string, 0, len(a.pods))
	for _, s := range a.pods {
		out = append(out, s.key)
	}
	return out
}
