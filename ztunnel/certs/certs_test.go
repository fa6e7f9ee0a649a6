package certs

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/internal/identity"
	pb "github.com/meshlite/meshlite/proto/ca"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// testCA is a real IstioCertificateService over gRPC and TLS, with the
// rules that matter to ztunnel: a Bearer token, the clusterid header, and
// impersonation only for identities it was told run on the node.
type testCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	t       *testing.T
	ca      *identity.Authority
	token   string
	cluster string
	cert    tls.Certificate
	addr    string

	mu      sync.Mutex
	allowed map[string]bool
	calls   int
	meta    []metadata.MD
	imps    []string
	// ignoreImpersonation issues for the caller's own identity whatever
	// was asked (a CA that misbehaves).
	ignoreImpersonation bool
	srv                 *grpc.Server
}

func newTestCA(t *testing.T, allowed ...string) *testCA {
	t.Helper()
	ca, err := identity.NewAuthority(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := &testCA{t: t, ca: ca, token: "ztunnel-token", cluster: "Kubernetes", allowed: map[string]bool{}}
	for _, a := range allowed {
		c.allowed[a] = true
	}
	c.cert = servingCert(t, ca, "127.0.0.1")
	c.start("127.0.0.1:0")
	t.Cleanup(c.stop)
	return c
}

// servingCert issues a TLS server certificate for host (an IP) under ca.
func servingCert(t *testing.T, ca *identity.Authority, host string) tls.Certificate {
	t.Helper()
	chainPEM, keyPEM, err := ca.MarshalPEM()
	if err != nil {
		t.Fatal(err)
	}
	chain, _ := identity.ParseCertsPEM(chainPEM)
	caKey, err := identity.ParseKeyPEM(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := identity.GenerateKey()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(99), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP(host)}, DNSNames: []string{"istiod.istio-system.svc"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, chain[0], key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func (c *testCA) start(addr string) {
	c.t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		c.t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{c.cert}, MinVersion: tls.VersionTLS13})))
	pb.RegisterIstioCertificateServiceServer(g, c)
	c.mu.Lock()
	c.srv, c.addr = g, lis.Addr().String()
	c.mu.Unlock()
	go g.Serve(lis)
}

func (c *testCA) stop() {
	c.mu.Lock()
	g := c.srv
	c.mu.Unlock()
	g.Stop()
}

func (c *testCA) allow(id string) {
	c.mu.Lock()
	c.allowed[id] = true
	c.mu.Unlock()
}

func (c *testCA) callCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls
}

func (c *testCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	c.meta = append(c.meta, md)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+c.token {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	if got := md.Get(HeaderClusterID); len(got) != 1 || got[0] != c.cluster {
		return nil, status.Errorf(codes.PermissionDenied, "cluster %v is not this cluster", got)
	}
	imp := req.GetMetadata().GetFields()[MetaImpersonatedIdentity].GetStringValue()
	c.imps = append(c.imps, imp)
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
	if !c.ignoreImpersonation {
		if !c.allowed[imp] {
			return nil, status.Errorf(codes.PermissionDenied, "no pod with identity %s runs on node %q", imp, "node-1")
		}
		id = spiffeid.RequireFromString(imp)
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "no CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl == 0 {
		ttl = time.Hour
	}
	certs, err := c.ca.Sign(csr, id, ttl)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	resp := &pb.IstioCertificateResponse{}
	for _, x := range append(certs, c.ca.Root()) {
		resp.CertChain = append(resp.CertChain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: x.Raw})))
	}
	return resp, nil
}

