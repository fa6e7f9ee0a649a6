package xds

import (
	"log/slog"
	"maps"
	"sort"
	"strconv"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/istiod-lite/authn"
)

// maxInFlight bounds the unacknowledged responses remembered per type; a
// client that never ACKs cannot grow the server's memory.
const maxInFlight = 64

// conn is one client stream. Its loop goroutine owns the stream; mu guards
// the state the debug endpoints read and the pending changes the push loop
// adds.
type conn struct {
	id     string
	caller *authn.Caller
	node   *corev3.Node
	// scope is the waypoint Gateway ("<ns>/<name>") this client serves,
	// empty for other clients: it sees scoped resources of that scope only.
	scope     string
	connected time.Time
	srv       *Server
	stream    discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer
	log       *slog.Logger

	mu           sync.Mutex
	subs         map[string]*subscription
	pending      map[string]map[string]struct{}
	pendingSince time.Time
	wake         chan struct{}
	nonce        uint64
	// bigAck is closed when the client answers the large response this
	// connection holds a send slot for.
	bigAck   chan struct{}
	bigNonce string
}

// subscription is the client's state for one type URL.
type subscription struct {
	wildcard bool
	// names the client asked for (names or aliases), plus the members of
	// services it asked for.
	names map[string]struct{}
	// sent is what the client holds: name -> version.
	sent     map[string]string
	inflight map[uint64]*inflight

	lastAckedNonce, lastAckedVersion string
	lastAckedAt                      time.Time
	nacks                            int
	lastNack                         string
}

// inflight remembers what a response changed in sent, to undo it on NACK:
// the resources it set, the names it removed, and the versions the client
// held before for the names it already had (few, except on resume).
type inflight struct {
	version string
	set     []*Resource
	removed []string
	prev    map[string]string
}

func newSubscription() *subscription {
	return &subscription{names: map[string]struct{}{}, sent: map[string]string{}, inflight: map[uint64]*inflight{}}
}

