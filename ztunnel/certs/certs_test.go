package certs

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/caclient/caclienttest"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// testCA is a real CA (caclienttest) with the rules that matter to
// ztunnel: a Bearer token, the clusterid header, and impersonation only
// for identities it was told run on the node.
type testCA struct {
	*caclienttest.CA

	mu      sync.Mutex
	allowed map[string]bool
	// ignoreImpersonation issues for the caller's own identity whatever
	// was asked (a CA that misbehaves).
	ignoreImpersonation bool
}

func newTestCA(t *testing.T, allowed ...string) *testCA {
	t.Helper()
	c := &testCA{allowed: map[string]bool{}}
	for _, a := range allowed {
		c.allowed[a] = true
	}
	c.CA = caclienttest.Start(t, caclienttest.Options{TrustDomain: td, Token: "ztunnel-token", ClusterID: "Kubernetes", Policy: c.policy})
	return c
}

func (c *testCA) policy(call caclienttest.Call) (spiffeid.ID, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ignoreImpersonation {
		return spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel"), nil
	}
	if !c.allowed[call.Impersonated] {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "no pod with identity %s runs on node %q", call.Impersonated, "node-1")
	}
	return spiffeid.FromString(call.Impersonated)
}

func (c *testCA) allow(id string) {
	c.mu.Lock()
	c.allowed[id] = true
	c.mu.Unlock()
}

func (c *testCA) callCount() int { return len(c.Calls()) }

type setup struct {
	ca *testCA
	m  *Manager
}

func newSetup(t *testing.T, ttl time.Duration, allowed ...string) *setup {
	t.Helper()
	ca := newTestCA(t, allowed...)
	roots, err := caclient.LoadRoots(ca.RootFile, td, nil)
	if err != nil {
		t.Fatal(err)
	}
	client, err := caclient.New(caclient.Config{Address: ca.Addr, TLS: caclient.ControlPlaneTLS(roots, "127.0.0.1"),
		Token: caclient.TokenFile(ca.TokenFile), ClusterID: "Kubernetes", Timeout: 2 * time.Second})
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
	return &setup{ca: ca, m: m}
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
	var imps []string
	for _, c := range s.ca.Calls() {
		imps = append(imps, c.Impersonated)
	}
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
	s.ca.Stop()
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
	s.ca.Restart()
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
	// A connection waiting for the certificate (WaitX509SVID) gives up
	// when its context ends...
	waiter := src.(interface {
		WaitX509SVID(context.Context) (*x509svid.SVID, error)
	})
	if _, err := waiter.WaitX509SVID(ctxT(t, 200*time.Millisecond)); !errors.Is(err, ErrNoCertificate) {
		t.Errorf("wait without a certificate: %v", err)
	}
	// ...and gets it once the pod appears on the node (the CA's informer
	// catches up and the request is retried).
	got := make(chan error, 1)
	go func() {
		_, err := waiter.WaitX509SVID(ctxT(t, 5*time.Second))
		got <- err
	}()
	s.ca.allow(sleepID)
	if err := <-got; err != nil {
		t.Errorf("wait for a certificate once allowed: %v", err)
	}
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
