package identity

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

type handshakeResult struct {
	clientState, serverState tls.ConnectionState
	clientErr, serverErr     error
}

// handshakeTCP runs one TLS handshake over a real loopback TCP connection.
// The listener binds the wildcard address so that the server sees whichever
// loopback address the client dialled as its local address.
func handshakeTCP(t *testing.T, client, server *tls.Config, dialIP string) handshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	srvDone := make(chan handshakeResult, 1)
	go func() {
		var r handshakeResult
		c, err := ln.Accept()
		if err != nil {
			r.serverErr = err
			srvDone <- r
			return
		}
		defer c.Close()
		tc := tls.Server(c, server)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		r.serverErr = tc.Handshake()
		if r.serverErr == nil {
			// Read until the client closes, so that a client-side
			// verification failure is reported to the client, not us.
			_, r.serverErr = tc.Read(make([]byte, 1))
			if errors.Is(r.serverErr, net.ErrClosed) || r.serverErr != nil && strings.Contains(r.serverErr.Error(), "EOF") {
				r.serverErr = nil
			}
		}
		r.serverState = tc.ConnectionState()
		srvDone <- r
	}()
	c, err := net.Dial("tcp", net.JoinHostPort(dialIP, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(c, client)
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	var r handshakeResult
	r.clientErr = tc.Handshake()
	if r.clientErr == nil {
		// In TLS 1.3 the client finishes before the server has checked the
		// client certificate; a read surfaces the server's verdict.
		_ = tc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, err := tc.Read(make([]byte, 1))
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			r.clientErr = err
		}
	}
	r.clientState = tc.ConnectionState()
	tc.Close()
	s := <-srvDone
	r.serverErr, r.serverState = s.serverErr, s.serverState
	return r
}

