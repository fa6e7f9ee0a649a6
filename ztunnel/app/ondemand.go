package app

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// onDemand asks istiod-lite about destination IPs the state does not hold
// (an on-demand Delta subscription to the Address alias "<network>/<ip>"),
// so a connection to a pod whose push is still on its way is not sent
// around the mesh. One question per IP at a time; an IP istiod-lite does
// not know is remembered for negTTL, so passthrough traffic to the outside
// does not pay a round trip per connection.
type onDemand struct {
	xds     *xds.Client
	store   *state.Store
	network string
	negTTL  time.Duration
	log     *slog.Logger

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced after every Address push
	inflight map[netip.Addr]chan struct{}
	unknown  map[netip.Addr]time.Time
	// answered holds the aliases istiod-lite reported as unknown (removed)
	// while a lookup waited for them.
	answered map[string]bool
}

func newOnDemand(store *state.Store, network string, log *slog.Logger) *onDemand {
	return &onDemand{store: store, network: network, negTTL: 10 * time.Second, log: log,
		changed: make(chan struct{}), inflight: map[netip.Addr]chan struct{}{},
		unknown: map[netip.Addr]time.Time{}, answered: map[string]bool{}}
}

// Apply applies a push to the store, then wakes the lookups waiting for it
// (it wraps the store as the xDS client's handler).
func (o *onDemand) Apply(typeURL string, resources []*discovery.Resource, removed []string) error {
	err := o.store.Apply(typeURL, resources, removed)
	if typeURL != xds.TypeAddress {
		return err
	}
	o.mu.Lock()
	for _, n := range removed {
		if _, waiting := o.answered[n]; waiting {
			o.answered[n] = true
		}
	}
	close(o.changed)
	o.changed = make(chan struct{})
	o.mu.Unlock()
	return err
}

func (o *onDemand) known(ip netip.Addr) bool {
	return o.store.WorkloadByIP(o.network, ip) != nil || o.store.ServiceByVIP(o.network, ip, "") != nil
}

// Lookup asks about ip and returns once the state holds it, istiod-lite
// said it does not know it, or ctx ends. Without a stream to istiod-lite
// it returns at once (the answer could not come in time).
func (o *onDemand) Lookup(ctx context.Context, ip netip.Addr) {
	ip = ip.Unmap()
	if o.known(ip) || !o.xds.Connected() {
		return
	}
	alias := xds.AddressAlias(o.network, ip.String())
	o.mu.Lock()
	if t, ok := o.unknown[ip]; ok {
		if time.Since(t) < o.negTTL {
			o.mu.Unlock()
			return
		}
		delete(o.unknown, ip)
	}
	if ch, ok := o.inflight[ip]; ok {
		o.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
		}
		return
	}
	done := make(chan struct{})
	o.inflight[ip] = done
	o.answered[alias] = false
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		delete(o.inflight, ip)
		delete(o.answered, alias)
		o.mu.Unlock()
		close(done)
		if err := o.xds.Unsubscribe(xds.TypeAddress, alias); err != nil {
			o.log.Debug("on-demand: unsubscribe", "name", alias, "error", err)
		}
	}()
	start := time.Now()
	if err := o.xds.Subscribe(xds.TypeAddress, alias); err != nil {
		o.log.Warn("on-demand lookup failed", "ip", ip, "error", err)
		return
	}
	for {
		o.mu.Lock()
		ch, gone := o.changed, o.answered[alias]
		o.mu.Unlock()
		if o.known(ip) {
			o.log.Info("on-demand lookup found the destination", "ip", ip, "after", time.Since(start).Round(time.Microsecond))
			return
		}
		if gone {
			o.mu.Lock()
			o.unknown[ip] = time.Now()
			if len(o.unknown) > 4096 {
				for k, t := range o.unknown {
					if time.Since(t) > o.negTTL {
						delete(o.unknown, k)
					}
				}
			}
			o.mu.Unlock()
			o.log.Debug("on-demand lookup: unknown to the control plane", "ip", ip)
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			o.log.Info("on-demand lookup unanswered in time; deciding without it", "ip", ip)
			return
		}
	}
}
