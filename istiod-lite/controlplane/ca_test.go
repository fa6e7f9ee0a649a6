package controlplane

import (
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/kube"
	pb "github.com/meshlite/meshlite/proto/ca"
)

// csrFor makes a CSR that claims id (the CA must not care).
func csrFor(t *testing.T, ns, sa string) string {
	t.Helper()
	key, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	id, err := identity.NewID("cluster.local", ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	return string(csr)
}

func createCert(t *testing.T, tok string, req *pb.IstioCertificateRequest, md ...string) (*pb.IstioCertificateResponse, error) {
	t.Helper()
	cc, err := grpc.NewClient(istiodT().GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(clientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := ctxT(t, 10*time.Second)
	ctx = metadata.AppendToOutgoingContext(ctx, append([]string{"authorization", "Bearer " + tok}, md...)...)
	return pb.NewIstioCertificateServiceClient(cc).CreateCertificate(ctx, req)
}

func impersonating(id string) *structpb.Struct {
	s, _ := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id})
	return s
}

// leafOf parses and verifies a response chain against the mesh root.
func leafOf(t *testing.T, resp *pb.IstioCertificateResponse) *x509.Certificate {
	t.Helper()
	if len(resp.GetCertChain()) < 2 {
		t.Fatalf("chain has %d certificates, want leaf and root", len(resp.GetCertChain()))
	}
	var certs []*x509.Certificate
	for _, p := range resp.GetCertChain() {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatalf("chain element is not PEM: %q", p)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	root := certs[len(certs)-1]
	if !root.Equal(istiodT().Authority().Root()) {
		t.Fatal("the chain does not end with the mesh root")
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range certs[1 : len(certs)-1] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("leaf does not verify: %v", err)
	}
	return certs[0]
}

func uriOf(c *x509.Certificate) string {
	if len(c.URIs) != 1 {
		return ""
	}
	return c.URIs[0].String()
}

func TestCA_IssuesForTheTokensIdentityOnly(t *testing.T) {
	ns := "ca-own"
	namespace(t, ns, nil)
	serviceAccount(t, ns, "sleep")
	p := runPod(t, podSpec{ns: ns, name: "sleep", sa: "sleep", node: "node-a", ip: "10.244.6.1"})
	tok := token(t, ns, "sleep", p, "istio-ca")
	// The CSR claims to be someone else; the certificate is the caller's.
	resp, err := createCert(t, tok, &pb.IstioCertificateRequest{Csr: csrFor(t, "istio-system", "istiod")})
	if err != nil {
		t.Fatal(err)
	}
	leaf := leafOf(t, resp)
	if got, want := uriOf(leaf), "spiffe://cluster.local/ns/ca-own/sa/sleep"; got != want {
		t.Errorf("certificate for %q, want %q", got, want)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d < 23*time.Hour || d > 25*time.Hour+time.Minute {
		t.Errorf("default lifetime %s, want about 24h", d)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		t.Errorf("leaf has non-SPIFFE SANs: %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	// A requested lifetime is honoured.
	resp, err = createCert(t, tok, &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "sleep"), ValidityDuration: 3600})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(leafOf(t, resp).NotAfter); d > time.Hour+time.Minute || d < 50*time.Minute {
		t.Errorf("requested 1h, got %s", d)
	}
	// Bad requests get clear errors.
	for _, tc := range []struct {
		name string
		req  *pb.IstioCertificateRequest
		code codes.Code
	}{
		{"not a CSR", &pb.IstioCertificateRequest{Csr: "hello"}, codes.InvalidArgument},
		{"lifetime beyond the maximum", &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "sleep"), ValidityDuration: 365 * 24 * 3600}, codes.InvalidArgument},
		{"untrusted caller impersonating", &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "sleep"),
			Metadata: impersonating("spiffe://cluster.local/ns/istio-system/sa/istiod")}, codes.PermissionDenied},
	} {
		if _, err := createCert(t, tok, tc.req); status.Code(err) != tc.code {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.code)
		}
	}
	if _, err := createCert(t, "garbage", &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "sleep")}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("garbage token: got %v, want Unauthenticated", err)
	}
}