type fixture struct {
	ca, otherCA        *Authority
	client, server     *x509svid.SVID
	server2            *x509svid.SVID
	foreignClient      *x509svid.SVID
	clientID, serverID spiffeid.ID
	server2ID          spiffeid.ID
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	f := &fixture{ca: mustCA(t, tdLocal), otherCA: mustCA(t, tdOther)}
	f.clientID = mustID(t, "cluster.local", "default", "sleep")
	f.serverID = mustID(t, "cluster.local", "default", "httpbin")
	f.server2ID = mustID(t, "cluster.local", "other", "echo")
	var err error
	if f.client, err = f.ca.NewSVID(f.clientID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if f.server, err = f.ca.NewSVID(f.serverID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if f.server2, err = f.ca.NewSVID(f.server2ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if f.foreignClient, err = f.otherCA.NewSVID(mustID(t, "other.example", "default", "sleep"), time.Hour); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) selector() CertSelector {
	return StaticCertificates(map[netip.Addr]*x509svid.SVID{
		netip.MustParseAddr("127.0.0.1"): f.server,
		netip.MustParseAddr("127.0.0.2"): f.server2,
	})
}

func mustClientConfig(t testing.TB, svid x509svid.Source, bundle x509bundle.Source, a tlsconfig.Authorizer) *tls.Config {
	t.Helper()
	c, err := ClientConfig(svid, bundle, a)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustServerConfig(t testing.TB, certs CertSelector, bundle x509bundle.Source, a tlsconfig.Authorizer) *tls.Config {
	t.Helper()
	c, err := ServerConfig(certs, bundle, a)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// noSPIFFESVID is a CA-signed client certificate without a URI SAN.
func noSPIFFECert(t *testing.T, ca *Authority) *tls.Certificate {
	key, _ := GenerateKey()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"sleep.default.svc"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestTLS_MutualHandshake(t *testing.T) {
	f := newFixture(t)
	cli := mustClientConfig(t, f.client, f.ca.Bundle(), AuthorizeID(f.serverID))
	srv := mustServerConfig(t, f.selector(), f.ca.Bundle(), AuthorizeMemberOf(tdLocal))
	r := handshakeTCP(t, cli, srv, "127.0.0.1")
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("handshake failed: client=%v server=%v", r.clientErr, r.serverErr)
	}
	if r.clientState.Version != tls.VersionTLS13 {
		t.Fatalf("version = %s", tls.VersionName(r.clientState.Version))
	}
	if err := CheckConnection(r.clientState); err != nil {
		t.Fatalf("negotiated suite refused: %v", err)
	}
	if id, err := PeerID(r.clientState); err != nil || id != f.serverID {
		t.Fatalf("client sees server %v (%v), want %s", id, err, f.serverID)
	}
	if id, err := PeerID(r.serverState); err != nil || id != f.clientID {
		t.Fatalf("server sees client %v (%v), want %s", id, err, f.clientID)
	}
}

func TestTLS_Rejections(t *testing.T) {
	f := newFixture(t)
	bundle := f.ca.Bundle()
	srvOK := mustServerConfig(t, f.selector(), bundle, AuthorizeMemberOf(tdLocal))
	cliOK := mustClientConfig(t, f.client, bundle, AuthorizeID(f.serverID))
	tls12 := func(c *tls.Config) *tls.Config {
		c = c.Clone()
		c.MinVersion = tls.VersionTLS12
		c.MaxVersion = tls.VersionTLS12
		return c
	}
	noCertClient := cliOK.Clone()
	noCertClient.GetClientCertificate = nil
	noSPIFFE := noSPIFFECert(t, f.ca)
	noSPIFFEClient := cliOK.Clone()
	noSPIFFEClient.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return noSPIFFE, nil }
	noSPIFFEServer := srvOK.Clone()
	noSPIFFEServer.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return noSPIFFE, nil }

	tests := []struct {
		name        string
		client      *tls.Config
		server      *tls.Config
		dialIP      string
		wantErrSide string // "client", "server" or "either"
		wantErr     string
	}{
		{"client from other trust domain", mustClientConfig(t, f.foreignClient, bundle, AuthorizeAny()), srvOK, "127.0.0.1", "server", `no X.509 bundle found for trust domain: "other.example"`},
		{"client trusts only other trust domain", mustClientConfig(t, f.client, f.otherCA.Bundle(), AuthorizeAny()), srvOK, "127.0.0.1", "client", `no X.509 bundle found for trust domain: "cluster.local"`},
		{"server identity mismatch", mustClientConfig(t, f.client, bundle, AuthorizeID(f.server2ID)), srvOK, "127.0.0.1", "client", "unexpected ID"},
		{"server identity not one of", mustClientConfig(t, f.client, bundle, AuthorizeOneOf(f.server2ID, f.clientID)), srvOK, "127.0.0.1", "client", "unexpected ID"},
		{"client identity not authorized", cliOK, mustServerConfig(t, f.selector(), bundle, AuthorizeID(f.server2ID)), "127.0.0.1", "server", "unexpected ID"},
		{"TLS 1.2 client refused", tls12(cliOK), srvOK, "127.0.0.1", "server", "unsupported versions"},
		{"TLS 1.2 server refused", cliOK, tls12(srvOK), "127.0.0.1", "client", "protocol version"},
		{"client without certificate", noCertClient, srvOK, "127.0.0.1", "server", "didn't provide a certificate"},
		{"client without SPIFFE ID", noSPIFFEClient, srvOK, "127.0.0.1", "server", "certificate contains no URI SAN"},
		{"server without SPIFFE ID", cliOK, noSPIFFEServer, "127.0.0.1", "client", "certificate contains no URI SAN"},
		{"no certificate for destination IP", cliOK, srvOK, "127.0.0.3", "server", "no certificate for this destination address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handshakeTCP(t, tt.client, tt.server, tt.dialIP)
			var err error
			switch tt.wantErrSide {
			case "client":
				err = r.clientErr
			case "server":
				err = r.serverErr
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("%s error = %v, want containing %q (client=%v server=%v)", tt.wantErrSide, err, tt.wantErr, r.clientErr, r.serverErr)
			}
			if r.clientErr == nil && r.serverErr == nil {
				t.Fatal("handshake succeeded")
			}
		})
	}
}

func TestTLS_CertificateSelectedByDestinationIP_TCP(t *testing.T) {
	f := newFixture(t)
	srv := mustServerConfig(t, f.selector(), f.ca.Bundle(), AuthorizeMemberOf(tdLocal))
	for ip, want := range map[string]spiffeid.ID{"127.0.0.1": f.serverID, "127.0.0.2": f.server2ID} {
		cli := mustClientConfig(t, f.client, f.ca.Bundle(), AuthorizeID(want))
		r := handshakeTCP(t, cli, srv, ip)
		if r.clientErr != nil || r.serverErr != nil {
			t.Fatalf("dial %s: client=%v server=%v", ip, r.clientErr, r.serverErr)
		}
		if got, _ := PeerID(r.clientState); got != want {
			t.Fatalf("dial %s: server presented %s, want %s", ip, got, want)
		}
	}
}

func TestTLS_CertificateSelectedByDestinationIP_QUIC(t *testing.T) {
	f := newFixture(t)
	srv := mustServerConfig(t, f.selector(), f.ca.Bundle(), AuthorizeMemberOf(tdLocal))
	srv.NextProtos = []string{"test"}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4zero})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: udp}
	defer tr.Close()
	ln, err := tr.Listen(srv, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		for {
			c, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			go func() {
				// Hold the connection until the client is done.
				<-c.Context().Done()
			}()
		}
	}()
	port := udp.LocalAddr().(*net.UDPAddr).Port
	cases := []struct {
		ip      string
		want    spiffeid.ID
		wantErr string
	}{
		{"127.0.0.1", f.serverID, ""},
		{"127.0.0.2", f.server2ID, ""},
		{"127.0.0.3", spiffeid.ID{}, "no certificate"},
	}
	for _, c := range cases {
		t.Run(c.ip, func(t *testing.T) {
			cli := mustClientConfig(t, f.client, f.ca.Bundle(), AuthorizeAny())
			cli.NextProtos = []string{"test"}
			addr := &net.UDPAddr{IP: net.ParseIP(c.ip), Port: port}
			conn, err := quic.DialAddr(ctx, addr.String(), cli, &quic.Config{HandshakeIdleTimeout: 2 * time.Second})
			if c.wantErr != "" {
				if err == nil {
					conn.CloseWithError(0, "")
					t.Fatalf("QUIC handshake to %s succeeded, want failure", c.ip)
				}
				t.Logf("QUIC handshake to %s failed as expected: %v", c.ip, err)
				return
			}
			if err != nil {
				t.Fatalf("QUIC dial %s: %v", c.ip, err)
			}
			defer conn.CloseWithError(0, "")
			if got, _ := PeerID(conn.ConnectionState().TLS); got != c.want {
				t.Fatalf("QUIC to %s: server presented %s, want %s", c.ip, got, c.want)
			}
		})
	}
}

