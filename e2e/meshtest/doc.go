// Package meshtest runs the whole mesh in the sandbox, installed from the
// Helm chart the way a cluster runs it (deploy/helm/meshlite through
// e2e/meshinstall: istiod-lite, the cni-agent and ztunnel DaemonSets), and
// tests it end to end with real pods of the sample app: traffic between
// enrolled pods on different nodes, by pod IP and by Service VIP, carried
// over HBONE with mTLS and SPIFFE identities (proved by ztunnel's
// connection table and by counters on the nodes' forwarding path that
// never see the payload in clear), L4 AuthorizationPolicy denials and
// their log lines, and plaintext from outside the mesh allowed only under
// PERMISSIVE. The harness (sandbox, install, probes) is e2e/meshharness,
// shared with e2e/ztunneltest.
package meshtest
