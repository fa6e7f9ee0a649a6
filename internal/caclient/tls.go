package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
)

// DefaultTokenPath is where the projected service-account token
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

// ControlPlaneTLS is the client side of istiod-lite's port 15012 (CA and
// xDS): TLS 1.3, the server's chain verified against the current roots (so
// a reloaded root applies to the next connection) and its certificate
// valid for serverName (a DNS name or an IP). No client certificate:
// callers authenticate with their token.
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
