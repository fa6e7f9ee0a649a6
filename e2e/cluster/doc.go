// Package cluster runs the sandbox's control plane: it issues the PKI,
// writes kubeconfigs, starts etcd, kube-apiserver, kube-controller-manager
// and kube-scheduler as daemons that outlive the starter, waits for the
// apiserver to be ready, installs the CRDs the mesh needs (Gateway API
// experimental channel, Istio's AuthorizationPolicy and PeerAuthentication), and
// stops it all again. It does not build networks or run kubelets.
package cluster
