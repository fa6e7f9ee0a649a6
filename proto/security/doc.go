// Package security is the generated Go for istio.security
// (authorization.proto): the L4 authorization policies istiod-lite serves over
// Delta ADS as type.googleapis.com/istio.security.Authorization. Do not edit
// the .pb.go files; change authorization.proto and run hack/proto.sh.
package security
