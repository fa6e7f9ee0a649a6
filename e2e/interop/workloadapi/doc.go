// Package workloadapi checks istiod-lite's Delta ADS responses against
// Istio's own generated types (istio.io/istio/pkg/workloadapi and its
// security package): a real Kubernetes control plane (e2e/cluster) with
// pods, services, a waypoint and policies, istiod-lite run as its own
// process (built from the main module), and a Delta ADS client whose
// resources are decoded from the raw Any bytes into Istio's messages and
// compared field by field with what the Kubernetes objects say.
//
// Istio's generated code registers the same protobuf full names as
// meshlite's proto packages (istio.workload.Address, ...), and the protobuf
// runtime refuses two registrations of one name in a binary. So this
// package, a test binary of its own, links none of meshlite's proto
// packages: istiod-lite runs as a separate process and only
// internal/xds (which carries opaque Any values) and e2e/cluster are
// imported. TestLinksOnlyIstiosWorkloadTypes keeps it that way.
package workloadapi
