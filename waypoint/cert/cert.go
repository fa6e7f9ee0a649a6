// Package cert gets and keeps the waypoint's own workload certificate: a
// fresh key and CSR for the waypoint's SPIFFE identity sent to istiod-lite's
// CreateCertificate with the pod's projected service-account token (no
// impersonation), verified against the mesh roots, renewed at half its
// life, retried with backoff, and kept in use while the CA is unreachable
// as long as it is valid. It also loads the mesh roots and builds the TLS
// client config for the control plane. It serves no traffic.
//
// The CA client, root loading and control-plane TLS are small copies of
// ztunnel/certs (which also impersonates pods); they belong in internal/
// once both can share them.
package cert

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/internal/identity"
	pb "github.com/meshlite/meshlite/proto/ca"
)

// TokenFile returns a token source reading path on every call (the kubelet
// rotates projected tokens).
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

// ServerName is the host part of addr ("host:port").
func ServerName(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host
}

// Roots is the mesh trust bundle from a PEM file, re-read by Run.
type Roots struct {
	path   string
	bundle *x509bundle.Bundle
	log    *slog.Logger
	mu     sync.Mutex
	raw    []byte
	pool   *x509.CertPool
}

// LoadRoots reads the roots of td from path.
func LoadRoots(path string, td spiffeid.TrustDomain, log *slog.Logger) (*Roots, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Roots{path: path, bundle: x509bundle.New(td), log: log}
	if _, err := r.reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// Bundle is live: it changes in place when the file does.
func (r *Roots) Bundle() *x509bundle.Bundle { return r.bundle }

func (r *Roots) currentPool() *x509.CertPool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pool
}

func (r *Roots) reload() (bool, error) {
	raw, err := os.ReadFile(r.path)
	if err != nil {
		return false, fmt.Errorf("read mesh root certificate %s: %w", r.path, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pool != nil && bytes.Equal(raw, r.raw) {
		return false, nil
	}
	certs, err := identity.ParseCertsPEM(raw)
	if err != nil || len(certs) == 0 {
		return false, fmt.Errorf("mesh root certificate %s: no usable certificate (%v)", r.path, err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		if !c.IsCA {
			return false, fmt.Errorf("mesh root certificate %s: %q is not a CA", r.path, c.Subject)
		}
		pool.AddCert(c)
	}
	r.raw, r.pool = raw, pool
	r.bundle.SetX509Authorities(certs)
	return true, nil
}

// Run re-reads the roots every 10 s until ctx ends.
func (r *Roots) Run(ctx context.Context) error {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if changed, err := r.reload(); err != nil {
			r.log.Warn("mesh root certificate not reloaded; keeping the previous roots", "error", err)
		} else if changed {
			r.log.Info("mesh root certificate reloaded", "path", r.path)
		}
	}
}

// ControlPlaneTLS verifies istiod-lite's certificate for serverName against
// the live roots; TLS 1.3; no client certificate (the token authenticates).
func ControlPlaneTLS(roots *Roots, serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		// Replaced, not skipped: VerifyConnection verifies with the live pool.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("istiod presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots.currentPool(), Intermediates: inter,
				DNSName: serverName, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("verify istiod certificate for %q against the mesh root: %w", serverName, err)
			}
			return nil
		},
	}
}

// Config configures a Manager.
type Config struct {
	// ID is the waypoint's identity (from its namespace and service account).
	ID spiffeid.ID
	// CAAddress is istiod-lite's CA ("host:port"); TLS verifies it.
	CAAddress string
	TLS       *tls.Config
	// Token is the projected service-account token (audience istio-ca).
	Token     func(context.Context) (string, error)
	ClusterID string
	Bundle    *x509bundle.Bundle
	// TTL asked for (0: the CA's default).
	TTL        time.Duration
	MinBackoff time.Duration // 500 ms
	MaxBackoff time.Duration // 30 s
	Log        *slog.Logger
	// DialOptions are added to the gRPC client (tests).
	DialOptions []grpc.DialOption
}

// Manager holds the waypoint's certificate. It is an x509svid.Source.
type Manager struct {
	cfg    Config
	cc     *grpc.ClientConn
	client pb.IstioCertificateServiceClient

	mu      sync.Mutex
	svid    *x509svid.SVID
	lastErr error
}

