// Package meshharness is the harness the mesh's end-to-end suites
// (e2e/meshtest, e2e/ztunneltest, e2e/waypointtest, e2e/meshctltest)
// share: the sandbox with the mesh installed from the Helm chart (through
// e2e/meshinstall, uninstalled when the test ends), a suite's sample app
// deployed from its own list of echo pods and objects (namespaces removed
// at the end), and the probes the suites look at the mesh with: HTTP and
// raw TCP from inside a pod's network namespace, ztunnel's admin endpoint
// and connection table, ztunnel's JSON log, and packet counters on the
// nodes' forwarding path that show what crosses between nodes and whether
// in clear. Other suites and bench/meshenv take single parts of it (the
// bin/ check, the echo pod and container, ztunnel's admin endpoint, pod
// readiness) rather than keep copies.
//
// It asserts nothing about the mesh: a helper fails the test only when it
// cannot look (an admin endpoint that does not answer, a condition that
// never holds). The suites keep their namespaces, their apps and their
// checks.
package meshharness
