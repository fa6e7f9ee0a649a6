// Package deploytest tests meshlite's Helm chart (deploy/helm/meshlite),
// which every e2e test installs, against the sandbox's real kube-apiserver: every rendered object accepted by a
// server-side dry run, then a real install from the chart (through
// e2e/meshinstall, as `meshctl install` applies it) whose pods become
// ready, an enrolled pod's traffic carried over HBONE with mTLS, and an
// uninstall that unchains mesh-cni from every node and removes the in-pod
// redirection.
package deploytest