// New builds a manager; Run fetches and renews.
func New(cfg Config) (*Manager, error) {
	if cfg.CAAddress == "" || cfg.TLS == nil || cfg.Token == nil || cfg.Bundle == nil || cfg.ID.IsZero() {
		return nil, errors.New("waypoint cert: identity, CA address, TLS, token and bundle are required")
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 500 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg.TLS))}, cfg.DialOptions...)
	cc, err := grpc.NewClient(cfg.CAAddress, opts...)
	if err != nil {
		return nil, fmt.Errorf("CA client for %s: %w", cfg.CAAddress, err)
	}
	return &Manager{cfg: cfg, cc: cc, client: pb.NewIstioCertificateServiceClient(cc)}, nil
}

// GetX509SVID returns the current certificate while it is valid.
func (m *Manager) GetX509SVID() (*x509svid.SVID, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.svid == nil {
		if m.lastErr != nil {
			return nil, fmt.Errorf("no certificate for %s: %w", m.cfg.ID, m.lastErr)
		}
		return nil, fmt.Errorf("no certificate for %s yet", m.cfg.ID)
	}
	if exp := m.svid.Certificates[0].NotAfter; time.Now().After(exp) {
		return nil, fmt.Errorf("certificate for %s expired at %s", m.cfg.ID, exp.Format(time.RFC3339))
	}
	return m.svid, nil
}

// Ready is nil while a valid certificate is held.
func (m *Manager) Ready() error {
	_, err := m.GetX509SVID()
	return err
}

// TLSCertificate is the certificate the HBONE server presents.
func (m *Manager) TLSCertificate() (*tls.Certificate, error) {
	s, err := m.GetX509SVID()
	if err != nil {
		return nil, err
	}
	return identity.TLSCertificate(s), nil
}

// Run obtains the certificate and renews it at about half its remaining
// life until ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	defer m.cc.Close()
	backoff := m.cfg.MinBackoff
	for {
		svid, err := m.fetch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var wait time.Duration
		m.mu.Lock()
		if err != nil {
			m.lastErr = err
			wait = backoff/2 + rand.N(backoff/2+1)
			backoff = min(2*backoff, m.cfg.MaxBackoff)
			m.cfg.Log.Warn("certificate request failed", "identity", m.cfg.ID.String(), "error", err, "retry_in", wait)
		} else {
			m.svid, m.lastErr = svid, nil
			backoff = m.cfg.MinBackoff
			left := time.Until(svid.Certificates[0].NotAfter)
			wait = max(left/2-rand.N(left/10+1), time.Second)
			m.cfg.Log.Info("certificate issued", "identity", m.cfg.ID.String(), "expires", svid.Certificates[0].NotAfter, "renew_in", wait.Round(time.Second))
		}
		m.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

func (m *Manager) fetch(ctx context.Context) (*x509svid.SVID, error) {
	key, err := identity.GenerateKey()
	if err != nil {
		return nil, err
	}
	csr, err := identity.NewCSR(key, m.cfg.ID)
	if err != nil {
		return nil, err
	}
	tok, err := m.cfg.Token(ctx)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	md := metadata.Pairs("authorization", "Bearer "+tok)
	if m.cfg.ClusterID != "" {
		md.Set("clusterid", m.cfg.ClusterID)
	}
	resp, err := m.client.CreateCertificate(metadata.NewOutgoingContext(rctx, md), &pb.IstioCertificateRequest{
		Csr: string(csr), ValidityDuration: int64(m.cfg.TTL / time.Second)})
	if err != nil {
		st := status.Convert(err)
		return nil, fmt.Errorf("CA %s refused a certificate for %s: %s: %s", m.cfg.CAAddress, m.cfg.ID, st.Code(), st.Message())
	}
	var chain []*x509.Certificate
	for i, p := range resp.GetCertChain() {
		cs, err := identity.ParseCertsPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("CA response certificate %d: %w", i, err)
		}
		chain = append(chain, cs...)
	}
	if n := len(chain); n > 1 && chain[n-1].IsCA && chain[n-1].CheckSignatureFrom(chain[n-1]) == nil {
		chain = chain[:n-1]
	}
	if len(chain) == 0 {
		return nil, errors.New("CA response has no certificate")
	}
	got, _, err := x509svid.Verify(chain, m.cfg.Bundle)
	if err != nil {
		return nil, fmt.Errorf("certificate from the CA does not verify against the mesh root: %w", err)
	}
	if got != m.cfg.ID {
		return nil, fmt.Errorf("CA issued a certificate for %s when %s was asked for", got, m.cfg.ID)
	}
	pub, ok := chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("certificate from the CA is not for the key we sent")
	}
	return &x509svid.SVID{ID: m.cfg.ID, Certificates: chain, PrivateKey: key}, nil
}
