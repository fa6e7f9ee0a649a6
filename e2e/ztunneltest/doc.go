// Package ztunneltest tests ztunnel in the sandbox, with the mesh installed
// from the Helm chart as a cluster runs it: its DNS proxy (Service names by
// FQDN and short name through the pod's own resolver, prompt SERVFAIL for
// names it cannot forward), the redirection and identity it reports in
// /config_dump, L4 AuthorizationPolicy by service account, namespace and
// port with the deny log line, a rolling restart of ztunnel under a steady
// request load (no failed connection, nothing around it on the wire), QUIC
// and auto mode with the fallback to HTTP/2 when UDP 15008 is blocked, an
// istiod-lite outage (traffic keeps flowing; certificates rotate once it is
// back), and bad input at the HBONE port (malformed CONNECT, unknown
// targets, a foreign trust domain, abandoned handshakes) refused while
// ztunnel keeps serving others. The e2e/meshtest package covers the basic
// data paths (HBONE across nodes, VIPs, PERMISSIVE and STRICT); both use
// the harness in e2e/meshharness.
package ztunneltest
