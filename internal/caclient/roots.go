package caclient

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/identity"
)

// DefaultRootCertPath is where the istio-ca-root-cert ConfigMap's
// root-cert.pem is mounted.
const DefaultRootCertPath = "/var/run/secrets/istio/root-cert.pem"

// Roots is the mesh trust bundle read from a PEM file (the root
// certificates of the mesh CA). Its Bundle is live: Run re-reads the file
// when it changes, as a mounted ConfigMap does when the root rotates.
type Roots struct {
	path     string
	bundle   *x509bundle.Bundle
	log      *slog.Logger
	interval time.Duration // how often Run re-reads the file

	mu   sync.Mutex
	raw  []byte
	pool *x509.CertPool
}

// LoadRoots reads the root certificates of trust domain td from path.
func LoadRoots(path string, td spiffeid.TrustDomain, log *slog.Logger) (*Roots, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Roots{path: path, bundle: x509bundle.New(td), log: log, interval: 10 * time.Second}
	if _, err := r.Reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// Bundle is the trust bundle; it changes in place on reload.
func (r *Roots) Bundle() *x509bundle.Bundle { return r.bundle }

// Pool is the current roots as a CertPool (for verifying istiod-lite).
func (r *Roots) Pool() *x509.CertPool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pool
}

// Reload re-reads the file; it reports whether the roots changed. A file
// that cannot be read or holds no certificate leaves the roots as they were.
func (r *Roots) Reload() (bool, error) {
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
	if err != nil {
		return false, fmt.Errorf("mesh root certificate %s: %w", r.path, err)
	}
	if len(certs) == 0 {
		return false, fmt.Errorf("mesh root certificate %s: no certificate", r.path)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		if !c.IsCA {
			return false, fmt.Errorf("mesh root certificate %s: %q is not a CA certificate", r.path, c.Subject)
		}
		pool.AddCert(c)
	}
	r.raw, r.pool = raw, pool
	r.bundle.SetX509Authorities(certs)
	return true, nil
}

// Run re-reads the file every 10 s until ctx ends.
func (r *Roots) Run(ctx context.Context) error {
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		changed, err := r.Reload()
		switch {
		case err != nil && !errors.Is(err, context.Canceled):
			r.log.Warn("mesh root certificate not reloaded; keeping the previous roots", "error", err)
		case changed:
			r.log.Info("mesh root certificate reloaded", "path", r.path)
		}
	}
}
