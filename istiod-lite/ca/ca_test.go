package ca

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"

	"github.com/meshlite/meshlite/internal/identity"
)

// intermediate makes an intermediate CA under root's key.
func intermediate(t *testing.T, root *identity.Authority) (certPEM, keyPEM []byte) {
	t.Helper()
	rootChain, rootKeyPEM, err := root.MarshalPEM()
	if err != nil {
		t.Fatal(err)
	}
	rootCert, _ := identity.ParseCertsPEM(rootChain)
	rootKey, err := identity.ParseKeyPEM(rootKeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "intermediate"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true,
		URIs: []*url.URL{{Scheme: "spiffe", Host: "cluster.local"}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, rootCert[0], key.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	kp, _ := identity.EncodeKeyPEM(key)
	return identity.EncodeCertsPEM([]*x509.Certificate{c}), kp
}

func TestFromPlugged_IntermediateSignsChainsToRoot(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	root, err := identity.NewAuthority(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rootPEM := identity.EncodeCertsPEM([]*x509.Certificate{root.Root()})
	ca, caKey := intermediate(t, root)
	for _, tc := range []struct {
		name  string
		chain []byte
	}{
		{"cert-chain holds intermediate and root", append(append([]byte{}, ca...), rootPEM...)},
		{"cert-chain empty", nil},
	} {
		a, err := fromPlugged(td, &corev1.Secret{Data: map[string][]byte{
			keyCACert: ca, keyCAKey: caKey, keyCertChain: tc.chain, keyRootCert: rootPEM,
		}})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if !a.Root().Equal(root.Root()) {
			t.Errorf("%s: root is not the plugged root", tc.name)
		}
		id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
		svid, err := a.NewSVID(id, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if len(svid.Certificates) != 2 {
			t.Errorf("%s: leaf chain has %d certificates, want leaf + intermediate", tc.name, len(svid.Certificates))
		}
		pool := x509.NewCertPool()
		pool.AddCert(root.Root())
		inter := x509.NewCertPool()
		inter.AddCert(svid.Certificates[1])
		if _, err := svid.Certificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s: leaf does not verify to the root: %v", tc.name, err)
		}
	}
	if _, err := fromPlugged(td, &corev1.Secret{Data: map[string][]byte{keyCACert: ca, keyRootCert: rootPEM}}); err == nil {
		t.Error("a plugged CA without its key was accepted")
	}
	other, _ := identity.NewAuthority(td, time.Hour)
	if _, err := fromPlugged(td, &corev1.Secret{Data: map[string][]byte{keyCACert: ca, keyCAKey: caKey,
		keyRootCert: identity.EncodeCertsPEM([]*x509.Certificate{other.Root()})}}); err == nil {
		t.Error("an intermediate with the wrong root was accepted")
	}
}

func TestServingCert_HasDNSAndSPIFFENames(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	a, _ := identity.NewAuthority(td, time.Hour)
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/istiod")
	s, err := NewServingCert(a, id, []string{"istiod.istio-system.svc", "127.0.0.1"}, 10*time.Minute, discard())
	if err != nil {
		t.Fatal(err)
	}
	leaf := s.Certificate().Leaf
	pool := x509.NewCertPool()
	pool.AddCert(a.Root())
	for _, name := range []string{"istiod.istio-system.svc", "127.0.0.1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: name}); err != nil {
			t.Errorf("serving certificate not valid for %s: %v", name, err)
		}
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URI SANs %v, want %s", leaf.URIs, id)
	}
	if cfg := s.TLSConfig(); cfg.MinVersion != 0x0304 {
		t.Errorf("serving TLS minimum version %x, want TLS 1.3", cfg.MinVersion)
	}
}

// FuzzParseCSR: arbitrary CSR text is refused with an error, never a panic.
func FuzzParseCSR(f *testing.F) {
	key, _ := identity.GenerateKey()
	csr, _ := identity.NewCSR(key, spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"))
	f.Add(string(csr))
	f.Add("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := parseCSR(s)
		if err == nil && c == nil {
			t.Fatal("nil CSR without error")
		}
	})
}
