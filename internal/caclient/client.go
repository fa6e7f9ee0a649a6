package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
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

// Request is one certificate request.
type Request struct {
	// ID is the identity the certificate must be for; the CSR asks for it.
	ID spiffeid.ID
	// Impersonate sends ID as ImpersonatedIdentity: a node proxy asking on
	// behalf of a local pod. Without it the CA issues for the caller's own
	// (token) identity.
	Impersonate bool
	// TTL is the lifetime asked for (0: the CA's default).
	TTL time.Duration
}

// Signer has a CSR signed and returns the chain, leaf first. Client is
// the real one.
type Signer interface {
	Sign(ctx context.Context, req Request, csrPEM []byte) ([]*x509.Certificate, error)
}

// Config configures a Client.
type Config struct {
	// Address is the CA, "host:port" (istiod.istio-system.svc:15012).
	Address string
	// TLS verifies the CA (ControlPlaneTLS).
	TLS *tls.Config
	// Token returns the caller's service-account token (audience istio-ca).
	Token func(context.Context) (string, error)
	// ClusterID, if set, is sent in the clusterid header.
	ClusterID string
	// Timeout bounds one request (10 s).
	Timeout time.Duration
	// DialOptions are added to the gRPC client (tests).
	DialOptions []grpc.DialOption
}

// Client asks istiod-lite's IstioCertificateService for certificates.
type Client struct {
	cfg    Config
	cc     *grpc.ClientConn
	client pb.IstioCertificateServiceClient
}

// New returns a client; it connects lazily.
func New(cfg Config) (*Client, error) {
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
	return &Client{cfg: cfg, cc: cc, client: pb.NewIstioCertificateServiceClient(cc)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.cc.Close() }

// Sign asks the CA to sign csrPEM for req. It returns the leaf and
// intermediates, without a trailing self-signed root (peers have the root
// already). It does not check whom the certificate is for (Issue does).
func (c *Client) Sign(ctx context.Context, req Request, csrPEM []byte) ([]*x509.Certificate, error) {
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
	pr := &pb.IstioCertificateRequest{Csr: string(csrPEM), ValidityDuration: int64(req.TTL / time.Second)}
	if req.Impersonate {
		if pr.Metadata, err = structpb.NewStruct(map[string]any{MetaImpersonatedIdentity: req.ID.String()}); err != nil {
			return nil, fmt.Errorf("CSR metadata: %w", err)
		}
	}
	resp, err := c.client.CreateCertificate(ctx, pr)
	if err != nil {
		st := status.Convert(err)
		return nil, fmt.Errorf("CA %s refused a certificate for %s: %s: %s", c.cfg.Address, req.ID, st.Code(), st.Message())
	}
	chain, err := parseChain(resp.GetCertChain())
	if err != nil {
		return nil, fmt.Errorf("CA response for %s: %w", req.ID, err)
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
