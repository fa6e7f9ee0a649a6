package cert

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/internal/identity"
	pb "github.com/meshlite/meshlite/proto/ca"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// testCA is a real CreateCertificate server over TLS on loopback, signing
// with a test authority whose root is also what istiod's serving
// certificate (for "istiod.test") chains to.
type testCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	auth     *identity.Authority
	requests atomic.Int64
	mu       sync.Mutex
	issueAs  spiffeid.ID // when set, issue this identity whatever is asked
	lastMeta metadata.MD
}

func (c *testCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	c.requests.Add(1)
	md, _ := metadata.FromIncomingContext(ctx)
	c.mu.Lock()
	c.lastMeta = md
	as := c.issueAs
	c.mu.Unlock()
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok-1" {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	if req.GetMetadata().GetFields()["ImpersonatedIdentity"] != nil {
		return nil, status.Error(codes.PermissionDenied, "waypoints do not impersonate")
	}
	csr, id, err := identity.ParseCSR([]byte(req.GetCsr()))
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !as.IsZero() {
		id = as
	}
	chain, err := c.auth.Sign(csr, id, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	var out []string
	for _, cert := range append(chain, c.auth.Root()) {
		out = append(out, string(identity.EncodeCertsPEM([]*x509.Certificate{cert})))
	}
	return &pb.IstioCertificateResponse{CertChain: out}, nil
}

func startCA(t *testing.T) (*testCA, string, string) {
	t.Helper()
	auth, err := identity.NewAuthority(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chainPEM, keyPEM, err := auth.MarshalPEM()
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := identity.ParseKeyPEM(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "istiod"}, DNSNames: []string{"istiod.test"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(nil, tmpl, auth.Root(), srvKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "root-cert.pem")
	roots, _ := identity.ParseCertsPEM(chainPEM)
	if err := os.WriteFile(rootFile, identity.EncodeCertsPEM(roots[len(roots)-1:]), 0o600); err != nil {
		t.Fatal(err)
	}
	tokFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokFile, []byte("tok-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ca := &testCA{auth: auth}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: srvKey}}})))
	pb.RegisterIstioCertificateServiceServer(srv, ca)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ca, ln.Addr().String(), dir
}

func newManager(t *testing.T, addr, dir string, ttl time.Duration) *Manager {
	t.Helper()
	roots, err := LoadRoots(filepath.Join(dir, "root-cert.pem"), td, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := identity.NewID("cluster.local", "shop", "waypoint")
	m, err := New(Config{ID: id, CAAddress: addr, TLS: ControlPlaneTLS(roots, "istiod.test"), Token: TokenFile(filepath.Join(dir, "token")),
		Bundle: roots.Bundle(), TTL: ttl, MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func run(t *testing.T, m *Manager) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestManager_GetsItsOwnIdentityAndRenewsAtHalfLife(t *testing.T) {
	ca, addr, dir := startCA(t)
	m := newManager(t, addr, dir, 4*time.Second)
	if m.Ready() == nil {
		t.Fatal("ready before any certificate")
	}
	run(t, m)
	waitFor(t, "a certificate", func() bool { return m.Ready() == nil })
	s, _ := m.GetX509SVID()
	if s.ID.String() != "spiffe://cluster.local/ns/shop/sa/waypoint" {
		t.Errorf("identity %s", s.ID)
	}
	if len(s.Certificates) != 1 {
		t.Errorf("chain of %d certificates, want the leaf without the root", len(s.Certificates))
	}
	ca.mu.Lock()
	md := ca.lastMeta
	ca.mu.Unlock()
	if len(md.Get("clusterid")) != 0 {
		t.Errorf("unexpected clusterid header %v", md.Get("clusterid"))
	}
	first := s.Certificates[0].SerialNumber
	// 4s certificates renew after about 2s.
	waitFor(t, "renewal", func() bool {
		s, _ := m.GetX509SVID()
		return s.Certificates[0].SerialNumber.Cmp(first) != 0
	})
	if n := ca.requests.Load(); n < 2 || n > 3 {
		t.Errorf("%d CA requests, want 2 (first and one renewal)", n)
	}
	c, err := m.TLSCertificate()
	if err != nil || c.Leaf == nil && len(c.Certificate) == 0 {
		t.Errorf("TLS certificate: %v", err)
	}
}

func TestManager_RefusesACertificateForSomeoneElse(t *testing.T) {
	ca, addr, dir := startCA(t)
	ca.issueAs, _ = identity.NewID("cluster.local", "shop", "other")
	m := newManager(t, addr, dir, time.Hour)
	run(t, m)
	waitFor(t, "two attempts", func() bool { return ca.requests.Load() >= 2 })
	err := m.Ready()
	if err == nil || !strings.Contains(err.Error(), "when spiffe://cluster.local/ns/shop/sa/waypoint was asked for") {
		t.Errorf("Ready() = %v, want the wrong identity refused", err)
	}
}

func TestManager_VerifiesTheCAServerName(t *testing.T) {
	ca, addr, dir := startCA(t)
	roots, err := LoadRoots(filepath.Join(dir, "root-cert.pem"), td, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := identity.NewID("cluster.local", "shop", "waypoint")
	m, err := New(Config{ID: id, CAAddress: addr, TLS: ControlPlaneTLS(roots, "impostor.test"), Token: TokenFile(filepath.Join(dir, "token")),
		Bundle: roots.Bundle(), MinBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err = m.fetch(ctx)
	if err == nil || ca.requests.Load() != 0 {
		t.Errorf("fetch from a CA whose certificate is for another name: %v (CA saw %d requests)", err, ca.requests.Load())
	}
}
