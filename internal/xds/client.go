package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// Handler applies one response of a type. Returning an error NACKs the
// response: the client then keeps holding what it held before it.
type Handler interface {
	Apply(typeURL string, resources []*discovery.Resource, removed []string) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(typeURL string, resources []*discovery.Resource, removed []string) error

// Apply calls f.
func (f HandlerFunc) Apply(typeURL string, resources []*discovery.Resource, removed []string) error {
	return f(typeURL, resources, removed)
}

// Subscription is a type to subscribe to at start: no Names means the
// wildcard (everything), else only these names (on demand).
type Subscription struct {
	TypeURL string
	Names   []string
}

// ClientConfig configures a Client.
type ClientConfig struct {
	// Target is the server, "host:port".
	Target string
	// TLS verifies the server (and may present a client certificate).
	// Required: the control plane is never spoken to in plaintext.
	TLS *tls.Config
	// Token returns the Bearer token sent with each stream (a projected
	// service-account token); nil sends none.
	Token func(context.Context) (string, error)
	// Node identifies the client; sent on the first request of a stream.
	Node          *corev3.Node
	Subscriptions []Subscription
	Handler       Handler
	Log           *slog.Logger
	// Reconnect backoff, doubling from MinBackoff (100 ms) to MaxBackoff (15 s).
	MinBackoff, MaxBackoff time.Duration
	// MaxMessageSize bounds a response (256 MiB).
	MaxMessageSize int
	DialOptions    []grpc.DialOption
}

// Client is a Delta ADS client that keeps the versions of what it accepted
// and resumes from them after a reconnect.
type Client struct {
	cfg ClientConfig
	log *slog.Logger

	mu     sync.Mutex
	types  map[string]*typeState
	order  []string
	stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	sendMu sync.Mutex

	syncedOnce sync.Once
	synced     chan struct{}
}

type typeState struct {
	wildcard bool
	names    map[string]struct{}
	versions map[string]string
	// gotFirst is set once the first response of the type was applied.
	gotFirst bool
}

// NewClient checks cfg and returns a client; Run connects it.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Target == "" {
		return nil, errors.New("xds client: no target")
	}
	if cfg.TLS == nil {
		return nil, errors.New("xds client: TLS config required")
	}
	if cfg.Handler == nil {
		return nil, errors.New("xds client: no handler")
	}
	if cfg.Node == nil || cfg.Node.GetId() == "" {
		return nil, errors.New("xds client: node with an id required")
	}
	if len(cfg.Subscriptions) == 0 {
		return nil, errors.New("xds client: nothing to subscribe to")
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 15 * time.Second
	}
	if cfg.MaxMessageSize <= 0 {
		cfg.MaxMessageSize = 256 << 20
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	c := &Client{cfg: cfg, log: cfg.Log, types: map[string]*typeState{}, synced: make(chan struct{})}
	for _, s := range cfg.Subscriptions {
		if _, dup := c.types[s.TypeURL]; dup {
			return nil, fmt.Errorf("xds client: type %s subscribed twice", s.TypeURL)
		}
		ts := &typeState{wildcard: len(s.Names) == 0, names: map[string]struct{}{}, versions: map[string]string{}}
		for _, n := range s.Names {
			ts.names[n] = struct{}{}
		}
		c.types[s.TypeURL] = ts
		c.order = append(c.order, s.TypeURL)
	}
	return c, nil
}

// Synced is closed once the first response of every subscribed type has
// been applied.
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Versions returns what the client holds of typeURL: name -> version.
func (c *Client) Versions(typeURL string) map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	ts := c.types[typeURL]
	if ts == nil {
		return nil
	}
	out := make(map[string]string, len(ts.versions))
	for k, v := range ts.versions {
		out[k] = v
	}
	return out
}

// Connected reports whether a stream to the server is up (an on-demand
// lookup can be answered now).
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stream != nil
}

// Subscribe asks for names of typeURL (on demand) now, or on the next
// connection if disconnected.
func (c *Client) Subscribe(typeURL string, names ...string) error {
	return c.changeSubscription(typeURL, names, true)
}

// Unsubscribe stops following names of typeURL.
func (c *Client) Unsubscribe(typeURL string, names ...string) error {
	return c.changeSubscription(typeURL, names, false)
}

