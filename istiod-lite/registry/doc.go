// Package registry watches the cluster with client-go shared informers
// (namespaces, nodes, pods, services, endpoint slices, Gateways, HTTPRoutes,
// GRPCRoutes, ReferenceGrants, AuthorizationPolicies, PeerAuthentications,
// TrafficPolicies),
// keeps the objects in a model.Store and, on every change, recomputes only the resources the change
// can affect (a pod's Workload; the pods and services of a namespace whose
// labels changed; the workloads a policy selects; the objects bound to a
// Gateway; the Services an HTTPRoute attaches to), publishing them to the
// xDS cache, which records what changed.
//
// A Service bound to a waypoint also has an L7 configuration
// (meshlite.l7.ServiceConfig: its routes, L7 policies and TrafficPolicies),
// published scoped to that waypoint's Gateway so only that waypoint gets it.
// Routes, TrafficPolicies, targetRef'd AuthorizationPolicies and
// ReferenceGrants (through the routes of the namespaces they let in)
// recompute the Services they touch; their Workload API resources recompute to unchanged
// versions and push nothing to ztunnels.
//
// The Gateway API, ReferenceGrants, TrafficPolicies and Istio's security
// policies are optional: their informers exist only while the cluster
// serves them, so a cluster without some CRDs still syncs. Informers
// watches CustomResourceDefinitions and takes up an API whose CRDs appear
// later (OnServed hooks register on its informers before they start; their
// first lists arrive as ordinary adds). A CRD deleted later is only logged.
//
// One worker goroutine owns the Store; informer handlers only queue events,
// and the worker applies queued events in batches so a burst costs one
// recomputation per affected resource.
package registry
