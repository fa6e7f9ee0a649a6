package ca

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/istiod-lite/authn"
	pb "github.com/meshlite/meshlite/proto/ca"
)

// Request metadata and header names, as Istio's CA reads them.
const (
	metaImpersonatedIdentity = "ImpersonatedIdentity"
	headerClusterID          = "clusterid"
)

// Authenticator authenticates the caller of a call.
type Authenticator interface {
	Authenticate(ctx context.Context) (*authn.Caller, error)
}

// Pods finds pods for impersonation checks.
type Pods interface {
	Pod(namespace, name string) *corev1.Pod
	PodsOnNode(node string) []*corev1.Pod
}

// ServiceConfig configures the certificate service.
type ServiceConfig struct {
	Authority *identity.Authority
	Auth      Authenticator
	Pods      Pods
	// ClusterID is this cluster's id; impersonation for another is refused.
	ClusterID string
	// TrustedNodeAccounts ("namespace/serviceaccount") may ask for the
	// identity of pods on their node.
	TrustedNodeAccounts []string
	// DefaultTTL (24 h) and MaxTTL (90 days) of workload certificates.
	DefaultTTL, MaxTTL time.Duration
	Log                *slog.Logger
	Registerer         prometheus.Registerer
}

// Service implements IstioCertificateService.
type Service struct {
	pb.UnimplementedIstioCertificateServiceServer
	cfg      ServiceConfig
	trusted  map[string]bool
	rootPEM  string
	csrs     prometheus.Counter
	issued   prometheus.Counter
	authFail prometheus.Counter
	refused  *prometheus.CounterVec
}

// NewService returns the certificate service.
func NewService(cfg ServiceConfig) *Service {
	if cfg.DefaultTTL <= 0 {
		cfg.DefaultTTL = 24 * time.Hour
	}
	if cfg.MaxTTL <= 0 {
		cfg.MaxTTL = 90 * 24 * time.Hour
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Service{
		cfg:     cfg,
		trusted: map[string]bool{},
		rootPEM: string(RootPEM(cfg.Authority)),
		csrs:    prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_csr_count", Help: "CSRs received."}),
		issued:  prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_success_cert_issuance_count", Help: "Certificates issued."}),
		authFail: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citadel_server_authentication_failure_count", Help: "CSRs refused for bad credentials."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlite_istiod_ca_refused_total", Help: "CSRs refused after authentication, by reason."}, []string{"reason"}),
	}
	for _, a := range cfg.TrustedNodeAccounts {
		if a = strings.TrimSpace(a); a != "" {
			s.trusted[a] = true
		}
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(s.csrs, s.issued, s.authFail, s.refused)
	}
	return s
}

// Register adds the service to g.
func (s *Service) Register(g *grpc.Server) { pb.RegisterIstioCertificateServiceServer(g, s) }

