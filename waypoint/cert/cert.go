// Package cert gets and keeps the waypoint's own workload certificate: a
// fresh key and CSR for the waypoint's SPIFFE identity sent to istiod-lite's
// CreateCertificate with the pod's projected service-account token (no
// impersonation) through internal/caclient, verified against the mesh
// roots, renewed at half its life, retried with backoff, and kept in use
// while the CA is unreachable as long as it is valid. It serves no traffic;
// the mesh roots and the control-plane TLS are internal/caclient's.
package cert

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/identity"
)

// Config configures a Manager.
type Config struct {
	// ID is the waypoint's identity (from its namespace and service account).
	ID spiffeid.ID
	// CAAddress is istiod-lite's CA ("host:port"); TLS verifies it
	// (caclient.ControlPlaneTLS).
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
	client *caclient.Client

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
	client, err := caclient.New(caclient.Config{Address: cfg.CAAddress, TLS: cfg.TLS, Token: cfg.Token,
		ClusterID: cfg.ClusterID, DialOptions: cfg.DialOptions})
	if err != nil {
		return nil, err
	}
	return &Manager{cfg: cfg, client: client}, nil
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
	defer m.client.Close()
	backoff := caclient.Backoff{Min: m.cfg.MinBackoff, Max: m.cfg.MaxBackoff}
	for {
		svid, err := m.fetch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var wait time.Duration
		m.mu.Lock()
		if err != nil {
			m.lastErr = err
			wait = backoff.Next()
			m.cfg.Log.Warn("certificate request failed", "identity", m.cfg.ID.String(), "error", err, "retry_in", wait)
		} else {
			m.svid, m.lastErr = svid, nil
			backoff.Reset()
			wait = caclient.RenewAfter(time.Now(), svid.Certificates[0].NotAfter, time.Second)
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

// fetch has the CA issue the waypoint's own certificate, checked against
// the mesh roots.
func (m *Manager) fetch(ctx context.Context) (*x509svid.SVID, error) {
	return caclient.Issue(ctx, m.client, m.cfg.Bundle, caclient.Request{ID: m.cfg.ID, TTL: m.cfg.TTL})
}
