package identity

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// clockSkew backdates certificates so that peers whose clocks run a little
// behind accept them at once.
const clockSkew = time.Minute

// Authority signs X.509 SVIDs for one trust domain. It is safe for concurrent use.
type Authority struct {
	td    spiffeid.TrustDomain
	cert  *x509.Certificate   // the signing certificate
	key   crypto.Signer       // its key
	chain []*x509.Certificate // intermediates between cert and the root, cert first; empty when cert is the root
	root  *x509.Certificate
	now   func() time.Time
}

// NewAuthority creates a self-signed root CA (ECDSA P-256) for td valid for ttl.
func NewAuthority(td spiffeid.TrustDomain, ttl time.Duration) (*Authority, error) {
	if td.IsZero() {
		return nil, errors.New("create CA: empty trust domain")
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("create CA for %s: ttl must be positive, got %s", td, ttl)
	}
	key, err := GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("create CA for %s: %w", td, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("create CA for %s: %w", td, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{td.Name()}, CommonName: "meshlite root CA"},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA for %s: sign root: %w", td, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("create CA for %s: parse root: %w", td, err)
	}
	return &Authority{td: td, cert: cert, key: key, root: cert, now: time.Now}, nil
}

// LoadAuthority loads a CA from PEM. certChainPEM holds the signing certificate
// first, then any intermediates, and ends with the self-signed root (a root CA
// is just one certificate). keyPEM is the signing certificate's private key.
func LoadAuthority(td spiffeid.TrustDomain, certChainPEM, keyPEM []byte) (*Authority, error) {
	if td.IsZero() {
		return nil, errors.New("load CA: empty trust domain")
	}
	certs, err := ParseCertsPEM(certChainPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA for %s: %w", td, err)
	}
	key, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA for %s: %w", td, err)
	}
	signing := certs[0]
	if !signing.IsCA || signing.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA for %s: signing certificate is not a CA with keyCertSign", td)
	}
	if !publicKeysEqual(signing.PublicKey, key.Public()) {
		return nil, fmt.Errorf("load CA for %s: private key does not match the signing certificate", td)
	}
	root := certs[len(certs)-1]
	if err := root.CheckSignatureFrom(root); err != nil || !bytes.Equal(root.RawIssuer, root.RawSubject) {
		return nil, fmt.Errorf("load CA for %s: the last certificate of the chain must be a self-signed root", td)
	}
	for i := 0; i+1 < len(certs); i++ {
		if err := certs[i].CheckSignatureFrom(certs[i+1]); err != nil {
			return nil, fmt.Errorf("load CA for %s: certificate %d is not signed by certificate %d: %w", td, i, i+1, err)
		}
	}
	return &Authority{td: td, cert: signing, key: key, chain: certs[:len(certs)-1], root: root, now: time.Now}, nil
}

// TrustDomain returns the trust domain the authority signs for.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// Root returns the root certificate of the authority's chain.
func (a *Authority) Root() *x509.Certificate { return a.root }

// Bundle returns a trust bundle holding the authority's root.
func (a *Authority) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(a.td, []*x509.Certificate{a.root})
}

// MarshalPEM returns the authority's certificate chain (signing certificate
// first, root last) and private key as PEM, in the form LoadAuthority reads.
func (a *Authority) MarshalPEM() (certChainPEM, keyPEM []byte, err error) {
	keyPEM, err = EncodeKeyPEM(a.key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal CA for %s: %w", a.td, err)
	}
	chain := append(append([]*x509.Certificate{}, a.chain...), a.root)
	return EncodeCertsPEM(chain), keyPEM, nil
}

// Sign issues a leaf certificate for id to the key of csr, valid for ttl (cut
// at the CA's own expiry). The CSR's signature is checked but its SANs are
// ignored: the caller decides the identity. It returns the leaf followed by
// the intermediates up to (not including) the root.
func (a *Authority) Sign(csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if csr == nil {
		return nil, errors.New("sign: nil CSR")
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("sign %s: bad CSR signature: %w", id, err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	return a.signKey(csr.PublicKey, id, ttl)
}

func (a *Authority) signKey(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if id.IsZero() || id.Path() == "" {
		return nil, fmt.Errorf("sign: %q is not a workload SPIFFE ID", id)
	}
	if !id.MemberOf(a.td) {
		return nil, fmt.Errorf("sign %s: not in trust domain %s", id, a.td)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("sign %s: ttl must be positive, got %s", id, ttl)
	}
	now := a.now()
	notAfter := now.Add(ttl)
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("sign %s: CA certificate expired at %s", id, a.cert.NotAfter)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, pub, a.key)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("sign %s: parse leaf: %w", id, err)
	}
	return append([]*x509.Certificate{leaf}, a.chain...), nil
}

// NewSVID generates a key for id and signs it: a convenience for tests and
// for callers that hold the CA in-process.
func (a *Authority) NewSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	key, err := GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("issue SVID for %s: %w", id, err)
	}
	certs, err := a.signKey(key.Public(), id, ttl)
	if err != nil {
		return nil, fmt.Errorf("issue SVID: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}, nil
}

func newSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return serial.Add(serial, big.NewInt(1)), nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ka, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ka.Equal(b)
}
