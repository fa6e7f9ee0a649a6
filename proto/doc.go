// Package proto holds meshlite's protobuf definitions and their generated Go
// code, one sub-package per proto package:
//
//   - workload: istio.workload, the Workload API (Address, Workload, Service)
//   - security: istio.security, L4 Authorization resources
//   - zds:      istio.workload.zds, the CNI agent <-> ztunnel protocol
//   - ca:       istio.v1.auth, the IstioCertificateService CA
//   - l7:       meshlite.l7, our own waypoint configuration (ServiceConfig:
//     routes, L7 policy, resilience), served by istiod-lite over Delta ADS
//
// The istio.* .proto files are meshlite's own but wire-compatible with Istio ambient:
// same packages, message names, field numbers and enum values. The tests in
// this directory pin those facts. Regenerate with hack/proto.sh; it must not
// import anything but the protobuf and gRPC runtimes.
package proto
