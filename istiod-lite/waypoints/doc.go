// Package waypoints is istiod-lite's Gateway controller for waypoints: for
// every Gateway of class istio-waypoint it server-side applies a
// ServiceAccount, a Deployment running the waypoint proxy and a Service
// (HBONE 15008 and status 15021), all owned by the Gateway so the garbage
// collector removes them with it, and it writes the Gateway's status
// (Accepted, Programmed, listener status and the Service's address) as
// Istio does. It also creates the GatewayClass istio-waypoint
// (controllerName istio.io/mesh-controller) and accepts it.
//
// It only writes: it runs on the leader replica alone. It does not compute
// which traffic a waypoint takes (model does, from the status written
// here) and knows nothing of xDS.
package waypoints
