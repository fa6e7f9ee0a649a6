// Package routestatus writes the status of HTTPRoutes and GRPCRoutes
// attached to Services (GAMMA parentRefs), as Istio's gateway controller
// does for ambient mode: one entry per Service parentRef under controller
// istio.io/gateway-controller, with Accepted (does the parent Service
// exist), ResolvedRefs (do the backendRefs exist, and may the route use
// them: ReferenceGrant) and, for HTTPRoutes, ResolvedWaypoints (is the
// parent bound to a waypoint that applies the route).
//
// Status is computed from the same facts model uses to translate routes
// (model.ServiceWaypoint, model.BackendGranted), so it says what the
// waypoints really do. The Writer runs on the leader replica only and
// writes through the status subresource only when the status changed;
// entries of other controllers are kept as they are. It knows nothing of
// xDS.
package routestatus
