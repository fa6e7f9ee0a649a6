// Package model translates Kubernetes objects into meshlite's Workload API
// (istio.workload.Address: Workload and Service) and L4 authorization
// (istio.security.Authorization) exactly as istiod does for ambient mode.
//
// It is pure: a Store holds the objects the translation reads (namespaces,
// nodes, pods, services, endpoint slices, gateways, policies; HTTPRoutes,
// indexed by the Services they attach to, and ReferenceGrants, for the
// waypoint) and a Builder
// computes one resource at a time from it. It does no I/O, starts no
// goroutines and is not safe for concurrent use; the registry owns the Store
// and decides what to recompute when an object changes.
package model