func (c *conn) enqueue(changes map[string]map[string]struct{}, since time.Time) {
	c.mu.Lock()
	if c.pending == nil {
		c.pending = map[string]map[string]struct{}{}
	}
	for t, names := range changes {
		m := c.pending[t]
		if m == nil {
			m = make(map[string]struct{}, len(names))
			c.pending[t] = m
		}
		for n := range names {
			m[n] = struct{}{}
		}
	}
	if c.pendingSince.IsZero() || since.Before(c.pendingSince) {
		c.pendingSince = since
	}
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// handle processes one request: ACK or NACK of an earlier response, and
// subscription changes, answered at once.
func (c *conn) handle(req *discovery.DeltaDiscoveryRequest) error {
	cache := c.srv.cache
	t := req.GetTypeUrl()
	if !cache.Serves(t) {
		c.log.Warn("xDS request for an unknown type ignored", "type", t)
		return nil
	}
	c.mu.Lock()
	sub := c.subs[t]
	isNew := sub == nil
	if isNew {
		sub = newSubscription()
		c.subs[t] = sub
		for n, v := range req.GetInitialResourceVersions() {
			sub.sent[n] = v
		}
		// A first request naming nothing is a (legacy) wildcard subscription.
		if len(req.GetResourceNamesSubscribe()) == 0 {
			sub.wildcard = true
		}
	}
	if n := req.GetResponseNonce(); n != "" {
		c.answeredLocked(n)
		if req.GetErrorDetail() != nil {
			c.nackLocked(t, sub, n, req.GetErrorDetail().GetMessage())
		} else {
			c.ackLocked(sub, n)
		}
	}
	becameWildcard := false
	var asked []string
	for _, n := range req.GetResourceNamesSubscribe() {
		if n == ixds.Wildcard {
			becameWildcard = becameWildcard || !sub.wildcard || isNew
			sub.wildcard = true
			continue
		}
		sub.names[n] = struct{}{}
		asked = append(asked, n)
	}
	for _, n := range req.GetResourceNamesUnsubscribe() {
		if n == ixds.Wildcard {
			sub.wildcard = false
			continue
		}
		delete(sub.names, n)
		// The client forgets what it unsubscribed from; no removal is sent.
		if r := cache.Resolve(t, n); r != nil && !sub.wildcard {
			delete(sub.sent, r.Name)
		}
		delete(sub.sent, n)
	}
	respond := isNew || len(req.GetResourceNamesSubscribe()) > 0
	if !respond {
		c.mu.Unlock()
		return nil
	}

	var res []*Resource
	var removed []string
	var full *snapshot
	if (isNew && sub.wildcard) || becameWildcard {
		res, full, removed = c.fullDiffLocked(t, sub)
	} else {
		res, removed = c.lookupLocked(t, sub, asked)
		res = dedupe(res)
	}
	resp, err := c.responseLocked(t, sub, res, full, removed)
	c.mu.Unlock()
	if err != nil {
		return err
	}
	// Requests are always answered, even with nothing: the client waits
	// for it (an empty Authorization response means "no policies").
	return c.send(resp, time.Time{})
}

// fullDiffLocked compares everything the cache holds with what the client
// holds: changed and new resources, and removals of what no longer exists.
// When every resource is to be sent (a client that holds nothing yet, or
// nothing current), full is the snapshot they come from, whose encoding is
// shared by all such clients.
func (c *conn) fullDiffLocked(t string, sub *subscription) (res []*Resource, full *snapshot, removed []string) {
	cache := c.srv.cache
	snap := cache.snapshot(t)
	if cache.hasScoped(t) {
		// Only what this client may see; the shared body does not apply.
		for _, r := range snap.all {
			if c.visible(r) && sub.sent[r.Name] != r.Version {
				res = append(res, r)
			}
		}
		for n := range sub.sent {
			if r := cache.Get(t, n); r == nil || !c.visible(r) {
				removed = append(removed, n)
			}
		}
		sort.Strings(removed)
		return res, nil, removed
	}
	if len(sub.sent) == 0 {
		return snap.all, snap, nil
	}
	res = make([]*Resource, 0, len(snap.all))
	for _, r := range snap.all {
		if sub.sent[r.Name] != r.Version {
			res = append(res, r)
		}
	}
	if len(res) == len(snap.all) {
		res, full = snap.all, snap
	}
	for n := range sub.sent {
		if cache.Get(t, n) == nil {
			removed = append(removed, n)
		}
	}
	sort.Strings(removed)
	return res, full, removed
}

// lookupLocked answers on-demand subscriptions: each name or alias that
// resolves is sent with its members (a Service's workloads, which the client
// is then subscribed to as well); one that does not is reported removed.
func (c *conn) lookupLocked(t string, sub *subscription, asked []string) ([]*Resource, []string) {
	cache := c.srv.cache
	var res []*Resource
	var removed []string
	for _, n := range asked {
		r := cache.Resolve(t, n)
		if r == nil || !c.visible(r) {
			removed = append(removed, n)
			continue
		}
		if sub.sent[r.Name] != r.Version {
			res = append(res, r)
		}
		for _, m := range cache.Members(t, r.Name) {
			sub.names[m] = struct{}{}
			if mr := cache.Get(t, m); mr != nil && c.visible(mr) && sub.sent[m] != mr.Version {
				res = append(res, mr)
			}
		}
	}
	return res, removed
}

// visible reports whether this client may receive r.
func (c *conn) visible(r *Resource) bool { return r.Scope == "" || r.Scope == c.scope }

// wantsLocked reports whether a non-wildcard client subscribed to r, by
// name, by alias or through a service r belongs to.
func wants(sub *subscription, r *Resource) bool {
	if sub.wildcard {
		return true
	}
	if _, ok := sub.names[r.Name]; ok {
		return true
	}
	for _, a := range r.Aliases {
		if _, ok := sub.names[a]; ok {
			return true
		}
	}
	for _, p := range r.MemberOf {
		if _, ok := sub.names[p]; ok {
			return true
		}
	}
	return false
}

// push sends the changes queued for this client.
func (c *conn) push() error {
	c.mu.Lock()
	pending, since := c.pending, c.pendingSince
	c.pending, c.pendingSince = nil, time.Time{}
	var outs []*wireResponse
	cache := c.srv.cache
	types := make([]string, 0, len(pending))
	for t := range pending {
		types = append(types, t)
	}
	sort.Strings(types)
	for _, t := range types {
		sub := c.subs[t]
		if sub == nil {
			continue
		}
		names := make([]string, 0, len(pending[t]))
		for n := range pending[t] {
			names = append(names, n)
		}
		sort.Strings(names)
		var res []*Resource
		var removed []string
		for _, n := range names {
			r := cache.Get(t, n)
			if r == nil || !c.visible(r) {
				if _, had := sub.sent[n]; had {
					removed = append(removed, n)
				}
				continue
			}
			if !wants(sub, r) {
				// A workload that left a subscribed service stays subscribed
				// by name if the client has it.
				if _, had := sub.sent[n]; !had {
					continue
				}
			}
			if sub.sent[n] == r.Version {
				continue
			}
			res = append(res, r)
		}
		if len(res) == 0 && len(removed) == 0 {
			continue
		}
		resp, err := c.responseLocked(t, sub, res, nil, removed)
		if err != nil {
			c.mu.Unlock()
			return err
		}
		outs = append(outs, resp)
	}
	c.mu.Unlock()
	for _, o := range outs {
		if err := c.send(o, since); err != nil {
			return err
		}
	}
	return nil
}

// responseLocked builds a response carrying res and removed, and records it
// as sent (optimistically; a NACK undoes it). full, when not nil, is the
// snapshot res is all of: its shared encoding is sent and what the client
// then holds is a copy of its versions.
func (c *conn) responseLocked(t string, sub *subscription, res []*Resource, full *snapshot, removed []string) (*wireResponse, error) {
	c.nonce++
	n := c.nonce
	version := strconv.FormatUint(c.srv.cache.Version(), 10)
	var body []byte
	if full != nil {
		body = full.body
	}
	resp, err := encodeResponse(t, strconv.FormatUint(n, 10), version, res, body, removed)
	if err != nil {
		return nil, err
	}
	fl := &inflight{version: version, set: res}
	sub.inflight[n] = fl
	c.trimInflightLocked(sub, n)
	if full != nil {
		// Afterwards the client holds exactly the snapshot; what it held
		// before (every name the response sets or removes) is what a NACK
		// restores.
		if len(sub.sent) > 0 {
			fl.prev = sub.sent
			fl.removed = removed
		}
		sub.sent = maps.Clone(full.versions)
		return resp, nil
	}
	if sub.sent == nil || (len(sub.sent) == 0 && len(res) > 0) {
		sub.sent = make(map[string]string, len(res))
	}
	for _, r := range res {
		if v, had := sub.sent[r.Name]; had {
			if fl.prev == nil {
				fl.prev = map[string]string{}
			}
			fl.prev[r.Name] = v
		}
		sub.sent[r.Name] = r.Version
	}
	for _, name := range removed {
		if v, had := sub.sent[name]; had {
			if fl.prev == nil {
				fl.prev = map[string]string{}
			}
			fl.prev[name] = v
			fl.removed = append(fl.removed, name)
			delete(sub.sent, name)
		}
	}
	return resp, nil
}

// trimInflightLocked forgets responses more than maxInFlight before n.
func (c *conn) trimInflightLocked(sub *subscription, n uint64) {
	if len(sub.inflight) > maxInFlight {
		for k := range sub.inflight {
			if k+maxInFlight <= n {
				delete(sub.inflight, k)
			}
		}
	}
}

// bigResponse is the number of resources from which a response counts as
// large; bigHold bounds how long a slow client keeps a large-send slot.
const (
	bigResponse = 1000
	bigHold     = 10 * time.Second
)

func (c *conn) send(resp *wireResponse, since time.Time) error {
	ctx := c.stream.Context()
	c.mu.Lock()
	holding := c.bigAck != nil
	c.mu.Unlock()
	// A large response stays queued in gRPC until the client has read it,
	// so a slot is held until the client answers it (see Server.bigSends).
	big := resp.resources >= bigResponse && !holding
	if big {
		select {
		case c.srv.bigSends <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-c.srv.stopping:
			return status.Error(codes.Unavailable, "server shutting down")
		}
	}
	if err := c.stream.SendMsg(resp); err != nil {
		if big {
			<-c.srv.bigSends
		}
		return err
	}
	if big {
		ack := make(chan struct{})
		c.mu.Lock()
		c.bigAck, c.bigNonce = ack, resp.nonce
		c.mu.Unlock()
		go func() {
			t := time.NewTimer(bigHold)
			defer t.Stop()
			select {
			case <-ack:
			case <-ctx.Done():
			case <-t.C:
			}
			<-c.srv.bigSends
			c.mu.Lock()
			if c.bigAck == ack {
				c.bigAck, c.bigNonce = nil, ""
			}
			c.mu.Unlock()
		}()
	}
	mt := metricType(resp.typeURL)
	c.srv.metrics.pushes.WithLabelValues(mt).Inc()
	if !since.IsZero() {
		c.srv.metrics.pushTime.WithLabelValues(mt).Observe(time.Since(since).Seconds())
	}
	c.log.Debug("xDS response sent", "type", mt, "nonce", resp.nonce, "resources", resp.resources, "removed", resp.removed)
	return nil
}

// answeredLocked releases the large-send slot when its response is ACKed
// or NACKed.
func (c *conn) answeredLocked(nonce string) {
	if c.bigAck != nil && c.bigNonce == nonce {
		close(c.bigAck)
		c.bigAck, c.bigNonce = nil, ""
	}
}

func (c *conn) ackLocked(sub *subscription, nonce string) {
	n, err := strconv.ParseUint(nonce, 10, 64)
	if err != nil {
		return
	}
	fl := sub.inflight[n]
	delete(sub.inflight, n)
	sub.lastAckedNonce = nonce
	sub.lastAckedAt = time.Now()
	if fl != nil {
		sub.lastAckedVersion = fl.version
	}
}

// nackLocked logs the rejection and restores what the client still holds:
// every name the rejected response changed, unless a later response changed
// it again.
func (c *conn) nackLocked(t string, sub *subscription, nonce, msg string) {
	sub.nacks++
	sub.lastNack = msg
	c.srv.metrics.rejects.WithLabelValues(metricType(t)).Inc()
	c.log.Warn("xDS client rejected a response", "type", metricType(t), "nonce", nonce, "error", msg)
	n, err := strconv.ParseUint(nonce, 10, 64)
	if err != nil {
		return
	}
	fl := sub.inflight[n]
	delete(sub.inflight, n)
	if fl == nil {
		return
	}
	restore := func(name string) {
		if p, ok := fl.prev[name]; ok {
			sub.sent[name] = p
		} else {
			delete(sub.sent, name)
		}
	}
	for _, r := range fl.set {
		if sub.sent[r.Name] == r.Version { // else a later response decides
			restore(r.Name)
		}
	}
	for _, name := range fl.removed {
		if _, has := sub.sent[name]; !has {
			restore(name)
		}
	}
}

func (c *conn) status() ClientStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := ClientStatus{ID: c.id, NodeID: c.node.GetId(), Caller: c.caller.String(), ConnectedAt: c.connected}
	types := make([]string, 0, len(c.subs))
	for t := range c.subs {
		types = append(types, t)
	}
	sort.Strings(types)
	for _, t := range types {
		s := c.subs[t]
		ts := TypeStatus{
			TypeURL: t, Wildcard: s.wildcard, Resources: len(s.sent),
			LastAckedNonce: s.lastAckedNonce, LastAckedVersion: s.lastAckedVersion, LastAckedAt: s.lastAckedAt,
			InFlight: len(s.inflight), Nacks: s.nacks, LastNack: s.lastNack,
		}
		for n := range s.names {
			ts.Subscribed = append(ts.Subscribed, n)
		}
		sort.Strings(ts.Subscribed)
		st.Types = append(st.Types, ts)
	}
	return st
}

func (c *conn) resources() map[string]map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]map[string]string{}
	for t, s := range c.subs {
		m := make(map[string]string, len(s.sent))
		for n, v := range s.sent {
			m[n] = v
		}
		out[t] = m
	}
	return out
}

func dedupe(rs []*Resource) []*Resource {
	seen := make(map[string]bool, len(rs))
	out := rs[:0]
	for _, r := range rs {
		if !seen[r.Name] {
			seen[r.Name] = true
			out = append(out, r)
		}
	}
	return out
}
