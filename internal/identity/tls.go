package identity

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ErrNoCertificate is what a CertSelector returns for an address it has no
// certificate for; the handshake then fails.
var ErrNoCertificate = errors.New("no certificate for this destination address")

// CertSelector returns the certificate a server presents on connections whose
// local (original destination) address is local.
type CertSelector func(local netip.Addr) (*tls.Certificate, error)

// Authorizers re-exported so that callers need not import tlsconfig for the
// common cases.
var (
	// AuthorizeID accepts exactly one SPIFFE ID.
	AuthorizeID = tlsconfig.AuthorizeID
	// AuthorizeOneOf accepts any of the listed SPIFFE IDs.
	AuthorizeOneOf = tlsconfig.AuthorizeOneOf
	// AuthorizeMemberOf accepts any SPIFFE ID in a trust domain.
	AuthorizeMemberOf = tlsconfig.AuthorizeMemberOf
)

// TLSCertificate converts an SVID into the certificate a tls.Config presents.
func TLSCertificate(svid *x509svid.SVID) *tls.Certificate {
	cert := &tls.Certificate{
		Certificate: make([][]byte, 0, len(svid.Certificates)),
		PrivateKey:  svid.PrivateKey,
		Leaf:        svid.Certificates[0],
	}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return cert
}

// StaticCertificates returns a CertSelector serving a fixed map of local IPs to
// SVIDs; other addresses get ErrNoCertificate.
func StaticCertificates(byIP map[netip.Addr]*x509svid.SVID) CertSelector {
	certs := make(map[netip.Addr]*tls.Certificate, len(byIP))
	for ip, svid := range byIP {
		certs[ip.Unmap()] = TLSCertificate(svid)
	}
	return func(local netip.Addr) (*tls.Certificate, error) {
		if c, ok := certs[local.Unmap()]; ok {
			return c, nil
		}
		return nil, ErrNoCertificate
	}
}

// ClientConfig returns a TLS 1.3 client configuration that presents the SVID
// from svid and accepts a server only if its chain verifies against bundle and
// authorize accepts its SPIFFE ID (e.g. AuthorizeID(expected destination)).
// Callers add NextProtos.
func ClientConfig(svid x509svid.Source, bundle x509bundle.Source, authorize tlsconfig.Authorizer) (*tls.Config, error) {
	switch {
	case svid == nil:
		return nil, errors.New("client TLS config: no SVID source")
	case bundle == nil:
		return nil, errors.New("client TLS config: no trust bundle")
	case authorize == nil:
		return nil, errors.New("client TLS config: no authorizer for the server identity")
	}
	cfg := tlsconfig.MTLSClientConfig(svid, bundle, authorize)
	harden(cfg)
	return cfg, nil
}

// ServerConfig returns a TLS 1.3 server configuration that requires a client
// certificate whose chain verifies against bundle and whose SPIFFE ID authorize
// accepts (e.g. AuthorizeMemberOf(trust domain)). The server's own certificate
// is chosen per connection by certs from the connection's local IP address,
// which is the original destination of redirected traffic; SNI is ignored.
//
// The local address is read from tls.ClientHelloInfo.Conn. crypto/tls sets it
// for TCP; quic-go (v0.65) sets it too, to a net.Conn whose LocalAddr is the
// destination address of the client's packets (it reads IP_PKTINFO on Linux,
// so this also holds for a listener bound to a wildcard address).
// Callers add NextProtos.
func ServerConfig(certs CertSelector, bundle x509bundle.Source, authorize tlsconfig.Authorizer) (*tls.Config, error) {
	switch {
	case certs == nil:
		return nil, errors.New("server TLS config: no certificate selector")
	case bundle == nil:
		return nil, errors.New("server TLS config: no trust bundle")
	case authorize == nil:
		return nil, errors.New("server TLS config: no authorizer for client identities")
	}
	cfg := &tls.Config{}
	// The SVID source passed here is replaced below; the hook sets ClientAuth
	// and the SPIFFE chain verification we want.
	tlsconfig.HookMTLSServerConfig(cfg, noSVID{}, bundle, authorize)
	cfg.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		ip, err := LocalIP(hello)
		if err != nil {
			return nil, err
		}
		cert, err := certs(ip)
		if err != nil {
			return nil, fmt.Errorf("select certificate for %s: %w", ip, err)
		}
		if cert == nil {
			return nil, fmt.Errorf("select certificate for %s: %w", ip, ErrNoCertificate)
		}
		return cert, nil
	}
	// Resumed sessions skip VerifyPeerCertificate, where the SPIFFE checks live.
	cfg.SessionTicketsDisabled = true
	harden(cfg)
	return cfg, nil
}

func harden(cfg *tls.Config) {
	cfg.MinVersion = tls.VersionTLS13
	cfg.MaxVersion = tls.VersionTLS13
	cfg.VerifyConnection = CheckConnection
}

// CheckConnection fails a handshake that did not end in TLS 1.3 with an
// AES-GCM cipher suite. Go does not let a tls.Config choose TLS 1.3 suites, so
// this is where ChaCha20-Poly1305 is refused.
func CheckConnection(cs tls.ConnectionState) error {
	if cs.Version != tls.VersionTLS13 {
		return fmt.Errorf("refuse TLS version %s: only TLS 1.3 is allowed", tls.VersionName(cs.Version))
	}
	switch cs.CipherSuite {
	case tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384:
		return nil
	default:
		return fmt.Errorf("refuse cipher suite %s: only AES-GCM suites are allowed", tls.CipherSuiteName(cs.CipherSuite))
	}
}

// LocalIP returns the local IP address of the connection a ClientHello arrived on.
func LocalIP(hello *tls.ClientHelloInfo) (netip.Addr, error) {
	if hello == nil || hello.Conn == nil {
		return netip.Addr{}, errors.New("select certificate: connection unknown")
	}
	ip, err := AddrIP(hello.Conn.LocalAddr())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("select certificate: %w", err)
	}
	return ip, nil
}

// AddrIP returns the IP of a TCP or UDP address, IPv4-mapped addresses unmapped.
func AddrIP(a net.Addr) (netip.Addr, error) {
	ap, err := AddrPort(a)
	if err != nil {
		return netip.Addr{}, err
	}
	return ap.Addr(), nil
}

// AddrPort converts a TCP or UDP address to netip.AddrPort, IPv4-mapped
// addresses unmapped.
func AddrPort(a net.Addr) (netip.AddrPort, error) {
	switch a := a.(type) {
	case *net.TCPAddr:
		return unmap(a.AddrPort()), nil
	case *net.UDPAddr:
		return unmap(a.AddrPort()), nil
	case nil:
		return netip.AddrPort{}, errors.New("no address")
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q is not ip:port: %w", a, err)
	}
	return unmap(ap), nil
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}

// PeerID returns the SPIFFE ID of the peer's leaf certificate. It is the
// verified identity only for connections whose handshake used ClientConfig or
// ServerConfig, which verify the chain and authorize the ID during the
// handshake (Go leaves VerifiedChains empty for SPIFFE verification).
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if !cs.HandshakeComplete {
		return spiffeid.ID{}, errors.New("peer SPIFFE ID: handshake not complete")
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer SPIFFE ID: peer sent no certificate")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer SPIFFE ID: %w", err)
	}
	return id, nil
}

type noSVID struct{}

func (noSVID) GetX509SVID() (*x509svid.SVID, error) {
	return nil, errors.New("no SVID source")
}
