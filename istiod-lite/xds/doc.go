// Package xds serves the Workload API over Delta ADS
// (envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources):
// type.googleapis.com/istio.workload.Address and
// type.googleapis.com/istio.security.Authorization.
//
// The Cache holds every resource, marshalled once and versioned by content,
// and records which names changed. The Server keeps per-client state (what
// each client subscribed to, the version of every resource it was sent, the
// nonces in flight and the last one it ACKed), debounces changes and sends
// each client only what it lacks: updates, removals, on-demand lookups by
// "network/IP" or name, and a diff against initial_resource_versions when a
// client reconnects. Every stream is authenticated before anything is sent.
// It does not know Kubernetes; the registry fills the Cache.
package xds
