// Package kubelet is kubelet-lite, the node agent of the e2e sandbox cluster.
//
// It runs inside one node's network namespace, registers that Node with the
// real kube-apiserver and keeps it Ready (status and Lease heartbeats), and runs
// the Pods bound to it without a container engine: each pod gets a network
// namespace wired by the node's CNI chain (libcni), each container is a local
// binary chosen by image name, started by a re-exec of our own binary
// (InitMain) that joins the pod netns, builds a private mount namespace
// (resolv.conf, hosts, service-account token and other volumes) and execs the
// binary. It reports pod status, runs probes, restarts containers per
// restartPolicy, tears pods down on delete, and serves the kubelet API parts
// behind `kubectl logs`, `exec` and `port-forward` on NodeIP:10250.
//
// It is a test tool: no images, cgroups, resource limits, or user namespaces.
// It must not be imported by mesh components.
package kubelet
