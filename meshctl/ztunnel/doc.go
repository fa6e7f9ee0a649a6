// Package ztunnel reaches each node's ztunnel admin endpoint (localhost:15000
// in the node's network namespace) from outside the cluster, through the
// Kubernetes API's port-forward to the ztunnel pod, as istioctl does, and
// decodes its /config_dump. It reads only; it never changes ztunnel state.
package ztunnel
