package ca

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/identity"
)

// ServingCert is istiod-lite's own TLS certificate for port 15012, issued by
// the mesh CA for its SPIFFE ID and the DNS names clients dial, and renewed
// at half its lifetime.
type ServingCert struct {
	authority *identity.Authority
	id        spiffeid.ID
	dnsNames  []string
	ips       []net.IP
	ttl       time.Duration
	log       *slog.Logger
	cur       atomic.Pointer[tls.Certificate]
}

// NewServingCert issues the first certificate at once.
func NewServingCert(a *identity.Authority, id spiffeid.ID, hosts []string, ttl time.Duration, log *slog.Logger) (*ServingCert, error) {
	s := &ServingCert{authority: a, id: id, ttl: ttl, log: log}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			s.ips = append(s.ips, ip)
		} else if h != "" {
			s.dnsNames = append(s.dnsNames, h)
		}
	}
	if err := s.renew(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *ServingCert) renew() error {
	key, err := identity.GenerateKey()
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	chainPEM, keyPEM, err := s.authority.MarshalPEM()
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	chain, err := identity.ParseCertsPEM(chainPEM)
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	caKey, err := identity.ParseKeyPEM(keyPEM)
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return fmt.Errorf("serving certificate: serial: %w", err)
	}
	now := time.Now()
	notAfter := now.Add(s.ttl)
	if notAfter.After(chain[0].NotAfter) {
		notAfter = chain[0].NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial.Add(serial, big.NewInt(1)),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{s.id.URL()},
		DNSNames:              s.dnsNames,
		IPAddresses:           s.ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, chain[0], key.Public(), caKey)
	if err != nil {
		return fmt.Errorf("serving certificate: sign: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: leaf, Certificate: [][]byte{der}}
	for _, ic := range chain[:len(chain)-1] { // intermediates, not the root
		c.Certificate = append(c.Certificate, ic.Raw)
	}
	s.cur.Store(c)
	s.log.Info("issued the serving certificate", "id", s.id.String(), "dns", s.dnsNames, "expires", notAfter)
	return nil
}

// Certificate returns the current certificate.
func (s *ServingCert) Certificate() *tls.Certificate { return s.cur.Load() }

// TLSConfig is the server side of port 15012: TLS 1.3 only, this
// certificate, no client certificate asked for (callers authenticate with
// tokens).
func (s *ServingCert) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			c := s.cur.Load()
			if c == nil {
				return nil, errors.New("no serving certificate")
			}
			return c, nil
		},
		NextProtos: []string{"h2"},
	}
}

// Run renews the certificate at half its lifetime until ctx ends; a failed
// renewal is retried every minute while the old certificate still serves.
func (s *ServingCert) Run(ctx context.Context) error {
	for {
		c := s.cur.Load()
		wait := time.Until(c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore) / 2))
		if wait < 0 {
			wait = 0
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		if err := s.renew(); err != nil {
			s.log.Error("renewing the serving certificate failed; retrying", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Minute):
			}
		}
	}
}