func TestCheckConnection(t *testing.T) {
	tests := []struct {
		name    string
		cs      tls.ConnectionState
		wantErr string
	}{
		{"TLS 1.3 AES-128-GCM", tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256}, ""},
		{"TLS 1.3 AES-256-GCM", tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_256_GCM_SHA384}, ""},
		{"TLS 1.3 ChaCha20", tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_CHACHA20_POLY1305_SHA256}, "only AES-GCM"},
		{"TLS 1.2 AES-GCM", tls.ConnectionState{Version: tls.VersionTLS12, CipherSuite: tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}, "only TLS 1.3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckConnection(tt.cs)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("CheckConnection() = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("CheckConnection() = %v, want containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestTLS_ChaCha20Refused runs a real handshake in a child process where AES
// hardware support is switched off (GODEBUG=cpu.aes=off), so both Go ends
// prefer ChaCha20-Poly1305; our configs must refuse it.
func TestTLS_ChaCha20Refused(t *testing.T) {
	if os.Getenv("IDENTITY_CHACHA_CHILD") == "1" {
		chachaChild(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestTLS_ChaCha20Refused$", "-test.v")
	cmd.Env = append(os.Environ(), "IDENTITY_CHACHA_CHILD=1", "GODEBUG=cpu.aes=off")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "CHILD-OK") {
		t.Fatalf("child did not run its checks:\n%s", out)
	}
}

func chachaChild(t *testing.T) {
	f := newFixture(t)
	srv := mustServerConfig(t, f.selector(), f.ca.Bundle(), AuthorizeMemberOf(tdLocal))
	cli := mustClientConfig(t, f.client, f.ca.Bundle(), AuthorizeID(f.serverID))
	// Control: without our VerifyConnection the same handshake picks ChaCha20,
	// so the test really exercises the refusal.
	plainSrv, plainCli := srv.Clone(), cli.Clone()
	plainSrv.VerifyConnection, plainCli.VerifyConnection = nil, nil
	r := handshakeTCP(t, plainCli, plainSrv, "127.0.0.1")
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("control handshake: client=%v server=%v", r.clientErr, r.serverErr)
	}
	if r.clientState.CipherSuite != tls.TLS_CHACHA20_POLY1305_SHA256 {
		t.Fatalf("control handshake used %s; cannot provoke ChaCha20 here", tls.CipherSuiteName(r.clientState.CipherSuite))
	}
	for _, c := range []struct {
		name     string
		cli, srv *tls.Config
	}{{"both ours", cli, srv}, {"our server only", plainCli, srv}, {"our client only", cli, plainSrv}} {
		r := handshakeTCP(t, c.cli, c.srv, "127.0.0.1")
		if r.clientErr == nil && r.serverErr == nil {
			t.Fatalf("%s: ChaCha20 handshake succeeded", c.name)
		}
		if !strings.Contains(fmt.Sprint(r.clientErr, r.serverErr), "only AES-GCM") {
			t.Fatalf("%s: unexpected errors client=%v server=%v", c.name, r.clientErr, r.serverErr)
		}
	}
	fmt.Println("CHILD-OK")
}

func TestPeerID(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		name    string
		cs      tls.ConnectionState
		want    spiffeid.ID
		wantErr string
	}{
		{"complete", tls.ConnectionState{HandshakeComplete: true, PeerCertificates: f.client.Certificates}, f.clientID, ""},
		{"incomplete", tls.ConnectionState{PeerCertificates: f.client.Certificates}, spiffeid.ID{}, "not complete"},
		{"no certs", tls.ConnectionState{HandshakeComplete: true}, spiffeid.ID{}, "no certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := PeerID(tt.cs)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("PeerID error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("PeerID = %v, %v; want %s", got, err, tt.want)
			}
		})
	}
}

func TestConfigs_RequireArguments(t *testing.T) {
	f := newFixture(t)
	if _, err := ClientConfig(nil, f.ca.Bundle(), AuthorizeAny()); err == nil {
		t.Error("ClientConfig without SVID accepted")
	}
	if _, err := ClientConfig(f.client, nil, AuthorizeAny()); err == nil {
		t.Error("ClientConfig without bundle accepted")
	}
	if _, err := ClientConfig(f.client, f.ca.Bundle(), nil); err == nil {
		t.Error("ClientConfig without authorizer accepted")
	}
	if _, err := ServerConfig(nil, f.ca.Bundle(), AuthorizeAny()); err == nil {
		t.Error("ServerConfig without selector accepted")
	}
	if _, err := ServerConfig(f.selector(), nil, AuthorizeAny()); err == nil {
		t.Error("ServerConfig without bundle accepted")
	}
	if _, err := ServerConfig(f.selector(), f.ca.Bundle(), nil); err == nil {
		t.Error("ServerConfig without authorizer accepted")
	}
}

func AuthorizeAny() tlsconfig.Authorizer { return tlsconfig.AuthorizeAny() }
