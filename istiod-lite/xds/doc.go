// Package xds serves the Workload API over Delta ADS
// (envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources):
// type.googleapis.com/istio.workload.Address and
// type.googleapis.com/istio.security.Authorization, and the waypoints' L7
// configuration, type.googleapis.com/meshlite.l7.ServiceConfig.
//
// A resource may be scoped to one waypoint Gateway ("<ns>/<name>"): only a
// client whose node says it is that Gateway's waypoint (node id
// "waypoint~...", metadata GATEWAY_NAME, and a token of the Gateway's
// service account) receives it; every other client never learns it exists.
//
// The Cache holds every resource, marshalled once and versioned by content,
// and records which names changed. The Server keeps per-client state (what
// each client subscribed to, the version of every resource it was sent, the
// nonces in flight and the last one it ACKed), debounces changes and sends
// each client only what it lacks: updates, removals, on-demand lookups by
// "network/IP" or name, and a diff against initial_resource_versions when a
// client reconnects. Every stream is authenticated before anything is sent.
// It does not know Kubernetes; the registry fills the Cache.
//
// Responses are written pre-encoded (wire.go): each resource is encoded once
// in the Cache, a response is a small per-client head (nonce, removals)
// followed by those encodings, and a full push's body is one buffer shared
// by every client that receives it. The gRPC server serving this package
// must use Codec (grpc.ForceServerCodecV2(xds.Codec{})).
package xds
