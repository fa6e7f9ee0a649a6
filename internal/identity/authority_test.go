package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	tdLocal = spiffeid.RequireTrustDomainFromString("cluster.local")
	tdOther = spiffeid.RequireTrustDomainFromString("other.example")
)

func mustID(t testing.TB, td, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := NewID(td, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func mustCA(t testing.TB, td spiffeid.TrustDomain) *Authority {
	t.Helper()
	ca, err := NewAuthority(td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestCSRRoundTrip(t *testing.T) {
	id := mustID(t, "cluster.local", "ns1", "sa1")
	key, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	if key.Curve != elliptic.P256() {
		t.Fatalf("GenerateKey curve = %s, want P-256", key.Curve.Params().Name)
	}
	csrPEM, err := NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	csr, got, err := ParseCSR(csrPEM)
	if err != nil {
		t.Fatalf("ParseCSR: %v", err)
	}
	if got != id {
		t.Fatalf("ParseCSR ID = %s, want %s", got, id)
	}
	if !key.PublicKey.Equal(csr.PublicKey) {
		t.Fatal("CSR public key differs from the key that signed it")
	}
}

func TestParseCSR_Rejects(t *testing.T) {
	key, _ := GenerateKey()
	mk := func(tmpl *x509.CertificateRequest) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}
	good := mk(&x509.CertificateRequest{URIs: []*url.URL{mustID(t, "cluster.local", "a", "b").URL()}})
	goodBlock, _ := pem.Decode(good)
	badSig := append([]byte{}, goodBlock.Bytes...)
	badSig[len(badSig)-3] ^= 0xff // inside the signature BIT STRING
	tampered := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: badSig})
	u1, _ := url.Parse("spiffe://cluster.local/ns/a/sa/b")
	u2, _ := url.Parse("spiffe://cluster.local/ns/c/sa/d")
	notSpiffe, _ := url.Parse("https://example.com/x")
	tests := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"not PEM", []byte("hello"), "no PEM block"},
		{"wrong block type", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), "unexpected PEM block type"},
		{"garbage DER", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{1, 2, 3}}), "parse CSR"},
		{"bad signature", tampered, "bad signature"},
		{"no SAN", mk(&x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}), "exactly one URI SAN"},
		{"two URI SANs", mk(&x509.CertificateRequest{URIs: []*url.URL{u1, u2}}), "exactly one URI SAN"},
		{"DNS SAN", mk(&x509.CertificateRequest{URIs: []*url.URL{u1}, DNSNames: []string{"a.example"}}), "only a SPIFFE ID"},
		{"non-SPIFFE URI", mk(&x509.CertificateRequest{URIs: []*url.URL{notSpiffe}}), "not a SPIFFE ID"},
		{"trailing data", append(append([]byte{}, good...), []byte("junk")...), "trailing data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ParseCSR(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseCSR error = %v, want containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestSign(t *testing.T) {
	ca := mustCA(t, tdLocal)
	id := mustID(t, "cluster.local", "default", "sleep")
	key, _ := GenerateKey()
	csrPEM, _ := NewCSR(key, mustID(t, "cluster.local", "default", "asked-for-something-else"))
	csr, _, err := ParseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := ca.Sign(csr, id, time.Hour)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if len(chain) != 1 {
		t.Fatalf("Sign from a root CA returned %d certificates, want the leaf only", len(chain))
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Fatalf("leaf URI SANs = %v, want only %s (the CA decides, not the CSR)", leaf.URIs, id)
	}
	if leaf.IsCA {
		t.Fatal("leaf is a CA")
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
		t.Fatalf("leaf key usage = %v", leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("leaf ext key usage = %v, want serverAuth, clientAuth", leaf.ExtKeyUsage)
	}
	if d := time.Until(leaf.NotAfter); d > time.Hour || d < 59*time.Minute {
		t.Fatalf("leaf lifetime left = %s, want about 1h", d)
	}
	if !ca.Root().IsCA || ca.Root().KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Fatal("root lacks CA constraints")
	}
	// The chain verifies as an X509-SVID against the bundle.
	gotID, _, err := x509svid.Verify(chain, ca.Bundle())
	if err != nil {
		t.Fatalf("x509svid.Verify: %v", err)
	}
	if gotID != id {
		t.Fatalf("verified ID = %s, want %s", gotID, id)
	}
	// And as a usable SVID with its key.
	certPEM := EncodeCertsPEM(chain)
	keyPEM, _ := EncodeKeyPEM(key)
	if _, err := x509svid.Parse(certPEM, keyPEM); err != nil {
		t.Fatalf("x509svid.Parse of signed chain: %v", err)
	}
}

