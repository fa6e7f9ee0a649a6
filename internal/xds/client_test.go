package xds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/anypb"
)

// scriptServer is a minimal Delta ADS server for testing the client: it
// records every request and answers the first request of a stream with
// what answer returns.
type scriptServer struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	mu      sync.Mutex
	reqs    []*discovery.DeltaDiscoveryRequest
	tokens  []string
	streams int
	answer  func(stream int, req *discovery.DeltaDiscoveryRequest) *discovery.DeltaDiscoveryResponse
	got     chan *discovery.DeltaDiscoveryRequest
}

func (s *scriptServer) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	md, _ := metadata.FromIncomingContext(st.Context())
	s.mu.Lock()
	s.streams++
	n := s.streams
	s.tokens = append(s.tokens, md.Get("authorization")...)
	s.mu.Unlock()
	for {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		s.mu.Lock()
		s.reqs = append(s.reqs, req)
		s.mu.Unlock()
		s.got <- req
		if req.ResponseNonce == "" && s.answer != nil {
			if resp := s.answer(n, req); resp != nil {
				if err := st.Send(resp); err != nil {
					return err
				}
			}
		}
		if n == 1 && req.ResponseNonce == "close" {
			return errors.New("server drops the stream")
		}
	}
}

func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"xds.test"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: c}, pool
}

func res(name, version string) *discovery.Resource {
	return &discovery.Resource{Name: name, Version: version, Resource: &anypb.Any{TypeUrl: TypeAddress}}
}

func TestClient_AcksNacksAndResumes(t *testing.T) {
	cert, pool := selfSigned(t)
	srv := &scriptServer{got: make(chan *discovery.DeltaDiscoveryRequest, 100)}
	srv.answer = func(stream int, req *discovery.DeltaDiscoveryRequest) *discovery.DeltaDiscoveryResponse {
		if stream == 1 && req.TypeUrl == TypeAddress && len(req.ResourceNamesSubscribe) == 0 {
			return &discovery.DeltaDiscoveryResponse{TypeUrl: TypeAddress, Nonce: "n1",
				Resources: []*discovery.Resource{res("a", "1"), res("b", "1")}}
		}
		if stream == 1 && req.TypeUrl == TypeAddress && len(req.ResourceNamesSubscribe) > 0 && req.ResourceNamesSubscribe[0] == "/10.0.0.9" {
			return &discovery.DeltaDiscoveryResponse{TypeUrl: TypeAddress, Nonce: "bad", Resources: []*discovery.Resource{res("x", "1")}}
		}
		if stream == 2 && req.TypeUrl == TypeAddress {
			return &discovery.DeltaDiscoveryResponse{TypeUrl: TypeAddress, Nonce: "n2", RemovedResources: []string{"b"}}
		}
		return nil
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})))
	discovery.RegisterAggregatedDiscoveryServiceServer(g, srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	defer g.Stop()

	var mu sync.Mutex
	var applied [][]string
	c, err := NewClient(ClientConfig{
		Target: lis.Addr().String(), TLS: &tls.Config{RootCAs: pool, ServerName: "xds.test", MinVersion: tls.VersionTLS13},
		Token: func(context.Context) (string, error) { return "tok", nil },
		Node:  &corev3.Node{Id: "n"}, Subscriptions: []Subscription{{TypeURL: TypeAddress}},
		MinBackoff: 10 * time.Millisecond,
		Handler: HandlerFunc(func(typeURL string, rs []*discovery.Resource, removed []string) error {
			var names []string
			for _, r := range rs {
				if r.Name == "x" {
					return errors.New("x is bad")
				}
				names = append(names, r.Name)
			}
			mu.Lock()
			applied = append(applied, append(names, removed...))
			mu.Unlock()
			return nil
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	next := func() *discovery.DeltaDiscoveryRequest {
		t.Helper()
		select {
		case r := <-srv.got:
			return r
		case <-time.After(5 * time.Second):
			t.Fatal("no request")
			return nil
		}
	}
	first := next()
	if first.GetNode().GetId() != "n" || len(first.ResourceNamesSubscribe) != 0 {
		t.Fatalf("first request %v: want node and a wildcard subscription", first)
	}
	if ack := next(); ack.ResponseNonce != "n1" || ack.ErrorDetail != nil {
		t.Fatalf("want ACK of n1, got %v", ack)
	}
	<-c.Synced()
	if v := c.Versions(TypeAddress); len(v) != 2 || v["a"] != "1" {
		t.Fatalf("versions %v", v)
	}
	// An on-demand lookup the handler rejects: NACK, versions unchanged.
	if err := c.Subscribe(TypeAddress, "/10.0.0.9"); err != nil {
		t.Fatal(err)
	}
	if r := next(); len(r.ResourceNamesSubscribe) != 1 {
		t.Fatalf("want the subscription, got %v", r)
	}
	if nack := next(); nack.ResponseNonce != "bad" || nack.ErrorDetail == nil || nack.ErrorDetail.Message != "x is bad" {
		t.Fatalf("want NACK of bad, got %v", nack)
	}
	if _, has := c.Versions(TypeAddress)["x"]; has {
		t.Error("a rejected resource was recorded")
	}
	// The stream breaks: the client reconnects and says what it holds.
	g.Stop()
	lis2, err := net.Listen("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	g = grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})))
	srv.mu.Lock()
	srv.streams = 1
	srv.mu.Unlock()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, srv)
	go g.Serve(lis2)
	resumed := next()
	if v := resumed.InitialResourceVersions; len(v) != 2 || v["a"] != "1" || v["b"] != "1" {
		t.Errorf("resume sent initial versions %v, want a=1 b=1", v)
	}
	want := map[string]bool{"/10.0.0.9": true, Wildcard: true}
	for _, n := range resumed.ResourceNamesSubscribe {
		delete(want, n)
	}
	if len(want) != 0 {
		t.Errorf("resume subscribed %v, want the on-demand name and the wildcard", resumed.ResourceNamesSubscribe)
	}
	if ack := next(); ack.ResponseNonce != "n2" {
		t.Fatalf("want ACK of n2, got %v", ack)
	}
	if v := c.Versions(TypeAddress); len(v) != 1 || v["a"] != "1" {
		t.Errorf("after removal of b: versions %v", v)
	}
	srv.mu.Lock()
	for _, tok := range srv.tokens {
		if tok != "Bearer tok" {
			t.Errorf("stream sent authorization %q", tok)
		}
	}
	srv.mu.Unlock()
}

func TestNewClient_RefusesIncompleteConfig(t *testing.T) {
	h := HandlerFunc(func(string, []*discovery.Resource, []string) error { return nil })
	ok := ClientConfig{Target: "x:1", TLS: &tls.Config{}, Node: &corev3.Node{Id: "n"}, Handler: h, Subscriptions: []Subscription{{TypeURL: TypeAddress}}}
	if _, err := NewClient(ok); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*ClientConfig){
		"no TLS":       func(c *ClientConfig) { c.TLS = nil },
		"no node id":   func(c *ClientConfig) { c.Node = &corev3.Node{} },
		"no handler":   func(c *ClientConfig) { c.Handler = nil },
		"nothing":      func(c *ClientConfig) { c.Subscriptions = nil },
		"type twice":   func(c *ClientConfig) { c.Subscriptions = append(c.Subscriptions, c.Subscriptions[0]) },
		"empty target": func(c *ClientConfig) { c.Target = "" },
	} {
		cfg := ok
		mut(&cfg)
		if _, err := NewClient(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
