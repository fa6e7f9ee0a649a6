package ca

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/kube"
)

// Keys of the CA Secrets, as Istio names them.
const (
	keyCACert    = "ca-cert.pem"
	keyCAKey     = "ca-key.pem"
	keyCertChain = "cert-chain.pem"
	keyRootCert  = "root-cert.pem"

	// secretType is the type Istio gives its self-signed CA Secret.
	secretType = "istio.io/ca-root"
)

// LoadOrCreate returns the mesh CA kept in namespace: the plugged-in
// "cacerts" Secret when there is one, else the self-signed root of the
// "istio-ca-secret" Secret, which is generated (valid for rootTTL) and
// stored on first start so that restarts keep the same root.
func LoadOrCreate(ctx context.Context, client kubernetes.Interface, namespace string, td spiffeid.TrustDomain, rootTTL time.Duration, log *slog.Logger) (*identity.Authority, error) {
	secrets := client.CoreV1().Secrets(namespace)
	plugged, err := secrets.Get(ctx, kube.PluggedCASecret, metav1.GetOptions{})
	switch {
	case err == nil:
		a, err := fromPlugged(td, plugged)
		if err != nil {
			return nil, fmt.Errorf("load CA from secret %s/%s: %w", namespace, kube.PluggedCASecret, err)
		}
		log.Info("using the plugged-in CA", "secret", namespace+"/"+kube.PluggedCASecret, "root_expires", a.Root().NotAfter)
		return a, nil
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("read secret %s/%s: %w", namespace, kube.PluggedCASecret, err)
	}

	for attempt := 0; attempt < 3; attempt++ {
		s, err := secrets.Get(ctx, kube.CASecret, metav1.GetOptions{})
		if err == nil {
			a, err := identity.LoadAuthority(td, s.Data[keyCACert], s.Data[keyCAKey])
			if err != nil {
				return nil, fmt.Errorf("load CA from secret %s/%s: %w", namespace, kube.CASecret, err)
			}
			log.Info("loaded the mesh root CA", "secret", namespace+"/"+kube.CASecret, "root_expires", a.Root().NotAfter)
			return a, nil
		}
		if !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("read secret %s/%s: %w", namespace, kube.CASecret, err)
		}
		a, err := identity.NewAuthority(td, rootTTL)
		if err != nil {
			return nil, err
		}
		chain, key, err := a.MarshalPEM()
		if err != nil {
			return nil, err
		}
		_, err = secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: kube.CASecret, Namespace: namespace},
			Type:       secretType,
			Data: map[string][]byte{
				keyCACert: chain, keyCAKey: key,
				keyCertChain: {}, keyRootCert: {},
			},
		}, metav1.CreateOptions{})
		if err == nil {
			log.Info("generated the mesh root CA", "secret", namespace+"/"+kube.CASecret, "trust_domain", td.Name(), "root_expires", a.Root().NotAfter)
			return a, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("store secret %s/%s: %w", namespace, kube.CASecret, err)
		}
		// Another instance stored its root first: use that one.
	}
	return nil, fmt.Errorf("secret %s/%s keeps changing under us", namespace, kube.CASecret)
}

// fromPlugged reads an operator's CA: ca-cert.pem/ca-key.pem sign,
// cert-chain.pem holds the chain up to the root, root-cert.pem the root.
func fromPlugged(td spiffeid.TrustDomain, s *corev1.Secret) (*identity.Authority, error) {
	for _, k := range []string{keyCACert, keyCAKey, keyRootCert} {
		if len(bytes.TrimSpace(s.Data[k])) == 0 {
			return nil, fmt.Errorf("missing %s", k)
		}
	}
	signing, err := identity.ParseCertsPEM(s.Data[keyCACert])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", keyCACert, err)
	}
	roots, err := identity.ParseCertsPEM(s.Data[keyRootCert])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", keyRootCert, err)
	}
	chain := signing[:1]
	seen := map[string]bool{string(signing[0].Raw): true, string(roots[0].Raw): true}
	if len(bytes.TrimSpace(s.Data[keyCertChain])) > 0 {
		extra, err := identity.ParseCertsPEM(s.Data[keyCertChain])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", keyCertChain, err)
		}
		for _, c := range extra {
			if !seen[string(c.Raw)] {
				seen[string(c.Raw)] = true
				chain = append(chain, c)
			}
		}
	}
	chain = append(chain, roots[0])
	return identity.LoadAuthority(td, identity.EncodeCertsPEM(chain), s.Data[keyCAKey])
}

// RootPEM is the PEM of a's root certificate.
func RootPEM(a *identity.Authority) []byte {
	return identity.EncodeCertsPEM([]*x509.Certificate{a.Root()})
}
