// Package meshenv is the two-node stage the data-plane benchmarks run on:
// it brings up (or joins) the e2e sandbox, installs the real mesh from the
// Helm chart as the e2e tests do (e2e/meshinstall: istiod-lite, the CNI
// agent, ztunnel with a chosen tunnel mode, switched by a chart upgrade),
// runs a client pod on node 0 and a server pod on node 1 in an enrolled and
// in a plain namespace, starts tools as processes inside those pods'
// network namespaces, and reads the CPU time and memory of processes from
// /proc. It measures nothing itself and removes everything it made on
// Close.
package meshenv
