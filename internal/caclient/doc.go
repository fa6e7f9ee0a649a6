// Package caclient is the client side of istiod-lite's certificate
// authority that ztunnel and the waypoint share. It owns the mesh trust
// bundle read from the mounted root certificate file (re-read when it
// changes), the TLS 1.3 configuration that verifies istiod-lite against
// it, the projected service-account token, and one certificate request:
// a fresh key and CSR sent to IstioCertificateService.CreateCertificate
// (on behalf of another identity with ImpersonatedIdentity when a node
// proxy asks for a pod), whose reply is parsed and checked (it chains to
// the mesh roots, is for the identity asked and carries the key sent). It
// also paces the callers' loops: renewal at about half a certificate's
// remaining life, and jittered backoff after a failure.
//
// It holds no certificate and runs no renewal loop (ztunnel/certs and
// waypoint/cert do, each its own way) and serves no traffic.
package caclient
