// Package ca is the generated Go for istio.v1.auth (ca.proto): the
// IstioCertificateService that istiod-lite serves and ztunnel calls for
// workload certificates. Do not edit the .pb.go files; change ca.proto and
// run hack/proto.sh.
package ca
