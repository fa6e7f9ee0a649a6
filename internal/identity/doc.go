// Package identity owns meshlite's workload identity: SPIFFE IDs of the form
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, ECDSA P-256 keys
// and CSRs, a small X.509 signing authority (used by tests and by the mesh CA),
// and the mutual-TLS configurations both ends of an HBONE tunnel use.
//
// TLS here is always TLS 1.3 with AES-GCM cipher suites, peers are always
// authenticated by their SPIFFE ID against a trust bundle, and a server picks
// its certificate by the local (original destination) IP of the connection,
// never by SNI. The package does not fetch or rotate certificates (that is the
// callers' job) and does no networking.
package identity