func TestCA_ImpersonationOnlyForPodsOnTheCallersNode(t *testing.T) {
	ns := "ca-imp"
	namespace(t, ns, nil)
	serviceAccount(t, ns, "local")
	serviceAccount(t, ns, "remote")
	runPod(t, podSpec{ns: ns, name: "local", sa: "local", node: "node-a", ip: "10.244.7.1"})
	runPod(t, podSpec{ns: ns, name: "remote", sa: "remote", node: "node-b", ip: "10.244.7.2"})
	zt, _ := ztunnelToken(t, "node-a", "ztunnel-ca", "10.244.7.200")
	// Wait until istiod's pod cache has them.
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := createCert(t, zt, &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "local"),
			Metadata: impersonating("spiffe://cluster.local/ns/ca-imp/sa/local")}, "clusterid", "Kubernetes")
		if err == nil {
			if got := uriOf(leafOf(t, resp)); got != "spiffe://cluster.local/ns/ca-imp/sa/local" {
				t.Fatalf("impersonated certificate for %q", got)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("impersonating a pod on the caller's node: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, tc := range []struct {
		name, id string
		md       []string
	}{
		{"pod on another node", "spiffe://cluster.local/ns/ca-imp/sa/remote", nil},
		{"identity with no pod", "spiffe://cluster.local/ns/ca-imp/sa/nobody", nil},
		{"other trust domain", "spiffe://evil.org/ns/ca-imp/sa/local", nil},
		{"other cluster", "spiffe://cluster.local/ns/ca-imp/sa/local", []string{"clusterid", "elsewhere"}},
	} {
		_, err := createCert(t, zt, &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "x"), Metadata: impersonating(tc.id)}, tc.md...)
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s: got %v, want PermissionDenied", tc.name, err)
		}
	}
	// A trusted account whose token is not bound to a pod has no node.
	unbound := token(t, "istio-system", "ztunnel", nil, "istio-ca")
	if _, err := createCert(t, unbound, &pb.IstioCertificateRequest{Csr: csrFor(t, ns, "local"),
		Metadata: impersonating("spiffe://cluster.local/ns/ca-imp/sa/local")}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("unbound ztunnel token: got %v, want PermissionDenied", err)
	}
}

func TestCA_RootIsKeptAndPublished(t *testing.T) {
	ns := "ca-root"
	namespace(t, ns, nil)
	ctx := ctxT(t, 30*time.Second)
	// The root lives in a Secret; a second istiod-lite loads the same one.
	s, err := env.kc.CoreV1().Secrets("istio-system").Get(ctx, kube.CASecret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Data["ca-key.pem"]) == 0 || len(s.Data["ca-cert.pem"]) == 0 {
		t.Fatalf("CA secret lacks ca-cert.pem/ca-key.pem: keys %v", keys(s.Data))
	}
	again, err := New(ctx, Config{RESTConfig: env.rc, Namespace: "istio-system", GRPCAddr: "127.0.0.1:0", Log: env.log})
	if err != nil {
		t.Fatal(err)
	}
	again.grpcLis.Close()
	if !again.Authority().Root().Equal(istiodT().Authority().Root()) {
		t.Error("a restarted istiod-lite has a different root")
	}
	rootPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: istiodT().Authority().Root().Raw}))
	waitCM := func(what string) {
		deadline := time.Now().Add(5 * time.Second)
		for {
			cm, err := env.kc.CoreV1().ConfigMaps(ns).Get(ctx, kube.CARootConfigMap, metav1.GetOptions{})
			if err == nil && cm.Data[kube.CARootConfigMapKey] == rootPEM {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: ConfigMap %s/%s not (re)published: %v", what, ns, kube.CARootConfigMap, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitCM("new namespace")
	if err := env.kc.CoreV1().ConfigMaps(ns).Delete(ctx, kube.CARootConfigMap, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCM("after delete")
	cm, err := env.kc.CoreV1().ConfigMaps(ns).Get(ctx, kube.CARootConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data[kube.CARootConfigMapKey] = "tampered"
	if _, err := env.kc.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCM("after tampering")
}
