// Package leader elects one istiod-lite replica, through a coordination.k8s.io
// Lease, to run the parts that write cluster state (the waypoint controller
// and its status writes, the route status writer). Everything else (xDS, the CA, which signs with the
// shared root from its Secret) runs on every replica. It knows nothing of
// what the leader does.
package leader

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Config names the Lease and this replica.
type Config struct {
	Client kubernetes.Interface
	// Namespace and Name of the Lease.
	Namespace, Name string
	// Identity of this replica in the Lease (its pod name).
	Identity string
	// LeaseDuration, RenewDeadline and RetryPeriod as client-go's leader
	// election (defaults 15 s, 10 s, 2 s).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	Log                                       *slog.Logger
}

// Elector campaigns for the Lease and runs the leader's work while it
// holds it.
type Elector struct {
	cfg     Config
	leading atomic.Bool
}

// New checks cfg.
func New(cfg Config) (*Elector, error) {
	if cfg.Client == nil || cfg.Namespace == "" || cfg.Name == "" || cfg.Identity == "" {
		return nil, errors.New("leader election needs a client, the Lease's namespace and name, and an identity")
	}
	if cfg.LeaseDuration <= 0 {
		cfg.LeaseDuration = 15 * time.Second
	}
	if cfg.RenewDeadline <= 0 {
		cfg.RenewDeadline = 10 * time.Second
	}
	if cfg.RetryPeriod <= 0 {
		cfg.RetryPeriod = 2 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Elector{cfg: cfg}, nil
}

// Leading reports whether this replica holds the Lease now.
func (e *Elector) Leading() bool { return e.leading.Load() }

// Run campaigns until ctx ends. Each time this replica wins, lead runs with
// a context cancelled when leadership is lost (or ctx ends); Run waits for
// lead to return before campaigning again, so two leads never overlap here.
// The Lease is released when ctx ends, so a successor need not wait for it
// to expire.
func (e *Elector) Run(ctx context.Context, lead func(ctx context.Context)) error {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: e.cfg.Namespace, Name: e.cfg.Name},
		Client:     e.cfg.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: e.cfg.Identity},
	}
	for ctx.Err() == nil {
		// client-go calls OnStartedLeading on a goroutine of its own; lead
		// runs here instead, so Run can wait for it before campaigning again.
		started := make(chan context.Context, 1)
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   e.cfg.LeaseDuration,
			RenewDeadline:   e.cfg.RenewDeadline,
			RetryPeriod:     e.cfg.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            e.cfg.Name,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(lctx context.Context) { started <- lctx },
				OnStoppedLeading: func() {},
				OnNewLeader: func(id string) {
					if id != e.cfg.Identity {
						e.cfg.Log.Info("another replica leads", "lease", e.cfg.Namespace+"/"+e.cfg.Name, "leader", id)
					}
				},
			},
		})
		if err != nil {
			return err
		}
		runDone := make(chan struct{})
		go func() {
			defer close(runDone)
			le.Run(ctx) // returns when leadership is lost or ctx ends
		}()
		var lctx context.Context
		select {
		case lctx = <-started:
		case <-runDone:
		}
		if lctx != nil {
			e.leading.Store(true)
			e.cfg.Log.Info("leading", "lease", e.cfg.Namespace+"/"+e.cfg.Name, "identity", e.cfg.Identity)
			lead(lctx) // lctx ends when the lease is lost
			e.leading.Store(false)
			e.cfg.Log.Info("stopped leading", "lease", e.cfg.Namespace+"/"+e.cfg.Name, "identity", e.cfg.Identity)
		}
		<-runDone
		if ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(e.cfg.RetryPeriod):
			}
		}
	}
	return nil
}
