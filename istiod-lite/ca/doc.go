// Package ca is istiod-lite's certificate authority: it keeps the mesh root
// (generated once and stored in a Secret, or an operator's plugged-in
// "cacerts" intermediate), serves istio.v1.auth.IstioCertificateService
// (CreateCertificate for the caller's own identity, or for a pod on the
// caller's node when a trusted node proxy impersonates it), issues and
// rotates istiod-lite's own serving certificate, and publishes the root to
// every namespace as the istio-ca-root-cert ConfigMap.
//
// Identity decisions use only the caller's verified service-account token
// and the cluster's pods; nothing in a CSR is trusted but its public key.
package ca
