package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// GenerateKey returns a new ECDSA P-256 private key.
func GenerateKey() (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ECDSA P-256 key: %w", err)
	}
	return key, nil
}

// NewCSR returns a PEM-encoded certificate request signed by key that asks for
// id as its only subject alternative name (a URI SAN).
func NewCSR(key crypto.Signer, id spiffeid.ID) ([]byte, error) {
	if id.IsZero() {
		return nil, errors.New("create CSR: empty SPIFFE ID")
	}
	tmpl := &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR for %s: %w", id, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ParseCSR decodes a PEM certificate request, checks its signature and that it
// asks for exactly one SAN, a SPIFFE ID URI, and returns the request and that ID.
// Keys other than ECDSA P-256/P-384, RSA >= 2048 bits and Ed25519 are refused.
func ParseCSR(pemBytes []byte) (*x509.CertificateRequest, spiffeid.ID, error) {
	block, rest := pem.Decode(pemBytes)
	if block == nil {
		return nil, spiffeid.ID{}, errors.New("parse CSR: no PEM block")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, spiffeid.ID{}, fmt.Errorf("parse CSR: unexpected PEM block type %q", block.Type)
	}
	if len(pemTrim(rest)) != 0 {
		return nil, spiffeid.ID{}, errors.New("parse CSR: trailing data after the PEM block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("parse CSR: %w", err)
	}
	id, err := ValidateCSR(csr)
	if err != nil {
		return nil, spiffeid.ID{}, err
	}
	return csr, id, nil
}

// ValidateCSR checks a parsed request's signature, key and SANs and returns the
// SPIFFE ID it asks for.
func ValidateCSR(csr *x509.CertificateRequest) (spiffeid.ID, error) {
	if err := csr.CheckSignature(); err != nil {
		return spiffeid.ID{}, fmt.Errorf("validate CSR: bad signature: %w", err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return spiffeid.ID{}, fmt.Errorf("validate CSR: %w", err)
	}
	if len(csr.DNSNames) != 0 || len(csr.EmailAddresses) != 0 || len(csr.IPAddresses) != 0 {
		return spiffeid.ID{}, errors.New("validate CSR: only a SPIFFE ID URI SAN is allowed")
	}
	if len(csr.URIs) != 1 {
		return spiffeid.ID{}, fmt.Errorf("validate CSR: want exactly one URI SAN, got %d", len(csr.URIs))
	}
	id, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("validate CSR: URI SAN %q is not a SPIFFE ID: %w", csr.URIs[0], err)
	}
	return id, nil
}

func checkPublicKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("unsupported ECDSA curve %s", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if k.Size()*8 < 2048 {
			return fmt.Errorf("RSA key too small: %d bits", k.Size()*8)
		}
	case ed25519.PublicKey:
	case nil:
		return errors.New("no public key")
	default:
		return fmt.Errorf("unsupported public key type %T", pub)
	}
	return nil
}

// EncodeKeyPEM returns key as a PKCS#8 "PRIVATE KEY" PEM block.
func EncodeKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// EncodeCertsPEM returns certs as concatenated "CERTIFICATE" PEM blocks.
func EncodeCertsPEM(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// ParseCertsPEM parses one or more "CERTIFICATE" PEM blocks.
func ParseCertsPEM(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("parse certificates: unexpected PEM block type %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificates: %w", err)
		}
		certs = append(certs, c)
	}
	if len(pemTrim(b)) != 0 {
		return nil, errors.New("parse certificates: data that is not PEM")
	}
	if len(certs) == 0 {
		return nil, errors.New("parse certificates: no certificate found")
	}
	return certs, nil
}

// ParseKeyPEM parses a PKCS#8, SEC 1 (EC) or PKCS#1 (RSA) PEM private key.
func ParseKeyPEM(b []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, errors.New("parse private key: no PEM block")
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("parse private key: unexpected PEM block type %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("parse private key: %T is not a signer", key)
	}
	return signer, nil
}

// MarshalSVID returns the SVID's certificate chain and key as PEM.
func MarshalSVID(svid *x509svid.SVID) (certPEM, keyPEM []byte, err error) {
	keyPEM, err = EncodeKeyPEM(svid.PrivateKey)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal SVID %s: %w", svid.ID, err)
	}
	return EncodeCertsPEM(svid.Certificates), keyPEM, nil
}

func pemTrim(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\n' || b[0] == '\r' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}