func (c *Client) changeSubscription(typeURL string, names []string, add bool) error {
	c.mu.Lock()
	ts := c.types[typeURL]
	if ts == nil {
		c.mu.Unlock()
		return fmt.Errorf("xds client: type %s not subscribed", typeURL)
	}
	for _, n := range names {
		if add {
			ts.names[n] = struct{}{}
		} else {
			delete(ts.names, n)
			if !ts.wildcard {
				delete(ts.versions, n)
			}
		}
	}
	st := c.stream
	c.mu.Unlock()
	if st == nil {
		return nil
	}
	req := &discovery.DeltaDiscoveryRequest{TypeUrl: typeURL}
	if add {
		req.ResourceNamesSubscribe = names
	} else {
		req.ResourceNamesUnsubscribe = names
	}
	return c.send(st, req)
}

func (c *Client) send(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient, req *discovery.DeltaDiscoveryRequest) error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	if err := st.Send(req); err != nil {
		return fmt.Errorf("xds send %s: %w", req.TypeUrl, err)
	}
	return nil
}

// Run connects and keeps the stream up, reconnecting with backoff, until
// ctx ends.
func (c *Client) Run(ctx context.Context) error {
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(c.cfg.TLS)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(c.cfg.MaxMessageSize)),
	}, c.cfg.DialOptions...)
	cc, err := grpc.NewClient(c.cfg.Target, opts...)
	if err != nil {
		return fmt.Errorf("xds client for %s: %w", c.cfg.Target, err)
	}
	defer cc.Close()
	ads := discovery.NewAggregatedDiscoveryServiceClient(cc)
	backoff := c.cfg.MinBackoff
	for {
		received, err := c.runStream(ctx, ads)
		if ctx.Err() != nil {
			return nil
		}
		if received {
			backoff = c.cfg.MinBackoff
		}
		c.log.Warn("xDS stream ended; reconnecting", "target", c.cfg.Target, "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff *= 2
		if backoff > c.cfg.MaxBackoff {
			backoff = c.cfg.MaxBackoff
		}
	}
}

// runStream runs one stream; received says whether any response arrived.
func (c *Client) runStream(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient) (received bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if c.cfg.Token != nil {
		tok, err := c.cfg.Token(ctx)
		if err != nil {
			return false, fmt.Errorf("get token: %w", err)
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}
	st, err := ads.DeltaAggregatedResources(ctx)
	if err != nil {
		return false, fmt.Errorf("open stream: %w", err)
	}
	c.mu.Lock()
	c.stream = st
	initial := make([]*discovery.DeltaDiscoveryRequest, 0, len(c.order))
	for i, t := range c.order {
		ts := c.types[t]
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: t, InitialResourceVersions: map[string]string{}}
		if i == 0 {
			req.Node = c.cfg.Node
		}
		for n, v := range ts.versions {
			req.InitialResourceVersions[n] = v
		}
		for n := range ts.names {
			req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, n)
		}
		sort.Strings(req.ResourceNamesSubscribe)
		if ts.wildcard && len(req.ResourceNamesSubscribe) > 0 {
			req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, Wildcard)
		}
		initial = append(initial, req)
	}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if c.stream == st {
			c.stream = nil
		}
		c.mu.Unlock()
	}()
	for _, req := range initial {
		if err := c.send(st, req); err != nil {
			return false, err
		}
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return received, errors.New("server closed the stream")
			}
			return received, err
		}
		received = true
		if err := c.apply(st, resp); err != nil {
			return received, err
		}
	}
}

func (c *Client) apply(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient, resp *discovery.DeltaDiscoveryResponse) error {
	t := resp.GetTypeUrl()
	c.mu.Lock()
	ts := c.types[t]
	c.mu.Unlock()
	ack := &discovery.DeltaDiscoveryRequest{TypeUrl: t, ResponseNonce: resp.GetNonce()}
	var herr error
	if ts == nil {
		herr = fmt.Errorf("type %s was not subscribed", t)
	} else {
		herr = c.cfg.Handler.Apply(t, resp.GetResources(), resp.GetRemovedResources())
	}
	if herr != nil {
		c.log.Warn("xDS response rejected", "type", t, "nonce", resp.GetNonce(), "err", herr)
		ack.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: herr.Error()}
		return c.send(st, ack)
	}
	c.mu.Lock()
	for _, r := range resp.GetResources() {
		ts.versions[r.GetName()] = r.GetVersion()
	}
	for _, n := range resp.GetRemovedResources() {
		delete(ts.versions, n)
	}
	ts.gotFirst = true
	all := true
	for _, x := range c.types {
		all = all && x.gotFirst
	}
	c.mu.Unlock()
	if all {
		c.syncedOnce.Do(func() { close(c.synced) })
	}
	return c.send(st, ack)
}
