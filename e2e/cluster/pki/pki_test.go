package pki

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func generate(t *testing.T) Paths {
	t.Helper()
	p, err := Generate(t.TempDir(), Request{
		APIServerIPs: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("172.30.0.1"), net.ParseIP("10.96.0.1")},
		APIServerDNS: []string{"kubernetes.default.svc"},
		Nodes:        []Node{{Name: "node-0", IP: net.ParseIP("172.30.0.10")}},
	})
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	return p
}

func loadCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestGenerate_CertificatesCarryTheIdentitiesKubernetesChecks(t *testing.T) {
	p := generate(t)
	roots := x509.NewCertPool()
	roots.AddCert(loadCert(t, p.CACert))
	verify := func(path string, usage x509.ExtKeyUsage) *x509.Certificate {
		t.Helper()
		c := loadCert(t, path)
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("%s does not verify for %v: %v", filepath.Base(path), usage, err)
		}
		return c
	}

	api := verify(p.APIServerCert, x509.ExtKeyUsageServerAuth)
	for _, ip := range []string{"127.0.0.1", "172.30.0.1", "10.96.0.1"} {
		if err := api.VerifyHostname(ip); err != nil {
			t.Errorf("apiserver cert: %v", err)
		}
	}
	if err := api.VerifyHostname("kubernetes.default.svc"); err != nil {
		t.Errorf("apiserver cert: %v", err)
	}
	if err := api.VerifyHostname("172.30.0.99"); err == nil {
		t.Error("apiserver cert valid for an address it was not issued for")
	}

	admin := verify(p.AdminCert, x509.ExtKeyUsageClientAuth)
	if !slices.Contains(admin.Subject.Organization, "system:masters") {
		t.Errorf("admin cert organizations %v lack system:masters", admin.Subject.Organization)
	}
	cc, _ := p.KubeletClient("node-0")
	kc := verify(cc, x509.ExtKeyUsageClientAuth)
	if kc.Subject.CommonName != "system:node:node-0" || !slices.Equal(kc.Subject.Organization, []string{"system:nodes"}) {
		t.Errorf("kubelet client subject = %v, want CN=system:node:node-0 O=system:nodes", kc.Subject)
	}
	sc, _ := p.KubeletServing("node-0")
	ks := verify(sc, x509.ExtKeyUsageServerAuth)
	if err := ks.VerifyHostname("172.30.0.10"); err != nil {
		t.Errorf("kubelet serving cert: %v", err)
	}
	verify(p.APIServerKubeletCert, x509.ExtKeyUsageClientAuth)
	cm := verify(p.ControllerManagerCert, x509.ExtKeyUsageClientAuth)
	if cm.Subject.CommonName != "system:kube-controller-manager" {
		t.Errorf("controller-manager CN = %q", cm.Subject.CommonName)
	}

	for _, k := range []string{p.CAKey, p.APIServerKey, p.AdminKey, p.ServiceAccountKey} {
		st, err := os.Stat(k)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", filepath.Base(k), st.Mode().Perm())
		}
	}
	b, err := os.ReadFile(p.ServiceAccountPub)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		t.Fatalf("sa.pub is not a PEM public key")
	}
	if _, err := x509.ParsePKIXPublicKey(blk.Bytes); err != nil {
		t.Errorf("sa.pub: %v", err)
	}
}

// TestGenerate_MutualTLSBetweenIssuedPairs runs a real TLS 1.3 handshake:
// the apiserver's pair serving, the admin's pair as client, both checked
// against the CA.
func TestGenerate_MutualTLSBetweenIssuedPairs(t *testing.T) {
	p := generate(t)
	caPEM, err := os.ReadFile(p.CACert)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	srvPair, err := tls.LoadX509KeyPair(p.APIServerCert, p.APIServerKey)
	if err != nil {
		t.Fatalf("apiserver pair: %v", err)
	}
	cliPair, err := tls.LoadX509KeyPair(p.AdminCert, p.AdminKey)
	if err != nil {
		t.Fatalf("admin pair: %v", err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{srvPair},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS13,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			got <- "handshake: " + err.Error()
			return
		}
		got <- tc.ConnectionState().PeerCertificates[0].Subject.CommonName
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		RootCAs:      pool,
		Certificates: []tls.Certificate{cliPair},
		MinVersion:   tls.VersionTLS13,
	})
	if err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	c.Close()
	if cn := <-got; cn != "sandbox-admin" {
		t.Fatalf("server saw client %q, want sandbox-admin", cn)
	}
}

func TestIssue_RejectsIncompleteLeaves(t *testing.T) {
	ca, err := NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Issue(Leaf{Usage: ClientAuth}); err == nil {
		t.Error("issued a certificate without a common name")
	}
	if _, err := ca.Issue(Leaf{CommonName: "x"}); err == nil {
		t.Error("issued a certificate without a usage")
	}
	if _, err := Generate(t.TempDir(), Request{Nodes: []Node{{Name: "n"}}}); err == nil {
		t.Error("Generate accepted a node without an IP")
	}
}
