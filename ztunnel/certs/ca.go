package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshlite/meshlite/internal/identity"
	pb "github.com/meshlite/meshlite/proto/ca"
)

// Names the CA reads from a request, as Istio's CA does.
const (
	// MetaImpersonatedIdentity in the request metadata names the pod
	// identity a node proxy asks for.
	MetaImpersonatedIdentity = "ImpersonatedIdentity"
	// HeaderClusterID is the gRPC header naming the caller's cluster.
	HeaderClusterID = "clusterid"
)

// DefaultTokenPath is where ztunnel's projected service-account token
// (audience istio-ca) is mounted.
const DefaultTokenPath = "/var/run/secrets/tokens/istio-token"

// TokenFile returns a token source that reads path on every call, so a
// projected token the kubelet rotates is picked up.
func TokenFile(path string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("read service-account token: %w", err)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", fmt.Errorf("service-account token %s is empty", path)
		}
		return tok, nil
	}
}

// ServerName is the name to verify istiod-lite's certificate against when
// none is configured: the host part of addr ("host:port").
func ServerName(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host
}

// ControlPlaneTLS is the client side of istiod-lite's port 15012: TLS 1.3,
// the server's chain verified against the current roots (so a reloaded root
// applies to the next connection) and its certificate valid for serverName
// (a DNS name or an IP). No client certificate: callers use their token.
func ControlPlaneTLS(roots *Roots, serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		// The standard verification is replaced, not skipped:
		// VerifyConnection below runs it with the live root pool.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("istiod presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				Roots: roots.Pool(), Intermediates: inter, DNSName: serverName,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("verify istiod certificate for %q against the mesh root: %w", serverName, err)
			}
			return nil
		},
	}
}

// CAConfig configures a CAClient.
type CAConfig struct {
	// Address is the CA, "host:port" (istiod.istio-system.svc:15012).
	Address string
	// TLS verifies the CA (ControlPlaneTLS).
	TLS *tls.Config
	// Token returns ztunnel's service-account token (audience istio-ca).
	Token func(context.Context) (string, error)
	// ClusterID is sent in the clusterid header.
	ClusterID string
	// Timeout bounds one request (10 s).
	Timeout     time.Duration
	DialOptions []grpc.DialOption
}

// CAClient asks istiod-lite's IstioCertificateService for pod
// certificates on behalf of the pods of this node.
type CAClient struct {
	cfg    CAConfig
	cc     *grpc.ClientConn
	client pb.IstioCertificateServiceClient
}

// NewCAClient returns a client; it connects lazily.
func NewCAClient(cfg CAConfig) (*CAClient, error) {
	if cfg.Address == "" || cfg.TLS == nil || cfg.Token == nil {
		return nil, errors.New("CA client: address, TLS and token are required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg.TLS))}, cfg.DialOptions...)
	cc, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("CA client for %s: %w", cfg.Address, err)
	}
	return &CAClient{cfg: cfg, cc: cc, client: pb.NewIstioCertificateServiceClient(cc)}, nil
}

// Close closes the connection.
func (c *CAClient) Close() error { return c.cc.Close() }

// Sign asks the CA to sign csrPEM for id (impersonated) with lifetime ttl
// (0: the CA's default). It returns the leaf and intermediates, without a
// trailing self-signed root (peers have the root already).
func (c *CAClient) Sign(ctx context.Context, id spiffeid.ID, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	tok, err := c.cfg.Token(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	md := metadata.Pairs("authorization", "Bearer "+tok)
	if c.cfg.ClusterID != "" {
		md.Set(HeaderClusterID, c.cfg.ClusterID)
	}
	ctx = metadata.NewOutgoingContext(ctx, md)
	meta, err := structpb.NewStruct(map[string]any{MetaImpersonatedIdentity: id.String()})
	if err != nil {
		return nil, fmt.Errorf("CSR metadata: %w", err)
	}
	resp, err := c.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(csrPEM), ValidityDuration: int64(ttl / time.Second), Metadata: meta,
	})
	if err != nil {
		st := status.Convert(err)
		return nil, fmt.Errorf("CA %s refused a certificate for %s: %s: %s", c.cfg.Address, id, st.Code(), st.Message())
	}
	chain, err := parseChain(resp.GetCertChain())
	if err != nil {
		return nil, fmt.Errorf("CA response for %s: %w", id, err)
	}
	return chain, nil
}

// parseChain reads the PEM certificates of a CA response, leaf first, and
// drops a trailing self-signed root.
func parseChain(pems []string) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	for i, p := range pems {
		certs, err := identity.ParseCertsPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", i, err)
		}
		chain = append(chain, certs...)
	}
	if len(chain) == 0 {
		return nil, errors.New("no certificate")
	}
	if n := len(chain); n > 1 && isSelfSigned(chain[n-1]) {
		chain = chain[:n-1]
	}
	return chain, nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.IsCA && c.CheckSignatureFrom(c) == nil
}
