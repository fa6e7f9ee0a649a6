package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/authn"
	"github.com/meshlite/meshlite/proto/l7"
)

// Authenticator authenticates the caller of a stream.
type Authenticator interface {
	Authenticate(ctx context.Context) (*authn.Caller, error)
}

// Options tune the server.
type Options struct {
	// Debounce is the quiet period after a change before pushing (10 ms);
	// MaxDelay bounds how long changes wait under a steady stream (100 ms).
	Debounce, MaxDelay time.Duration
	// FirstRequestTimeout bounds the wait for a stream's first request (30 s).
	FirstRequestTimeout time.Duration
	Log                 *slog.Logger
	Registerer          prometheus.Registerer
}

// Server is the Delta ADS server.
type Server struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer

	cache   *Cache
	auth    Authenticator
	opts    Options
	log     *slog.Logger
	metrics *metrics

	mu    sync.Mutex
	conns map[string]*conn
	seq   atomic.Uint64

	// bigSends bounds how many large responses are in flight at once: a
	// hundred clients connecting together are served a few at a time, each
	// finishing quickly, rather than all slowly, and responses encoded per
	// client (a resume's partial diff) are not all buffered together. A
	// full snapshot's body is shared, so it costs little memory either way.
	bigSends chan struct{}

	// stopping is closed when Run returns, ending every stream.
	stopping chan struct{}
	stopOnce sync.Once
}

// NewServer returns a server for cache's resources, authenticating streams
// with auth.
func NewServer(cache *Cache, auth Authenticator, opts Options) *Server {
	if opts.Debounce <= 0 {
		opts.Debounce = 10 * time.Millisecond
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = 100 * time.Millisecond
	}
	if opts.FirstRequestTimeout <= 0 {
		opts.FirstRequestTimeout = 30 * time.Second
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		cache:    cache,
		auth:     auth,
		opts:     opts,
		log:      log,
		metrics:  newMetrics(opts.Registerer),
		conns:    map[string]*conn{},
		stopping: make(chan struct{}),
		bigSends: make(chan struct{}, 4),
	}
}

// Register adds the ADS service to g.
func (s *Server) Register(g *grpc.Server) {
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s)
}

// StreamAggregatedResources is the state-of-the-world protocol, which the
// Workload API does not use.
func (s *Server) StreamAggregatedResources(discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	return status.Error(codes.Unimplemented, "only Delta ADS (DeltaAggregatedResources) is served")
}

// Run pushes changes of the cache to the connected clients, debounced,
// until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	defer s.stopOnce.Do(func() { close(s.stopping) })
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.cache.Changed():
		}
		s.debounce(ctx)
		changes, since := s.cache.TakeChanges()
		if len(changes) == 0 {
			continue
		}
		for _, c := range s.connections() {
			c.enqueue(changes, since)
		}
	}
}

// debounce waits until no change arrived for Debounce, or MaxDelay passed.
func (s *Server) debounce(ctx context.Context) {
	deadline := time.NewTimer(s.opts.MaxDelay)
	defer deadline.Stop()
	quiet := time.NewTimer(s.opts.Debounce)
	defer quiet.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			return
		case <-quiet.C:
			return
		case <-s.cache.Changed():
			if !quiet.Stop() {
				<-quiet.C
			}
			quiet.Reset(s.opts.Debounce)
		}
	}
}

func (s *Server) connections() []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*conn, 0, len(s.conns))
	for _, c := range s.conns {
		out = append(out, c)
	}
	return out
}

// DeltaAggregatedResources serves one client stream.
func (s *Server) DeltaAggregatedResources(stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	ctx := stream.Context()
	caller, err := s.auth.Authenticate(ctx)
	if err != nil {
		s.metrics.authFail.Inc()
		s.log.Warn("xDS stream refused", "reason", err)
		return err
	}

	reqs := make(chan *discovery.DeltaDiscoveryRequest, 16)
	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()

	var first *discovery.DeltaDiscoveryRequest
	timer := time.NewTimer(s.opts.FirstRequestTimeout)
	defer timer.Stop()
	select {
	case first = <-reqs:
	case err := <-recvErr:
		return streamEnd(err)
	case <-timer.C:
		return status.Error(codes.DeadlineExceeded, "no request within the first-request timeout")
	case <-ctx.Done():
		return nil
	}
	scope, err := checkNode(first.GetNode(), caller)
	if err != nil {
		s.metrics.authFail.Inc()
		s.log.Warn("xDS stream refused", "caller", caller.String(), "reason", err)
		return err
	}
	// Nothing is answered until the cache holds the whole cluster: a client
	// must never take a partial picture for the truth.
	select {
	case <-s.cache.Ready():
	case <-ctx.Done():
		return nil
	case <-s.stopping:
		return status.Error(codes.Unavailable, "server shutting down")
	}

	c := &conn{
		id:        fmt.Sprintf("%s-%d", first.GetNode().GetId(), s.seq.Add(1)),
		caller:    caller,
		node:      first.GetNode(),
		scope:     scope,
		connected: time.Now(),
		srv:       s,
		stream:    stream,
		subs:      map[string]*subscription{},
		wake:      make(chan struct{}, 1),
		log:       s.log.With("client", first.GetNode().GetId(), "caller", caller.String(), "waypoint", scope),
	}
	s.mu.Lock()
	s.conns[c.id] = c
	s.mu.Unlock()
	s.metrics.clients.Inc()
	c.log.Info("xDS client connected", "conn", c.id)
	defer func() {
		s.mu.Lock()
		delete(s.conns, c.id)
		s.mu.Unlock()
		s.metrics.clients.Dec()
		c.log.Info("xDS client disconnected", "conn", c.id)
	}()

	if err := c.handle(first); err != nil {
		return err
	}
	for {
		select {
		case req := <-reqs:
			if err := c.handle(req); err != nil {
				return err
			}
		case <-c.wake:
			if err := c.push(); err != nil {
				return err
			}
		case err := <-recvErr:
			return streamEnd(err)
		case <-ctx.Done():
			return nil
		case <-s.stopping:
			return status.Error(codes.Unavailable, "server shutting down")
		}
	}
}

