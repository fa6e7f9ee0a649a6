package peers

import (
	"fmt"
	"strings"
)

// ServerName is the DNS name in the server certificate (haproxy checks
// names, not IP addresses).
const ServerName = "bench-server"

// Tunnel is one side of an mTLS tunnel pair: it accepts on Listen and
// forwards to Target (the server side terminates TLS, the client side
// originates it).
type Tunnel struct {
	Listen, Target string
	// ServerIP is the address the client side checks the server
	// certificate against.
	ServerIP string
}

// StunnelConfig is stunnel4's configuration for one side (TLS 1.3 only,
// peer certificate verified against the test CA).
func StunnelConfig(c *Certs, t Tunnel, server bool) string {
	var b strings.Builder
	b.WriteString("foreground = yes\npid =\nsyslog = no\ndebug = warning\n\n")
	if server {
		fmt.Fprintf(&b, "[tunnel]\naccept = %s\nconnect = %s\ncert = %s\nkey = %s\n", t.Listen, t.Target, c.ServerCert, c.ServerKey)
	} else {
		fmt.Fprintf(&b, "[tunnel]\nclient = yes\naccept = %s\nconnect = %s\ncert = %s\nkey = %s\ncheckIP = %s\n", t.Listen, t.Target, c.ClientCert, c.ClientKey, t.ServerIP)
	}
	fmt.Fprintf(&b, "CAfile = %s\nverifyChain = yes\nsslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n", c.CA)
	return b.String()
}

// HAProxyTCPConfig is haproxy's configuration for one side of a TCP+mTLS
// pair (TLS 1.3 only, peer certificate required and verified).
func HAProxyTCPConfig(c *Certs, t Tunnel, server bool) string {
	var b strings.Builder
	b.WriteString("global\n  log stderr format raw local0 err\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\n")
	if server {
		fmt.Fprintf(&b, "frontend tunnel\n  bind %s ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3\n  default_backend app\n\nbackend app\n  server app %s\n",
			t.Listen, c.ServerPEM, c.CA, t.Target)
	} else {
		fmt.Fprintf(&b, "frontend app\n  bind %s\n  default_backend tunnel\n\nbackend tunnel\n  server tunnel %s ssl crt %s ca-file %s verify required verifyhost %s ssl-min-ver TLSv1.3\n",
			t.Listen, t.Target, c.ClientPEM, c.CA, ServerName)
	}
	return b.String()
}

// GhostunnelArgs are ghostunnel's arguments for one side (Go's TLS, which
// negotiates 1.3 between two Go peers; the server allows any client the CA
// signed).
func GhostunnelArgs(c *Certs, t Tunnel, server bool) []string {
	if server {
		return []string{"server", "--listen", t.Listen, "--target", t.Target, "--keystore", c.ServerPEM, "--cacert", c.CA, "--allow-all", "--quiet=all"}
	}
	return []string{"client", "--listen", t.Listen, "--target", t.Target, "--keystore", c.ClientPEM, "--cacert", c.CA, "--quiet=all"}
}

// NginxBackendConfig is an nginx that answers every request on listen
// with a small 200 (the L7 backend: cheap, so the proxies in front of it
// decide the figures). dir holds its temp files and pid.
func NginxBackendConfig(dir, listen string, workers int) string {
	return nginxMain(dir, workers, fmt.Sprintf("  server {\n    listen %s reuseport;\n    location / { return 200 \"ok\\n\"; }\n  }\n", listen))
}

// NginxProxyConfig is an nginx reverse proxy on listen in front of
// upstream, keeping upstream connections alive.
func NginxProxyConfig(dir, listen, upstream string, workers int) string {
	return nginxMain(dir, workers, fmt.Sprintf("  upstream app {\n    server %s;\n    keepalive 64;\n  }\n  server {\n    listen %s;\n    location / {\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }\n  }\n", upstream, listen))
}

func nginxMain(dir string, workers int, http string) string {
	return fmt.Sprintf(`daemon off;
master_process on;
worker_processes %[2]d;
pid %[1]s/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  keepalive_requests 1000000;
%[3]s}
`, dir, workers, http)
}

// HAProxyHTTPConfig is an haproxy HTTP proxy on listen in front of
// upstream, with connection reuse to the upstream.
func HAProxyHTTPConfig(listen, upstream string, threads int) string {
	return fmt.Sprintf(`global
  nbthread %d
  log stderr format raw local0 err

defaults
  mode http
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s

frontend web
  bind %s
  default_backend app

backend app
  server app %s
`, threads, listen, upstream)
}
