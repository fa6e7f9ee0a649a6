package peers

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"strings"
	"testing"
)

func TestVersionIn_ToolBanners(t *testing.T) {
	for in, want := range map[string]string{
		"Initializing inetd mode configuration\nstunnel 5.68 on x86_64-pc-linux-gnu platform": "5.68",
		"HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/":                  "2.6.12",
		"nginx version: nginx/1.22.1":    "1.22.1",
		"iperf 3.12 (cJSON 1.7.15)":      "3.12",
		"rev master built with go1.26.8": "",
	} {
		if got := VersionIn(in); got != want {
			t.Errorf("VersionIn(%q) = %q, want %q", in, got, want)
		}
	}
}

// The pair's certificates must hold up to the checks the peers make: the
// server's for its IP and name under the test CA, the client's for client
// auth, and TLS 1.3 between them.
func TestNewCerts_MutualTLS13Handshake(t *testing.T) {
	c, err := NewCerts(t.TempDir(), net.ParseIP("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(c.CA)
	if !pool.AppendCertsFromPEM(ca) {
		t.Fatal("CA file holds no certificate")
	}
	srvCert, err := tls.LoadX509KeyPair(c.ServerPEM, c.ServerPEM)
	if err != nil {
		t.Fatal(err)
	}
	cliCert, err := tls.LoadX509KeyPair(c.ClientCert, c.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if s, err := ln.Accept(); err == nil {
			s.(*tls.Conn).Handshake()
			s.Close()
		}
	}()
	for _, name := range []string{"", ServerName} { // by IP (stunnel, ghostunnel) and by name (haproxy)
		cfg := &tls.Config{Certificates: []tls.Certificate{cliCert}, RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS13}
		if name == "" {
			cfg.ServerName = "127.0.0.1"
		}
		conn, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err != nil {
			t.Fatalf("handshake (server name %q): %v", cfg.ServerName, err)
		}
		if v := conn.ConnectionState().Version; v != tls.VersionTLS13 {
			t.Errorf("negotiated %x, want TLS 1.3", v)
		}
		conn.Close()
		if name == "" {
			go func() {
				if s, err := ln.Accept(); err == nil {
					s.(*tls.Conn).Handshake()
					s.Close()
				}
			}()
		}
	}
}

func TestConfigs_PinTLS13AndVerifyPeers(t *testing.T) {
	c := &Certs{CA: "/ca.crt", ServerCert: "/s.crt", ServerKey: "/s.key", ClientCert: "/c.crt", ClientKey: "/c.key", ServerPEM: "/s.pem", ClientPEM: "/c.pem"}
	srv := Tunnel{Listen: "0.0.0.0:8443", Target: "127.0.0.1:5201"}
	cli := Tunnel{Listen: "127.0.0.1:15201", Target: "10.244.1.5:8443", ServerIP: "10.244.1.5"}
	for name, cfg := range map[string]string{
		"stunnel server": StunnelConfig(c, srv, true), "stunnel client": StunnelConfig(c, cli, false),
		"haproxy server": HAProxyTCPConfig(c, srv, true), "haproxy client": HAProxyTCPConfig(c, cli, false),
	} {
		for _, want := range []string{"TLSv1.3", "/ca.crt"} {
			if !strings.Contains(cfg, want) {
				t.Errorf("%s config lacks %q:\n%s", name, want, cfg)
			}
		}
		if strings.HasPrefix(name, "haproxy") && !strings.Contains(cfg, "verify required") {
			t.Errorf("%s does not require the peer's certificate", name)
		}
	}
	if cfg := StunnelConfig(c, cli, false); !strings.Contains(cfg, "checkIP = 10.244.1.5") || !strings.Contains(cfg, "verifyChain = yes") {
		t.Errorf("stunnel client does not check the server:\n%s", cfg)
	}
	if args := strings.Join(GhostunnelArgs(c, srv, true), " "); !strings.Contains(args, "--cacert /ca.crt") {
		t.Errorf("ghostunnel server args %q", args)
	}
}