// CreateCertificate signs the CSR's key for the caller's identity, or for an
// impersonated pod identity when the caller is a trusted node proxy on that
// pod's node.
func (s *Service) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	s.csrs.Inc()
	caller, err := s.cfg.Auth.Authenticate(ctx)
	if err != nil {
		s.authFail.Inc()
		s.cfg.Log.Warn("CSR refused: authentication failed", "err", err)
		return nil, err
	}
	log := s.cfg.Log.With("caller", caller.String())
	td := s.cfg.Authority.TrustDomain()
	id, err := identity.NewID(td.Name(), caller.Namespace, caller.ServiceAccount)
	if err != nil {
		return nil, s.refuse(log, "identity", codes.InvalidArgument, "caller identity: %v", err)
	}
	if imp := req.GetMetadata().GetFields()[metaImpersonatedIdentity].GetStringValue(); imp != "" {
		id, err = s.impersonate(ctx, caller, imp)
		if err != nil {
			s.refused.WithLabelValues("impersonation").Inc()
			log.Warn("CSR refused: impersonation not allowed", "impersonated", imp, "err", status.Convert(err).Message())
			return nil, err
		}
	}
	csr, err := parseCSR(req.GetCsr())
	if err != nil {
		return nil, s.refuse(log, "csr", codes.InvalidArgument, "bad CSR: %v", err)
	}
	ttl := s.cfg.DefaultTTL
	if v := req.GetValidityDuration(); v > 0 {
		ttl = time.Duration(v) * time.Second
		if v > int64(s.cfg.MaxTTL/time.Second) {
			return nil, s.refuse(log, "ttl", codes.InvalidArgument, "requested lifetime %s is longer than the maximum %s", ttl, s.cfg.MaxTTL)
		}
	}
	certs, err := s.cfg.Authority.Sign(csr, id, ttl)
	if err != nil {
		return nil, s.refuse(log, "sign", codes.InvalidArgument, "sign: %v", err)
	}
	resp := &pb.IstioCertificateResponse{}
	for _, c := range certs {
		resp.CertChain = append(resp.CertChain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	resp.CertChain = append(resp.CertChain, s.rootPEM)
	s.issued.Inc()
	log.Info("certificate issued", "id", id.String(), "expires", certs[0].NotAfter, "serial", certs[0].SerialNumber.Text(16))
	return resp, nil
}

func (s *Service) refuse(log *slog.Logger, reason string, code codes.Code, format string, args ...any) error {
	s.refused.WithLabelValues(reason).Inc()
	msg := fmt.Sprintf(format, args...)
	log.Warn("CSR refused", "reason", msg)
	return status.Error(code, msg)
}

// impersonate allows a trusted node proxy to obtain the identity of a pod
// running on its own node (the node its token is bound to).
func (s *Service) impersonate(ctx context.Context, caller *authn.Caller, imp string) (spiffeid.ID, error) {
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(headerClusterID); len(v) > 0 && v[0] != "" && v[0] != s.cfg.ClusterID {
			return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "cluster %q is not this cluster (%q)", v[0], s.cfg.ClusterID)
		}
	}
	if !s.trusted[caller.String()] {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "%s is not a trusted node proxy account", caller)
	}
	target, err := identity.ParseID(imp)
	if err != nil {
		return spiffeid.ID{}, status.Errorf(codes.InvalidArgument, "impersonated identity: %v", err)
	}
	if target.TrustDomain != s.cfg.Authority.TrustDomain() {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "impersonated identity %s is outside trust domain %s", imp, s.cfg.Authority.TrustDomain().Name())
	}
	node := caller.NodeName
	if node == "" && caller.PodName != "" {
		// Older apiservers do not put the node in the token; find it
		// through the bound pod, which must be the very pod (same UID).
		if p := s.cfg.Pods.Pod(caller.Namespace, caller.PodName); p != nil && (caller.PodUID == "" || string(p.UID) == caller.PodUID) {
			node = p.Spec.NodeName
		}
	}
	if node == "" {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "the token of %s is not bound to a pod on a node", caller)
	}
	for _, p := range s.cfg.Pods.PodsOnNode(node) {
		if p.Namespace != target.Namespace || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		sa := p.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		if sa == target.ServiceAccount {
			id, err := target.ID()
			if err != nil {
				return spiffeid.ID{}, status.Errorf(codes.InvalidArgument, "impersonated identity: %v", err)
			}
			return id, nil
		}
	}
	return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "no pod with identity %s runs on node %q of %s", imp, node, caller)
}

// parseCSR reads one PEM CSR and checks its signature; its subject and SANs
// are ignored.
func parseCSR(s string) (*x509.CertificateRequest, error) {
	block, rest := pem.Decode([]byte(s))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("no PEM CERTIFICATE REQUEST block")
	}
	if len(strings.TrimSpace(string(rest))) > 0 {
		return nil, fmt.Errorf("trailing data after the CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("signature: %w", err)
	}
	return csr, nil
}
