// Package cnitest holds the CNI end-to-end tests: the cni-agent deployed as
// a hostNetwork DaemonSet (its own ServiceAccount and least-privilege RBAC)
// into the sandbox, chaining mesh-cni into each node's conflist; pods in
// enrolled and other namespaces; the in-pod rules checked with iptables-save
// inside pod network namespaces; fail-closed pod start while no ztunnel holds
// the pod; traffic capture and probe SNAT; enrollment of running pods;
// agent restart with snapshot replay; and uninstall. ztunnel's side of ZDS
// is the test client in package zdstest (real socket, real descriptors)
// until ztunnel lands.
package cnitest
