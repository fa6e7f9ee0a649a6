// Package caclienttest runs a real IstioCertificateService for tests of CA
// clients: gRPC over TLS 1.3 on loopback, a serving certificate for
// 127.0.0.1 (and the names asked for) under a test authority, a required
// Bearer token and, optionally, clusterid header, and a policy deciding
// whom each certificate is for. It records every call. It is for tests
// only; nothing in a component may import it.
package caclienttest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/identity"
	pb "github.com/meshlite/meshlite/proto/ca"
)

// Call is what the CA saw of one request (refused ones too).
type Call struct {
	Metadata metadata.MD
	// Impersonated is the ImpersonatedIdentity asked for ("" when none).
	Impersonated string
	// CSRID is the identity the CSR asks for.
	CSRID spiffeid.ID
}

// Policy decides whom a call's certificate is for; an error (a gRPC
// status) refuses it.
type Policy func(Call) (spiffeid.ID, error)

// OwnIdentity issues for the CSR's identity and refuses impersonation, as
// the CA does for a caller asking for itself.
func OwnIdentity(c Call) (spiffeid.ID, error) {
	if c.Impersonated != "" {
		return spiffeid.ID{}, status.Error(codes.PermissionDenied, "impersonation not allowed")
	}
	return c.CSRID, nil
}

// Options configures Start.
type Options struct {
	// TrustDomain of the test authority (cluster.local).
	TrustDomain spiffeid.TrustDomain
	// Token is the Bearer token required ("test-token").
	Token string
	// ClusterID, when set, must be in the clusterid header.
	ClusterID string
	// DNSNames are put in the serving certificate beside 127.0.0.1.
	DNSNames []string
	// Policy decides whom certificates are for (OwnIdentity).
	Policy Policy
}

// CA is a running test CA.
type CA struct {
	pb.UnimplementedIstioCertificateServiceServer
	t    testing.TB
	opts Options
	cert tls.Certificate

	// Authority signs certificates; its root signs the serving certificate.
	Authority *identity.Authority
	// Addr is the CA's "host:port" on 127.0.0.1.
	Addr string
	// RootFile holds the authority's root (PEM); TokenFile the token.
	RootFile, TokenFile string

	mu     sync.Mutex
	srv    *grpc.Server
	policy Policy
	calls  []Call
}

// Start runs a CA until the test ends.
func Start(t testing.TB, opts Options) *CA {
	t.Helper()
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")
	}
	if opts.Token == "" {
		opts.Token = "test-token"
	}
	if opts.Policy == nil {
		opts.Policy = OwnIdentity
	}
	auth, err := identity.NewAuthority(opts.TrustDomain, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &CA{t: t, opts: opts, Authority: auth, policy: opts.Policy,
		RootFile: filepath.Join(dir, "root-cert.pem"), TokenFile: filepath.Join(dir, "istio-token")}
	if err := os.WriteFile(c.RootFile, identity.EncodeCertsPEM([]*x509.Certificate{auth.Root()}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.TokenFile, []byte(opts.Token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.cert = c.servingCert()
	c.listen("127.0.0.1:0")
	t.Cleanup(c.Stop)
	return c
}

// servingCert issues istiod's TLS server certificate under the authority.
func (c *CA) servingCert() tls.Certificate {
	c.t.Helper()
	_, keyPEM, err := c.Authority.MarshalPEM()
	if err != nil {
		c.t.Fatal(err)
	}
	caKey, err := identity.ParseKeyPEM(keyPEM)
	if err != nil {
		c.t.Fatal(err)
	}
	key, err := identity.GenerateKey()
	if err != nil {
		c.t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(99), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: c.opts.DNSNames}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Authority.Root(), key.Public(), caKey)
	if err != nil {
		c.t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func (c *CA) listen(addr string) {
	c.t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		c.t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{c.cert}, MinVersion: tls.VersionTLS13})))
	pb.RegisterIstioCertificateServiceServer(g, c)
	c.mu.Lock()
	c.srv, c.Addr = g, lis.Addr().String()
	c.mu.Unlock()
	go g.Serve(lis)
}

// Stop stops serving (an outage); Restart serves again on the same address.
func (c *CA) Stop() {
	c.mu.Lock()
	g := c.srv
	c.mu.Unlock()
	g.Stop()
}

// Restart serves again on the address of the stopped CA.
func (c *CA) Restart() { c.listen(c.Addr) }

// SetPolicy replaces the policy for the next calls.
func (c *CA) SetPolicy(p Policy) {
	c.mu.Lock()
	c.policy = p
	c.mu.Unlock()
}

// Calls returns the calls seen so far, oldest first.
func (c *CA) Calls() []Call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Call(nil), c.calls...)
}

// CreateCertificate checks the token and cluster, asks the policy whom the
// certificate is for and signs the CSR for it. The reply ends with the
// root, as istiod's does.
func (c *CA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	csr, csrID, csrErr := identity.ParseCSR([]byte(req.GetCsr()))
	call := Call{Metadata: md, CSRID: csrID,
		Impersonated: req.GetMetadata().GetFields()[caclient.MetaImpersonatedIdentity].GetStringValue()}
	c.mu.Lock()
	c.calls = append(c.calls, call)
	policy := c.policy
	c.mu.Unlock()
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+c.opts.Token {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	if c.opts.ClusterID != "" {
		if got := md.Get(caclient.HeaderClusterID); len(got) != 1 || got[0] != c.opts.ClusterID {
			return nil, status.Errorf(codes.PermissionDenied, "cluster %v is not this cluster", got)
		}
	}
	if csrErr != nil {
		return nil, status.Error(codes.InvalidArgument, csrErr.Error())
	}
	id, err := policy(call)
	if err != nil {
		return nil, err
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl == 0 {
		ttl = time.Hour
	}
	certs, err := c.Authority.Sign(csr, id, ttl)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	resp := &pb.IstioCertificateResponse{}
	for _, x := range append(certs, c.Authority.Root()) {
		resp.CertChain = append(resp.CertChain, string(identity.EncodeCertsPEM([]*x509.Certificate{x})))
	}
	return resp, nil
}
