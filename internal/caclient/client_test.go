package caclient_test

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/caclient/caclienttest"
	"github.com/meshlite/meshlite/internal/identity"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

const sleepID = "spiffe://cluster.local/ns/default/sa/sleep"

// writeRoot writes a's root to a file and loads it.
func writeRoot(t *testing.T, a *identity.Authority) (*caclient.Roots, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(path, identity.EncodeCertsPEM([]*x509.Certificate{a.Root()}), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := caclient.LoadRoots(path, td, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r, path
}

// client returns a client of ca that trusts ca's root and names it by IP.
func client(t *testing.T, ca *caclienttest.CA, token string) (*caclient.Client, *caclient.Roots) {
	t.Helper()
	roots, err := caclient.LoadRoots(ca.RootFile, td, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := caclient.New(caclient.Config{Address: ca.Addr, TLS: caclient.ControlPlaneTLS(roots, "127.0.0.1"),
		Token: caclient.TokenFile(token), ClusterID: "Kubernetes", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, roots
}

func csrFor(t *testing.T, id spiffeid.ID) []byte {
	t.Helper()
	key, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func TestControlPlaneTLS_VerifiesRootAndName(t *testing.T) {
	ca := caclienttest.Start(t, caclienttest.Options{DNSNames: []string{"istiod.istio-system.svc"}})
	other, _ := identity.NewAuthority(td, time.Hour)
	right, _ := writeRoot(t, ca.Authority)
	wrong, _ := writeRoot(t, other)
	id := spiffeid.RequireFromString(sleepID)
	csr := csrFor(t, id)
	for _, tc := range []struct {
		name   string
		roots  *caclient.Roots
		server string
		ok     bool
	}{
		{"right root, IP name", right, "127.0.0.1", true},
		{"right root, DNS name in the certificate", right, "istiod.istio-system.svc", true},
		{"another root", wrong, "127.0.0.1", false},
		{"name not in the certificate", right, "istiod.elsewhere.svc", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := caclient.New(caclient.Config{Address: ca.Addr, TLS: caclient.ControlPlaneTLS(tc.roots, tc.server),
				Token: caclient.TokenFile(ca.TokenFile), Timeout: 2 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			calls := len(ca.Calls())
			_, err = c.Sign(context.Background(), caclient.Request{ID: id}, csr)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok {
				if err == nil || !strings.Contains(err.Error(), "certificate") {
					t.Fatalf("accepted or unclear: %v", err)
				}
				if n := len(ca.Calls()); n != calls {
					t.Errorf("the CSR reached an unverified CA")
				}
			}
		})
	}
}

func TestClient_SendsTokenAndCluster(t *testing.T) {
	ca := caclienttest.Start(t, caclienttest.Options{ClusterID: "Kubernetes"})
	tokPath := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(tokPath, []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, _ := client(t, ca, tokPath)
	id := spiffeid.RequireFromString(sleepID)
	csr := csrFor(t, id)
	if _, err := c.Sign(context.Background(), caclient.Request{ID: id}, csr); err == nil || !strings.Contains(err.Error(), "Unauthenticated") {
		t.Fatalf("stale token: %v", err)
	}
	// The kubelet rotates the projected token: the next call reads it.
	if err := os.WriteFile(tokPath, []byte("test-token"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sign(context.Background(), caclient.Request{ID: id}, csr); err != nil {
		t.Fatalf("rotated token: %v", err)
	}
	calls := ca.Calls()
	if got := calls[len(calls)-1].Metadata.Get(caclient.HeaderClusterID); len(got) != 1 || got[0] != "Kubernetes" {
		t.Errorf("clusterid header %v", got)
	}
	if err := os.WriteFile(tokPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sign(context.Background(), caclient.Request{ID: id}, csr); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty token: %v", err)
	}
}

func TestIssue_ImpersonatesOnlyWhenAsked(t *testing.T) {
	ca := caclienttest.Start(t, caclienttest.Options{Policy: func(c caclienttest.Call) (spiffeid.ID, error) {
		if c.Impersonated == "" {
			return c.CSRID, nil
		}
		return spiffeid.FromString(c.Impersonated)
	}})
	c, roots := client(t, ca, ca.TokenFile)
	id := spiffeid.RequireFromString(sleepID)
	for _, imp := range []bool{true, false} {
		svid, err := caclient.Issue(context.Background(), c, roots.Bundle(), caclient.Request{ID: id, Impersonate: imp, TTL: time.Minute})
		if err != nil {
			t.Fatalf("impersonate=%v: %v", imp, err)
		}
		if svid.ID != id || len(svid.Certificates) != 1 {
			t.Errorf("impersonate=%v: issued for %s with %d certificates, want %s, the leaf only (root stripped)", imp, svid.ID, len(svid.Certificates), id)
		}
		if life := time.Until(svid.Certificates[0].NotAfter); life > time.Minute {
			t.Errorf("impersonate=%v: lifetime %s, asked for 1m", imp, life)
		}
	}
	calls := ca.Calls()
	if len(calls) != 2 || calls[0].Impersonated != sleepID || calls[1].Impersonated != "" {
		t.Errorf("impersonated identities sent: %+v", calls)
	}
}

func TestIssue_RefusesWhatTheCADidNotIssueForUs(t *testing.T) {
	id := spiffeid.RequireFromString(sleepID)
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
	for _, tc := range []struct {
		name   string
		policy caclienttest.Policy
		roots  func(*caclienttest.CA) *identity.Authority // whose root the client trusts for certificates
		want   string
	}{
		{"another identity", func(caclienttest.Call) (spiffeid.ID, error) { return other, nil }, nil,
			"CA issued a certificate for " + other.String() + " when " + sleepID + " was asked for"},
		{"refused", func(caclienttest.Call) (spiffeid.ID, error) {
			return spiffeid.ID{}, status.Error(codes.PermissionDenied, "no pod with identity")
		}, nil, "refused a certificate for " + sleepID + ": PermissionDenied: no pod with identity"},
		{"another root", nil, func(*caclienttest.CA) *identity.Authority {
			a, _ := identity.NewAuthority(td, time.Hour)
			return a
		}, "does not verify against the mesh root"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := caclienttest.Start(t, caclienttest.Options{Policy: tc.policy})
			c, roots := client(t, ca, ca.TokenFile)
			bundle := roots.Bundle()
			if tc.roots != nil {
				bundle = tc.roots(ca).Bundle()
			}
			svid, err := caclient.Issue(context.Background(), c, bundle, caclient.Request{ID: id})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Issue() = %v, %v; want an error with %q", svid, err, tc.want)
			}
		})
	}
}

// signerFunc lets a test answer for the CA without one.
type signerFunc func(caclient.Request, []byte) ([]*x509.Certificate, error)

func (f signerFunc) Sign(_ context.Context, r caclient.Request, csr []byte) ([]*x509.Certificate, error) {
	return f(r, csr)
}

func TestIssue_RefusesACertificateForAnotherKey(t *testing.T) {
	auth, _ := identity.NewAuthority(td, time.Hour)
	id := spiffeid.RequireFromString(sleepID)
	// A CA that ignores the CSR's key and certifies one of its own.
	s := signerFunc(func(caclient.Request, []byte) ([]*x509.Certificate, error) {
		svid, err := auth.NewSVID(id, time.Hour)
		if err != nil {
			return nil, err
		}
		return svid.Certificates, nil
	})
	if _, err := caclient.Issue(context.Background(), s, auth.Bundle(), caclient.Request{ID: id}); err == nil || !strings.Contains(err.Error(), "not for the key we sent") {
		t.Fatalf("certificate for another key: %v", err)
	}
	boom := errors.New("boom")
	fail := signerFunc(func(caclient.Request, []byte) ([]*x509.Certificate, error) { return nil, boom })
	if _, err := caclient.Issue(context.Background(), fail, auth.Bundle(), caclient.Request{ID: id}); !errors.Is(err, boom) {
		t.Fatalf("signer error not returned: %v", err)
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
	svid, _ := b.NewSVID(spiffeid.RequireFromString(sleepID), time.Hour)
	if err := os.WriteFile(path, identity.EncodeCertsPEM(svid.Certificates), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reload(); err == nil || !strings.Contains(err.Error(), "not a CA certificate") {
		t.Errorf("leaf as root: %v", err)
	}
	if _, err := caclient.LoadRoots(filepath.Join(t.TempDir(), "missing.pem"), td, nil); err == nil {
		t.Error("missing root file accepted")
	}
}

func TestRenewAfter_HalfTheRemainingLifeWithJitter(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		left, min, lo, hi time.Duration
	}{
		{time.Hour, time.Second, 30*time.Minute - 6*time.Minute, 30 * time.Minute},
		{10 * time.Second, time.Second, 4 * time.Second, 5 * time.Second},
		{time.Second, time.Second, time.Second, time.Second},  // floor
		{-time.Minute, time.Second, time.Second, time.Second}, // already expired: retry soon, no panic
	} {
		for range 50 {
			if d := caclient.RenewAfter(now, now.Add(tc.left), tc.min); d < tc.lo || d > tc.hi {
				t.Fatalf("RenewAfter(%s left, min %s) = %s, want in [%s, %s]", tc.left, tc.min, d, tc.lo, tc.hi)
			}
		}
	}
}

func TestBackoff_DoublesWithJitterAndResets(t *testing.T) {
	b := caclient.Backoff{Min: 100 * time.Millisecond, Max: 400 * time.Millisecond}
	for i, step := range []time.Duration{100, 200, 400, 400} {
		step *= time.Millisecond
		if d := b.Next(); d < step/2 || d > step {
			t.Fatalf("wait %d = %s, want in [%s, %s]", i, d, step/2, step)
		}
	}
	b.Reset()
	if d := b.Next(); d > 100*time.Millisecond {
		t.Errorf("after Reset: %s, want at most Min", d)
	}
}
