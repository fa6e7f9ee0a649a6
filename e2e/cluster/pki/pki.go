// Package pki issues the sandbox cluster's certificates: one cluster CA, the
// kube-apiserver's serving and kubelet-client certificates, the
// service-account signing key, client certificates for the admin, the
// controller manager, the scheduler and each node's kubelet, and each
// kubelet's serving certificate. It writes PEM files into one directory and
// knows nothing about processes or networks.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Validity is how long every issued certificate lives. A sandbox is
// short-lived; a year keeps long-running demo clusters working.
const Validity = 365 * 24 * time.Hour

// CA is a certificate authority held in memory while issuing.
type CA struct {
	Cert    *x509.Certificate
	Key     crypto.Signer
	CertPEM []byte
}

// NewCA makes a self-signed CA named commonName.
func NewCA(commonName string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(Validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-sign CA %q: %w", commonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: pemBlock("CERTIFICATE", der)}, nil
}

// Usage says what a leaf certificate is for.
type Usage int

const (
	// ClientAuth is for a TLS client (kubeconfig users, the apiserver's
	// client to kubelets).
	ClientAuth Usage = 1 << iota
	// ServerAuth is for a TLS server (apiserver, kubelet API).
	ServerAuth
)

// Leaf describes a certificate to issue.
type Leaf struct {
	CommonName   string
	Organization []string
	DNSNames     []string
	IPs          []net.IP
	Usage        Usage
}

// Issued is a leaf certificate and its key, PEM encoded.
type Issued struct {
	CertPEM []byte
	KeyPEM  []byte
}

// Issue signs a new leaf certificate with a fresh P-256 key.
func (ca *CA) Issue(l Leaf) (*Issued, error) {
	if l.CommonName == "" {
		return nil, errors.New("issue certificate: empty common name")
	}
	if l.Usage == 0 {
		return nil, fmt.Errorf("issue certificate %q: no usage", l.CommonName)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key for %q: %w", l.CommonName, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	var ext []x509.ExtKeyUsage
	if l.Usage&ClientAuth != 0 {
		ext = append(ext, x509.ExtKeyUsageClientAuth)
	}
	if l.Usage&ServerAuth != 0 {
		ext = append(ext, x509.ExtKeyUsageServerAuth)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: l.CommonName, Organization: l.Organization},
		DNSNames:              l.DNSNames,
		IPAddresses:           l.IPs,
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(Validity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           ext,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate %q: %w", l.CommonName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key for %q: %w", l.CommonName, err)
	}
	return &Issued{CertPEM: pemBlock("CERTIFICATE", der), KeyPEM: pemBlock("PRIVATE KEY", keyDER)}, nil
}

// Node names a node whose kubelet needs certificates.
type Node struct {
	Name string
	IP   net.IP
}

// Request says what the cluster's certificates must cover.
type Request struct {
	// APIServerIPs and APIServerDNS are the serving certificate's SANs:
	// every address clients dial (loopback, the underlay host address, the
	// kubernetes Service VIP) and the kubernetes.default names.
	APIServerIPs []net.IP
	APIServerDNS []string
	Nodes        []Node
}

// Paths are the files Generate writes, all inside one directory.
type Paths struct {
	Dir                   string
	CACert, CAKey         string
	APIServerCert         string
	APIServerKey          string
	APIServerKubeletCert  string
	APIServerKubeletKey   string
	ServiceAccountKey     string // private, PKCS#8 PEM
	ServiceAccountPub     string // public, PKIX PEM
	AdminCert, AdminKey   string
	ControllerManagerCert string
	ControllerManagerKey  string
	SchedulerCert         string
	SchedulerKey          string
}

// Layout returns where Generate puts each file in dir.
func Layout(dir string) Paths {
	p := func(n string) string { return filepath.Join(dir, n) }
	return Paths{
		Dir:                   dir,
		CACert:                p("ca.crt"),
		CAKey:                 p("ca.key"),
		APIServerCert:         p("apiserver.crt"),
		APIServerKey:          p("apiserver.key"),
		APIServerKubeletCert:  p("apiserver-kubelet-client.crt"),
		APIServerKubeletKey:   p("apiserver-kubelet-client.key"),
		ServiceAccountKey:     p("sa.key"),
		ServiceAccountPub:     p("sa.pub"),
		AdminCert:             p("admin.crt"),
		AdminKey:              p("admin.key"),
		ControllerManagerCert: p("controller-manager.crt"),
		ControllerManagerKey:  p("controller-manager.key"),
		SchedulerCert:         p("scheduler.crt"),
		SchedulerKey:          p("scheduler.key"),
	}
}

// KubeletClient returns the paths of node's client certificate and key (the
// kubelet's identity towards the apiserver).
func (p Paths) KubeletClient(node string) (cert, key string) {
	return filepath.Join(p.Dir, "kubelet-"+node+".crt"), filepath.Join(p.Dir, "kubelet-"+node+".key")
}

// KubeletServing returns the paths of node's kubelet API serving certificate
// and key.
func (p Paths) KubeletServing(node string) (cert, key string) {
	return filepath.Join(p.Dir, "kubelet-"+node+"-serving.crt"), filepath.Join(p.Dir, "kubelet-"+node+"-serving.key")
}

// Generate creates a fresh CA and every certificate and key the cluster
// needs in dir, overwriting what is there.
func Generate(dir string, req Request) (Paths, error) {
	paths := Layout(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return paths, fmt.Errorf("create PKI dir: %w", err)
	}
	ca, err := NewCA("meshlite-sandbox-ca")
	if err != nil {
		return paths, err
	}
	caKey, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return paths, fmt.Errorf("encode CA key: %w", err)
	}
	if err := writeFile(paths.CACert, ca.CertPEM, 0o644); err != nil {
		return paths, err
	}
	if err := writeFile(paths.CAKey, pemBlock("PRIVATE KEY", caKey), 0o600); err != nil {
		return paths, err
	}

	type job struct {
		leaf      Leaf
		cert, key string
	}
	jobs := []job{
		{Leaf{CommonName: "kube-apiserver", DNSNames: req.APIServerDNS, IPs: req.APIServerIPs, Usage: ServerAuth},
			paths.APIServerCert, paths.APIServerKey},
		// The apiserver's identity towards kubelets (logs, exec,
		// port-forward). system:masters so any authorizer the kubelet
		// consults allows it.
		{Leaf{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}, Usage: ClientAuth},
			paths.APIServerKubeletCert, paths.APIServerKubeletKey},
		{Leaf{CommonName: "sandbox-admin", Organization: []string{"system:masters"}, Usage: ClientAuth},
			paths.AdminCert, paths.AdminKey},
		// The names RBAC's bootstrap policy binds for these components.
		{Leaf{CommonName: "system:kube-controller-manager", Usage: ClientAuth},
			paths.ControllerManagerCert, paths.ControllerManagerKey},
		{Leaf{CommonName: "system:kube-scheduler", Usage: ClientAuth},
			paths.SchedulerCert, paths.SchedulerKey},
	}
	for _, n := range req.Nodes {
		if n.Name == "" || n.IP == nil {
			return paths, fmt.Errorf("issue node certificates: node %+v needs a name and an IP", n)
		}
		cc, ck := paths.KubeletClient(n.Name)
		sc, sk := paths.KubeletServing(n.Name)
		jobs = append(jobs,
			// The Node authorizer and NodeRestriction recognise exactly
			// this subject.
			job{Leaf{CommonName: "system:node:" + n.Name, Organization: []string{"system:nodes"}, Usage: ClientAuth}, cc, ck},
			job{Leaf{CommonName: n.Name, DNSNames: []string{n.Name}, IPs: []net.IP{n.IP}, Usage: ServerAuth}, sc, sk},
		)
	}
	for _, j := range jobs {
		is, err := ca.Issue(j.leaf)
		if err != nil {
			return paths, err
		}
		if err := writeFile(j.cert, is.CertPEM, 0o644); err != nil {
			return paths, err
		}
		if err := writeFile(j.key, is.KeyPEM, 0o600); err != nil {
			return paths, err
		}
	}

	// The service-account token signing key pair; the apiserver signs with
	// the private key and verifies with the public one.
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return paths, fmt.Errorf("generate service-account key: %w", err)
	}
	saPriv, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return paths, fmt.Errorf("encode service-account key: %w", err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return paths, fmt.Errorf("encode service-account public key: %w", err)
	}
	if err := writeFile(paths.ServiceAccountKey, pemBlock("PRIVATE KEY", saPriv), 0o600); err != nil {
		return paths, err
	}
	if err := writeFile(paths.ServiceAccountPub, pemBlock("PUBLIC KEY", saPub), 0o644); err != nil {
		return paths, err
	}
	return paths, nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return s, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
