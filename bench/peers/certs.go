package peers

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Certs are PEM files of a test CA and of a client and a server
// certificate it signed (ECDSA P-256), in Dir.
type Certs struct {
	Dir string
	// CA, ServerCert, ServerKey, ClientCert, ClientKey are file paths;
	// ServerPEM and ClientPEM hold certificate and key together (ghostunnel
	// keystores, haproxy crt).
	CA, ServerCert, ServerKey, ClientCert, ClientKey, ServerPEM, ClientPEM string
}

// NewCerts writes a fresh CA and a server certificate for serverIP (IP
// SAN) and a client certificate into dir.
func NewCerts(dir string, serverIP net.IP) (*Certs, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "meshlite bench CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	c := &Certs{Dir: dir, CA: filepath.Join(dir, "ca.crt")}
	if err := writePEM(c.CA, pem.Block{Type: "CERTIFICATE", Bytes: caDER}); err != nil {
		return nil, err
	}
	leaf := func(name string, serial int64, usage x509.ExtKeyUsage, ips []net.IP) (cert, key, both string, err error) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return "", "", "", err
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), DNSNames: []string{name}, IPAddresses: ips,
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			return "", "", "", fmt.Errorf("sign %s: %w", name, err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return "", "", "", err
		}
		cb := pem.Block{Type: "CERTIFICATE", Bytes: der}
		kb := pem.Block{Type: "PRIVATE KEY", Bytes: kder}
		cert, key, both = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"), filepath.Join(dir, name+".pem")
		if err := writePEM(cert, cb); err != nil {
			return "", "", "", err
		}
		if err := writePEM(key, kb); err != nil {
			return "", "", "", err
		}
		return cert, key, both, writePEM(both, cb, kb)
	}
	if c.ServerCert, c.ServerKey, c.ServerPEM, err = leaf(ServerName, 2, x509.ExtKeyUsageServerAuth, []net.IP{serverIP}); err != nil {
		return nil, err
	}
	if c.ClientCert, c.ClientKey, c.ClientPEM, err = leaf("bench-client", 3, x509.ExtKeyUsageClientAuth, nil); err != nil {
		return nil, err
	}
	return c, nil
}

func writePEM(path string, blocks ...pem.Block) error {
	var out []byte
	for _, b := range blocks {
		out = append(out, pem.EncodeToMemory(&b)...)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
