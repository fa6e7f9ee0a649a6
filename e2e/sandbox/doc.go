// Package sandbox brings up, reuses and tears down the e2e sandbox: a real
// Kubernetes control plane (package cluster) on the host, nodes as network
// namespaces joined by an underlay (package netlab), and a kubelet-lite per
// node started inside its node namespace as `sandbox kubelet --config F`.
// It is what `bin/sandbox` and e2e tests drive.
//
// # Layout
//
// Instance 0 (the default) is described here; instance i of
// $MESHLITE_SANDBOX_INSTANCE has its own prefix sb<i>, underlay 172.(30+i),
// pods 10.(244+i), services 10.(96+i), etcd ports and state dir
// (netlab.PlanFor), so instances run side by side (hack/with-sandbox.sh).
//
// The host is 172.30.0.1 on the underlay (link sbx-host; the bridge lives in
// namespace sbx-underlay); node i is namespace sbx-node-<i> with address
// 172.30.0.(10+i) and pod CIDR 10.244.<i>.0/24; pods are namespaces
// sbx-pod-<pod uid> made by kubelet-lite. The host routes each pod CIDR via
// its node, so tests reach pod IPs directly. The apiserver listens on
// 172.30.0.1:6443; the kubernetes Service VIP 10.96.0.1:443 is DNATed to it
// inside every node. Services have no other data path (no kube-proxy).
//
// Everything else lives in the state dir (default /var/lib/meshlite-sandbox,
// or $MESHLITE_SANDBOX_DIR): state.json, kubeconfig (admin), pki/, etcd/,
// logs/<component>.log and logs/kubelet-<node>.log, run/*.pid, and per node
// nodes/<node>/{kubelet.json,kubeconfig,pods/,root/} where root/ holds the
// node's etc/cni/net.d (10-sandbox.conflist), opt/cni/bin, var/lib/cni and
// var/run/ztunnel; pods' hostPath volumes resolve under it.
//
// # Environment
//
//   - MESHLITE_SANDBOX_DIR: state dir.
//   - MESHLITE_SANDBOX_INSTANCE: which instance (default 0).
//   - MESHLITE_KUBE_BINS: directory of etcd and the control-plane binaries
//     (default <repo>/.cache/kube/<version>, from hack/kube-bins.sh).
//   - MESHLITE_SANDBOX_KEEP=1: tests keep the sandbox they bring up.
//   - MESHLITE_SANDBOX_DEBUG=1: tests log each step of `up`.
//
// # Sharing one sandbox between test binaries
//
// `go test ./...` runs packages in parallel processes, and a sandbox takes
// seconds to build, so they share one. Two lock files beside the state dir
// coordinate them:
//
//   - <state>.lock is held exclusively around every change (up, down).
//   - <state>.use.lock is held shared by every test binary using the
//     sandbox, from Start until its TestMain returns.
//
// When a test binary finishes it drops its shared lock and, under the change
// lock, tries the use lock exclusively without waiting: if that succeeds it
// is the last user, and it tears the sandbox down unless the sandbox is
// persistent. A sandbox is persistent when `sandbox up` (the CLI) created or
// adopted it, or when MESHLITE_SANDBOX_KEEP=1 was set for the test run; tests
// never remove a persistent sandbox. A test that must own the sandbox
// outright (one that runs `sandbox down`) takes the use lock exclusively
// with Exclusive, which waits for the other users to finish.
package sandbox
