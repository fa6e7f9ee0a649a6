// Package certs is ztunnel's certificate manager. It owns the mesh trust
// bundle (the root certificate file, reloaded when it changes), the
// credentials ztunnel presents to istiod-lite (its projected service-account
// token and TLS verified against that root), and a workload certificate per
// local pod identity: a fresh key and CSR sent to the CA's CreateCertificate
// with ImpersonatedIdentity, shared by every pod of the identity, rotated at
// half its remaining life, retried with backoff, and kept in use while the
// CA is unreachable for as long as it is valid.
//
// It must not decide which pods are local (the caller says so with AddPod
// and RemovePod) and never serves traffic.
package certs
