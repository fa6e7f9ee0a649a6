// Package waypointtest runs waypoints in the sandbox with the mesh installed
// from the Helm chart: deploy_test.go checks what istiod-lite's waypoint
// controller makes of a Gateway of class istio-waypoint (the owned
// ServiceAccount, Deployment and Service, the Gateway's status, the
// GatewayClass, the waypoint pod running and ready, ztunnel binding the
// Service to it, garbage collection with the Gateway); the traffic tests
// check what the waypoint does with the requests it is sent.
//
// TestMain and wpStart (the mesh installed through e2e/meshharness, with
// the waypoint binary and this tree's CRDs) live in deploy_test.go and are
// shared by every test of the package.
package waypointtest