func streamEnd(err error) error {
	if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
		return nil
	}
	return err
}

// checkNode requires a node and checks its NAMESPACE and SERVICE_ACCOUNT
// metadata, when given, against the caller's token. A waypoint (node id
// "waypoint~...") names its Gateway in GATEWAY_NAME; it must run as that
// Gateway's service account (the waypoint controller names it after the
// Gateway) in the Gateway's namespace, and its scope, "<ns>/<gateway>", is
// returned: it receives that waypoint's scoped resources and no other's.
func checkNode(n *corev3.Node, caller *authn.Caller) (string, error) {
	if n == nil || n.GetId() == "" {
		return "", status.Error(codes.InvalidArgument, "the first request must carry a node with an id")
	}
	fields := n.GetMetadata().GetFields()
	if ns := fields[ixds.MetadataNamespace].GetStringValue(); ns != "" && ns != caller.Namespace {
		return "", status.Errorf(codes.PermissionDenied, "node namespace %q does not match the token's %q", ns, caller.Namespace)
	}
	if sa := fields[ixds.MetadataServiceAccount].GetStringValue(); sa != "" && sa != caller.ServiceAccount {
		return "", status.Errorf(codes.PermissionDenied, "node service account %q does not match the token's %q", sa, caller.ServiceAccount)
	}
	if !strings.HasPrefix(n.GetId(), l7.NodeType+"~") {
		return "", nil
	}
	gw := fields[l7.MetadataGatewayName].GetStringValue()
	if gw == "" {
		return "", status.Errorf(codes.InvalidArgument, "a waypoint node must name its Gateway in metadata %s", l7.MetadataGatewayName)
	}
	if gw != caller.ServiceAccount {
		return "", status.Errorf(codes.PermissionDenied, "waypoint of Gateway %s/%s must run as service account %s, not %s",
			caller.Namespace, gw, gw, caller.ServiceAccount)
	}
	return caller.Namespace + "/" + gw, nil
}

// ClientStatus describes one connected client (for the debug endpoints).
type ClientStatus struct {
	ID          string       `json:"id"`
	NodeID      string       `json:"node"`
	Caller      string       `json:"caller"`
	ConnectedAt time.Time    `json:"connected_at"`
	Types       []TypeStatus `json:"types"`
}

// TypeStatus is a client's state for one type URL.
type TypeStatus struct {
	TypeURL          string    `json:"type_url"`
	Wildcard         bool      `json:"wildcard"`
	Subscribed       []string  `json:"subscribed,omitempty"`
	Resources        int       `json:"resources"`
	LastAckedNonce   string    `json:"last_acked_nonce,omitempty"`
	LastAckedVersion string    `json:"last_acked_version,omitempty"`
	LastAckedAt      time.Time `json:"last_acked_at,omitzero"`
	InFlight         int       `json:"in_flight"`
	Nacks            int       `json:"nacks"`
	LastNack         string    `json:"last_nack,omitempty"`
}

// Clients lists the connected clients, sorted by id.
func (s *Server) Clients() []ClientStatus {
	var out []ClientStatus
	for _, c := range s.connections() {
		out = append(out, c.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// ClientResources returns, per type URL, the resources a connected client
// was sent and holds (name -> version); ok is false for an unknown id.
func (s *Server) ClientResources(id string) (map[string]map[string]string, bool) {
	s.mu.Lock()
	c := s.conns[id]
	s.mu.Unlock()
	if c == nil {
		return nil, false
	}
	return c.resources(), true
}

// Cache is the cache the server serves.
func (s *Server) Cache() *Cache { return s.cache }