func TestSign_Rejects(t *testing.T) {
	ca := mustCA(t, tdLocal)
	key, _ := GenerateKey()
	csrPEM, _ := NewCSR(key, mustID(t, "cluster.local", "a", "b"))
	csr, _, _ := ParseCSR(csrPEM)
	tests := []struct {
		name    string
		id      spiffeid.ID
		ttl     time.Duration
		wantErr string
	}{
		{"other trust domain", mustID(t, "other.example", "a", "b"), time.Hour, "not in trust domain"},
		{"trust domain ID", tdLocal.ID(), time.Hour, "not a workload SPIFFE ID"},
		{"zero ttl", mustID(t, "cluster.local", "a", "b"), 0, "ttl must be positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ca.Sign(csr, tt.id, tt.ttl)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Sign error = %v, want containing %q", err, tt.wantErr)
			}
		})
	}
	t.Run("ttl capped at CA expiry", func(t *testing.T) {
		short, err := NewAuthority(tdLocal, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		chain, err := short.Sign(csr, mustID(t, "cluster.local", "a", "b"), 100*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if chain[0].NotAfter.After(short.Root().NotAfter) {
			t.Fatalf("leaf outlives its CA: %s > %s", chain[0].NotAfter, short.Root().NotAfter)
		}
	})
}

func TestVerify_WrongTrustDomainRejected(t *testing.T) {
	local := mustCA(t, tdLocal)
	other := mustCA(t, tdOther)
	// An SVID from another CA claiming our trust domain: the signature fails.
	imposterCA, _ := NewAuthority(tdLocal, time.Hour)
	imposter, err := imposterCA.NewSVID(mustID(t, "cluster.local", "a", "b"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := other.NewSVID(mustID(t, "other.example", "a", "b"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		svid    *x509svid.SVID
		bundle  x509bundle.Source
		wantErr string
	}{
		{"other trust domain, our bundle only", foreign, local.Bundle(), "no X.509 bundle found for trust domain"},
		{"our trust domain, wrong CA", imposter, local.Bundle(), "could not verify leaf certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := x509svid.Verify(tt.svid.Certificates, tt.bundle)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Verify error = %v, want containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestLoadAuthority(t *testing.T) {
	root := mustCA(t, tdLocal)
	chainPEM, keyPEM, err := root.MarshalPEM()
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadAuthority(tdLocal, chainPEM, keyPEM)
	if err != nil {
		t.Fatalf("LoadAuthority(root): %v", err)
	}
	svid, err := loaded.NewSVID(mustID(t, "cluster.local", "a", "b"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, root.Bundle()); err != nil {
		t.Fatalf("SVID from reloaded CA does not verify against the original root: %v", err)
	}

	// An intermediate CA signed by the root: leaves carry the intermediate.
	interKey, _ := GenerateKey()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true,
		Subject: pkix.Name{CommonName: "intermediate"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.cert, interKey.Public(), root.key)
	if err != nil {
		t.Fatal(err)
	}
	inter, _ := x509.ParseCertificate(der)
	interKeyPEM, _ := EncodeKeyPEM(interKey)
	ica, err := LoadAuthority(tdLocal, EncodeCertsPEM([]*x509.Certificate{inter, root.Root()}), interKeyPEM)
	if err != nil {
		t.Fatalf("LoadAuthority(intermediate): %v", err)
	}
	svid, err = ica.NewSVID(mustID(t, "cluster.local", "a", "b"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(svid.Certificates) != 2 {
		t.Fatalf("intermediate-signed chain has %d certs, want leaf+intermediate", len(svid.Certificates))
	}
	if _, _, err := x509svid.Verify(svid.Certificates, root.Bundle()); err != nil {
		t.Fatalf("intermediate chain does not verify: %v", err)
	}

	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherKeyPEM, _ := EncodeKeyPEM(otherKey)
	bad := []struct {
		name       string
		chain, key []byte
		wantErr    string
	}{
		{"key mismatch", chainPEM, otherKeyPEM, "does not match"},
		{"chain without root", EncodeCertsPEM([]*x509.Certificate{inter}), interKeyPEM, "self-signed root"},
		{"leaf as CA", EncodeCertsPEM(svid.Certificates[:1]), keyPEMOf(t, svid), "not a CA"},
		{"garbage", []byte("x"), keyPEM, "not PEM"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadAuthority(tdLocal, tt.chain, tt.key)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("LoadAuthority error = %v, want containing %q", err, tt.wantErr)
			}
		})
	}
}

func keyPEMOf(t *testing.T, svid *x509svid.SVID) []byte {
	_, k, err := MarshalSVID(svid)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func FuzzParseCSR(f *testing.F) {
	key, _ := GenerateKey()
	good, _ := NewCSR(key, spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"))
	f.Add(good)
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		csr, id, err := ParseCSR(b)
		if err != nil {
			return
		}
		if csr == nil || id.IsZero() {
			t.Fatalf("ParseCSR accepted input but returned csr=%v id=%v", csr, id)
		}
	})
}