// writeRoot writes ca's root to a file and loads it.
func writeRoot(t *testing.T, ca *identity.Authority) (*Roots, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(path, identity.EncodeCertsPEM([]*x509.Certificate{ca.Root()}), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := LoadRoots(path, td, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r, path
}

func writeToken(t *testing.T, tok string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type setup struct {
	ca    *testCA
	roots *Roots
	m     *Manager
}

func newSetup(t *testing.T, ttl time.Duration, allowed ...string) *setup {
	t.Helper()
	ca := newTestCA(t, allowed...)
	roots, _ := writeRoot(t, ca.ca)
	client, err := NewCAClient(CAConfig{Address: ca.addr, TLS: ControlPlaneTLS(roots, "127.0.0.1"),
		Token: TokenFile(writeToken(t, ca.token)), ClusterID: "Kubernetes", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	m, err := New(Config{Signer: client, Bundle: roots.Bundle(), TTL: ttl,
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, MinRefresh: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return &setup{ca: ca, roots: roots, m: m}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func serial(t *testing.T, s x509svid.Source) string {
	t.Helper()
	v, err := s.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	return v.Certificates[0].SerialNumber.String()
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const (
	sleepID   = "spiffe://cluster.local/ns/default/sa/sleep"
	httpbinID = "spiffe://cluster.local/ns/default/sa/httpbin"
)

func TestManager_IssuesOneCertificatePerIdentitySharedByItsPods(t *testing.T) {
	s := newSetup(t, 0, sleepID, httpbinID)
	sleep, httpbin := spiffeid.RequireFromString(sleepID), spiffeid.RequireFromString(httpbinID)
	if err := s.m.Ready(); err != nil {
		t.Fatalf("ready with no pods: %v", err)
	}
	a := s.m.AddPod("uid-a", sleep)
	if err := s.m.Ready(); err == nil || !strings.Contains(err.Error(), sleepID) {
		t.Errorf("ready before the certificate arrived: %v", err)
	}
	svid, err := s.m.Fetch(ctxT(t, 5*time.Second), sleep)
	if err != nil {
		t.Fatal(err)
	}
	b := s.m.AddPod("uid-b", sleep)
	c := s.m.AddPod("uid-c", httpbin)
	if _, err := s.m.Fetch(ctxT(t, 5*time.Second), httpbin); err != nil {
		t.Fatal(err)
	}
	if svid.ID != sleep {
		t.Errorf("issued for %s, want %s", svid.ID, sleep)
	}
	if serial(t, a) != serial(t, b) {
		t.Error("two pods of one identity got different certificates")
	}
	if serial(t, a) == serial(t, c) {
		t.Error("two identities share a certificate")
	}
	if n := s.ca.callCount(); n != 2 {
		t.Errorf("%d CSRs for two identities, want 2", n)
	}
	if err := s.m.Ready(); err != nil {
		t.Errorf("not ready with certificates for all pods: %v", err)
	}
	// What the CA saw: the token, the cluster and the impersonated identity.
	s.ca.mu.Lock()
	imps := append([]string(nil), s.ca.imps...)
	s.ca.mu.Unlock()
	if len(imps) != 2 || !(imps[0] == sleepID && imps[1] == httpbinID) {
		t.Errorf("impersonated identities %v", imps)
	}
	// The chain is leaf (+ intermediates), without the root.
	v, _ := a.GetX509SVID()
	if len(v.Certificates) != 1 {
		t.Errorf("chain of %d certificates, want the leaf only (the root is stripped)", len(v.Certificates))
	}
	st := s.m.Statuses()
	if len(st) != 2 || st[1].Identity != sleepID || st[1].State != "valid" || strings.Join(st[1].Pods, ",") != "uid-a,uid-b" {
		t.Errorf("statuses %+v", st)
	}
}

func TestManager_RotatesBeforeExpiry(t *testing.T) {
	s := newSetup(t, 2*time.Second, sleepID)
	id := spiffeid.RequireFromString(sleepID)
	src := s.m.AddPod("uid-a", id)
	first, err := s.m.Fetch(ctxT(t, 5*time.Second), id)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*time.Second, "a renewed certificate", func() bool {
		v, err := src.GetX509SVID()
		return err == nil && v.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0
	})
	v, _ := src.GetX509SVID()
	// (Certificate times have one-second resolution.)
	if v.Certificates[0].NotAfter.Before(first.Certificates[0].NotAfter) {
		t.Error("the renewed certificate expires before the old one")
	}
	if time.Now().After(first.Certificates[0].NotAfter) {
		t.Error("renewed only after the old certificate expired")
	}
}

func TestManager_KeepsServingThroughCAOutage(t *testing.T) {
	s := newSetup(t, 3*time.Second, sleepID)
	id := spiffeid.RequireFromString(sleepID)
	src := s.m.AddPod("uid-a", id)
	first, err := s.m.Fetch(ctxT(t, 5*time.Second), id)
	if err != nil {
		t.Fatal(err)
	}
	s.ca.stop()
	// Past the renewal time the renewal fails; the old certificate stays.
	eventually(t, 3*time.Second, "a failed renewal", func() bool {
		st := s.m.Statuses()
		return len(st) == 1 && st[0].LastError != ""
	})
	if got := serial(t, src); got != first.Certificates[0].SerialNumber.String() {
		t.Errorf("serving %s, want the held certificate %s", got, first.Certificates[0].SerialNumber)
	}
	if err := s.m.Ready(); err != nil {
		t.Errorf("not ready while holding a valid certificate: %v", err)
	}
	// Once it expires with the CA still away: no certificate, not ready.
	eventually(t, 4*time.Second, "expiry", func() bool { return time.Now().After(first.Certificates[0].NotAfter) })
	if _, err := src.GetX509SVID(); err == nil || !errors.Is(err, ErrNoCertificate) || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired certificate: %v", err)
	}
	if err := s.m.Ready(); err == nil {
		t.Error("ready with an expired certificate")
	}
	// The CA returns: a new certificate without any help.
	s.ca.start(s.ca.addr)
	eventually(t, 3*time.Second, "a certificate after the CA returned", func() bool {
		_, err := src.GetX509SVID()
		return err == nil
	})
}

func TestManager_RefusedImpersonationIsAClearError(t *testing.T) {
	s := newSetup(t, 0) // the CA allows nothing
	id := spiffeid.RequireFromString(sleepID)
	src := s.m.AddPod("uid-a", id)
	_, err := s.m.Fetch(ctxT(t, 5*time.Second), id)
	if err == nil {
		t.Fatal("certificate issued although the CA refused")
	}
	for _, want := range []string{sleepID, "PermissionDenied", "no pod with identity"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if _, err := src.GetX509SVID(); !errors.Is(err, ErrNoCertificate) {
		t.Errorf("source: %v", err)
	}
	if err := s.m.Ready(); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("ready: %v", err)
	}
	// The pod appears on the node (the CA's informer catches up): retried.
	s.ca.allow(sleepID)
	eventually(t, 3*time.Second, "a certificate once allowed", func() bool { return s.m.Ready() == nil })
}

func TestManager_RejectsCertificateForAnotherIdentity(t *testing.T) {
	s := newSetup(t, 0, sleepID)
	s.ca.mu.Lock()
	s.ca.ignoreImpersonation = true
	s.ca.mu.Unlock()
	_, err := s.m.Fetch(ctxT(t, 5*time.Second), spiffeid.RequireFromString(sleepID))
	if err == nil || !strings.Contains(err.Error(), "when "+sleepID+" was asked for") {
		t.Fatalf("a certificate for the wrong identity: %v", err)
	}
}

func TestManager_DropsIdentityNoPodUses(t *testing.T) {
	s := newSetup(t, 2*time.Second, sleepID)
	id := spiffeid.RequireFromString(sleepID)
	s.m.AddPod("uid-a", id)
	if _, err := s.m.Fetch(ctxT(t, 5*time.Second), id); err != nil {
		t.Fatal(err)
	}
	s.m.RemovePod("uid-a")
	if err := s.m.Ready(); err != nil {
		t.Errorf("ready with no pods: %v", err)
	}
	eventually(t, 3*time.Second, "the unused identity dropped", func() bool { return len(s.m.Statuses()) == 0 })
	calls := s.ca.callCount()
	time.Sleep(300 * time.Millisecond)
	if s.ca.callCount() != calls {
		t.Error("still renewing an identity no pod uses")
	}
}

func TestControlPlaneTLS_VerifiesRootAndName(t *testing.T) {
	ca := newTestCA(t, sleepID)
	other, _ := identity.NewAuthority(td, time.Hour)
	right, _ := writeRoot(t, ca.ca)
	wrong, _ := writeRoot(t, other)
	tok := TokenFile(writeToken(t, ca.token))
	id := spiffeid.RequireFromString(sleepID)
	key, _ := identity.GenerateKey()
	csr, _ := identity.NewCSR(key, id)
	for _, tc := range []struct {
		name   string
		roots  *Roots
		server string
		ok     bool
	}{
		{"right root, IP name", right, "127.0.0.1", true},
		{"right root, DNS name in the certificate", right, "istiod.istio-system.svc", true},
		{"another root", wrong, "127.0.0.1", false},
		{"name not in the certificate", right, "istiod.elsewhere.svc", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewCAClient(CAConfig{Address: ca.addr, TLS: ControlPlaneTLS(tc.roots, tc.server), Token: tok,
				ClusterID: "Kubernetes", Timeout: 2 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, err = c.Sign(context.Background(), id, csr, 0)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok && (err == nil || !strings.Contains(err.Error(), "certificate")) {
				t.Fatalf("accepted or unclear: %v", err)
			}
		})
	}
}

func TestCAClient_SendsTokenAndCluster(t *testing.T) {
	ca := newTestCA(t, sleepID)
	roots, _ := writeRoot(t, ca.ca)
	tokPath := writeToken(t, "stale")
	c, err := NewCAClient(CAConfig{Address: ca.addr, TLS: ControlPlaneTLS(roots, "127.0.0.1"), Token: TokenFile(tokPath), ClusterID: "Kubernetes"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	id := spiffeid.RequireFromString(sleepID)
	key, _ := identity.GenerateKey()
	csr, _ := identity.NewCSR(key, id)
	if _, err := c.Sign(context.Background(), id, csr, 0); err == nil || !strings.Contains(err.Error(), "Unauthenticated") {
		t.Fatalf("stale token: %v", err)
	}
	// The kubelet rotates the projected token: the next call reads it.
	if err := os.WriteFile(tokPath, []byte(ca.token), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sign(context.Background(), id, csr, 0); err != nil {
		t.Fatalf("rotated token: %v", err)
	}
	if err := os.WriteFile(tokPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sign(context.Background(), id, csr, 0); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty token: %v", err)
	}
}

func TestRoots_ReloadKeepsLastGood(t *testing.T) {
	a, _ := identity.NewAuthority(td, time.Hour)
	b, _ := identity.NewAuthority(td, time.Hour)
	r, path := writeRoot(t, a)
	if !r.Bundle().HasX509Authority(a.Root()) {
		t.Fatal("root not loaded")
	}
	if changed, err := r.Reload(); err != nil || changed {
		t.Errorf("unchanged file: changed=%v err=%v", changed, err)
	}
	if err := os.WriteFile(path, identity.EncodeCertsPEM([]*x509.Certificate{b.Root()}), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := r.Reload(); err != nil || !changed {
		t.Fatalf("new root: changed=%v err=%v", changed, err)
	}
	if r.Bundle().HasX509Authority(a.Root()) || !r.Bundle().HasX509Authority(b.Root()) {
		t.Error("bundle not replaced")
	}
	if err := os.WriteFile(path, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reload(); err == nil {
		t.Error("garbage accepted")
	}
	if !r.Bundle().HasX509Authority(b.Root()) {
		t.Error("a bad file dropped the good roots")
	}
	if _, err := LoadRoots(filepath.Join(t.TempDir(), "missing.pem"), td, nil); err == nil {
		t.Error("missing root file accepted")
	}
}
