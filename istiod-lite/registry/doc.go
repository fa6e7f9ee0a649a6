// Package registry watches the cluster with client-go shared informers
// (namespaces, nodes, pods, services, endpoint slices, Gateways, HTTPRoutes,
// AuthorizationPolicies, PeerAuthentications), keeps the objects in a
// model.Store and, on every change, recomputes only the resources the change
// can affect (a pod's Workload; the pods and services of a namespace whose
// labels changed; the workloads a policy selects; the objects bound to a
// Gateway; the Services an HTTPRoute attaches to), publishing them to the
// xDS cache, which records what changed.
//
// HTTPRoutes are cached for the waypoint's L7 configuration (issue 8): no
// Workload API resource depends on them today, so a route change recomputes
// its parent Services to unchanged versions and pushes nothing to ztunnels.
//
// One worker goroutine owns the Store; informer handlers only queue events,
// and the worker applies queued events in batches so a burst costs one
// recomputation per affected resource.
package registry
