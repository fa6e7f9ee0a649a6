// Package rules owns the packet redirection meshlite installs: Istio's
// in-pod rule set inside an enrolled pod's network namespace (iptables
// chains ISTIO_PRERT and ISTIO_OUTPUT in the mangle, nat and raw tables, the
// fwmark rule and the local route of table 100) and the node-side SNAT of
// kubelet probes to 169.254.7.127 (chain ISTIO_POSTRT and the ipset of
// enrolled pod IPs).
//
// Rules are applied atomically with iptables-restore --noflush, checked with
// iptables -C (github.com/coreos/go-iptables) and removed chain by chain;
// every operation is idempotent. Only the iptables flavour the node's
// `iptables` binary reports is used (nf_tables here); the two are never
// mixed.
//
// It knows nothing about Kubernetes or ZDS, and never decides which pods are
// enrolled: callers hand it an open network namespace.
package rules
