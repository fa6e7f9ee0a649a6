package app

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/authn"
	ixds "github.com/meshlite/meshlite/istiod-lite/xds"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// ztunnelCaller authenticates every stream as istio-system/ztunnel (the
// token check itself is istiod-lite's business, tested there).
type ztunnelCaller struct{}

func (ztunnelCaller) Authenticate(context.Context) (*authn.Caller, error) {
	return &authn.Caller{Namespace: "istio-system", ServiceAccount: "ztunnel"}, nil
}

func addressResource(t *testing.T, uid, ip string) *ixds.Resource {
	t.Helper()
	w := &workload.Workload{Uid: uid, Name: uid, Namespace: "default", Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()},
		TunnelProtocol: workload.TunnelProtocol_HBONE, Status: workload.WorkloadStatus_HEALTHY}
	r, err := ixds.NewResource(xds.TypeAddress, uid, &workload.Address{Type: &workload.Address_Workload{Workload: w}},
		[]string{xds.AddressAlias("", ip)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestOnDemand_AsksIstiodLiteForAnUnknownIP runs istiod-lite's own Delta
// ADS server (the library, over gRPC with TLS) with pushes held back for
// 30 s, so that only the on-demand lookup can bring a new pod in time.
func TestOnDemand_AsksIstiodLiteForAnUnknownIP(t *testing.T) {
	ca, err := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chainPEM, keyPEM, _ := ca.MarshalPEM()
	chain, _ := identity.ParseCertsPEM(chainPEM)
	caKey, _ := identity.ParseKeyPEM(keyPEM)
	key, _ := identity.GenerateKey()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(9), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"istiod.istio-system.svc"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, chain[0], key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	cache := ixds.NewCache(xds.TypeAddress, xds.TypeAuthorization)
	cache.Update(xds.TypeAddress, []*ixds.Resource{addressResource(t, "Kubernetes//Pod/default/a", "10.9.0.1")}, nil)
	cache.TakeChanges()
	cache.MarkReady()
	srv := ixds.NewServer(cache, ztunnelCaller{}, ixds.Options{Debounce: 30 * time.Second, MaxDelay: 30 * time.Second,
		// Discarded: its stream goroutines may log after the test ends (g.Stop
		// does not wait for them), which t.Output() turns into a panic.
		Log: slog.New(slog.DiscardHandler)})
	g := grpc.NewServer(grpc.ForceServerCodecV2(ixds.Codec{}), grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})))
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	defer g.Stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)

	roots := x509.NewCertPool()
	roots.AddCert(ca.Root())
	store := state.New(nil)
	od := newOnDemand(store, "", slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})))
	meta, _ := structpb.NewStruct(map[string]any{xds.MetadataNamespace: "istio-system", xds.MetadataServiceAccount: "ztunnel",
		xds.MetadataName: "ztunnel-x", xds.MetadataClusterID: "Kubernetes"})
	cl, err := xds.NewClient(xds.ClientConfig{Target: lis.Addr().String(),
		TLS:           &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: "istiod.istio-system.svc"},
		Node:          &corev3.Node{Id: "ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local", Metadata: meta},
		Subscriptions: []xds.Subscription{{TypeURL: xds.TypeAddress}, {TypeURL: xds.TypeAuthorization}},
		Handler:       od, Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	od.xds = cl
	go cl.Run(ctx)
	select {
	case <-cl.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("xDS client not synced")
	}
	if store.WorkloadByIP("", netip.MustParseAddr("10.9.0.1")) == nil {
		t.Fatal("the first state lacks pod a")
	}

	// Pod b appears in istiod-lite; its push waits 30 s.
	cache.Update(xds.TypeAddress, []*ixds.Resource{addressResource(t, "Kubernetes//Pod/default/b", "10.9.0.2")}, nil)
	b := netip.MustParseAddr("10.9.0.2")
	time.Sleep(200 * time.Millisecond)
	if store.WorkloadByIP("", b) != nil {
		t.Fatal("pod b was pushed without asking: the test proves nothing")
	}
	start := time.Now()
	lctx, lcancel := context.WithTimeout(ctx, time.Second)
	od.Lookup(lctx, b)
	lcancel()
	if store.WorkloadByIP("", b) == nil {
		t.Fatalf("pod b unknown after the on-demand lookup (%v)", time.Since(start))
	}
	t.Logf("pod b found on demand in %v", time.Since(start))

	// An IP istiod-lite does not know: answered (not timed out), and
	// remembered so the next connection does not ask again.
	c := netip.MustParseAddr("10.9.0.3")
	start = time.Now()
	lctx, lcancel = context.WithTimeout(ctx, 3*time.Second)
	od.Lookup(lctx, c)
	lcancel()
	if d := time.Since(start); d > time.Second {
		t.Errorf("lookup of an unknown IP took %v: istiod-lite's answer was not seen", d)
	}
	od.mu.Lock()
	_, remembered := od.unknown[c]
	od.mu.Unlock()
	if !remembered {
		t.Error("the unknown IP is not remembered")
	}
	start = time.Now()
	od.Lookup(ctx, c)
	if d := time.Since(start); d > 50*time.Millisecond {
		t.Errorf("second lookup of a remembered unknown IP took %v", d)
	}
}
