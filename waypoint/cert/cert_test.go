package cert

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/caclient/caclienttest"
	"github.com/meshlite/meshlite/internal/identity"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// testCA is a real CA (caclienttest) on loopback whose serving certificate
// is for "istiod.test"; it refuses impersonation, as istiod does for a
// waypoint.
type testCA struct {
	*caclienttest.CA
	mu      sync.Mutex
	issueAs spiffeid.ID // when set, issue this identity whatever is asked
}

func (c *testCA) policy(call caclienttest.Call) (spiffeid.ID, error) {
	c.mu.Lock()
	as := c.issueAs
	c.mu.Unlock()
	id, err := caclienttest.OwnIdentity(call)
	if err == nil && !as.IsZero() {
		id = as
	}
	return id, err
}

func (c *testCA) requests() int { return len(c.Calls()) }

func startCA(t *testing.T) *testCA {
	t.Helper()
	ca := &testCA{}
	ca.CA = caclienttest.Start(t, caclienttest.Options{TrustDomain: td, Token: "tok-1", DNSNames: []string{"istiod.test"}, Policy: ca.policy})
	return ca
}

func newManager(t *testing.T, ca *testCA, serverName string, ttl time.Duration) *Manager {
	t.Helper()
	roots, err := caclient.LoadRoots(ca.RootFile, td, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := identity.NewID("cluster.local", "shop", "waypoint")
	m, err := New(Config{ID: id, CAAddress: ca.Addr, TLS: caclient.ControlPlaneTLS(roots, serverName), Token: caclient.TokenFile(ca.TokenFile),
		Bundle: roots.Bundle(), TTL: ttl, MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func run(t *testing.T, m *Manager) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestManager_GetsItsOwnIdentityAndRenewsAtHalfLife(t *testing.T) {
	ca := startCA(t)
	m := newManager(t, ca, "istiod.test", 4*time.Second)
	if m.Ready() == nil {
		t.Fatal("ready before any certificate")
	}
	run(t, m)
	waitFor(t, "a certificate", func() bool { return m.Ready() == nil })
	s, _ := m.GetX509SVID()
	if s.ID.String() != "spiffe://cluster.local/ns/shop/sa/waypoint" {
		t.Errorf("identity %s", s.ID)
	}
	if len(s.Certificates) != 1 {
		t.Errorf("chain of %d certificates, want the leaf without the root", len(s.Certificates))
	}
	calls := ca.Calls()
	if md := calls[len(calls)-1].Metadata; len(md.Get("clusterid")) != 0 {
		t.Errorf("unexpected clusterid header %v", md.Get("clusterid"))
	}
	if imp := calls[len(calls)-1].Impersonated; imp != "" {
		t.Errorf("the waypoint impersonated %q", imp)
	}
	first := s.Certificates[0].SerialNumber
	// 4s certificates renew after about 2s.
	waitFor(t, "renewal", func() bool {
		s, _ := m.GetX509SVID()
		return s.Certificates[0].SerialNumber.Cmp(first) != 0
	})
	if n := ca.requests(); n < 2 || n > 3 {
		t.Errorf("%d CA requests, want 2 (first and one renewal)", n)
	}
	c, err := m.TLSCertificate()
	if err != nil || c.Leaf == nil && len(c.Certificate) == 0 {
		t.Errorf("TLS certificate: %v", err)
	}
}

func TestManager_RefusesACertificateForSomeoneElse(t *testing.T) {
	ca := startCA(t)
	ca.issueAs, _ = identity.NewID("cluster.local", "shop", "other")
	m := newManager(t, ca, "istiod.test", time.Hour)
	run(t, m)
	waitFor(t, "two attempts", func() bool { return ca.requests() >= 2 })
	err := m.Ready()
	if err == nil || !strings.Contains(err.Error(), "when spiffe://cluster.local/ns/shop/sa/waypoint was asked for") {
		t.Errorf("Ready() = %v, want the wrong identity refused", err)
	}
}

func TestManager_VerifiesTheCAServerName(t *testing.T) {
	ca := startCA(t)
	m := newManager(t, ca, "impostor.test", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := m.fetch(ctx)
	if err == nil || ca.requests() != 0 {
		t.Errorf("fetch from a CA whose certificate is for another name: %v (CA saw %d requests)", err, ca.requests())
	}
}
