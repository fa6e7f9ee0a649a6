// Package agent is meshlite's CNI node agent, one per node (a hostNetwork
// DaemonSet pod). It
//
//   - installs the mesh-cni plugin and keeps it chained (package install);
//   - answers the plugin over a unix socket (package agentapi): for an
//     enrolled pod it installs the in-pod redirection (package rules) in the
//     netns the plugin passes, hands the pod to ztunnel (package zds) and
//     tells the plugin once ztunnel holds it;
//   - watches Namespaces and the Pods on its node (client-go informers) and
//     enrolls pods that were running before their namespace got
//     istio.io/dataplane-mode=ambient (finding their netns by IP, package
//     netnsfind), un-enrolls pods whose namespace lost it (rules removed,
//     DelWorkload sent), and marks redirected pods with
//     ambient.istio.io/redirection=enabled;
//   - keeps the node-side probe SNAT (ISTIO_POSTRT and its ipset);
//   - serves readiness (/readyz) and Prometheus metrics (/metrics).
//
// Enrollment follows Istio: the namespace or pod label says ambient, the
// pod label none opts out; host-network pods and excluded namespaces never
// are. Redirection fails closed: an enrolled pod's traffic is redirected
// before ztunnel holds it, so until then it goes nowhere, never around
// ztunnel; the agent leaves every rule in place when it restarts and
// removes them only when its DaemonSet is deleted (uninstall). It learns
// that DaemonSet from its own pod's ownerReferences at start and watches it
// while it runs, so an uninstall is recognised even when the DaemonSet's
// ServiceAccount and RBAC are deleted with it and the API can no longer be
// read at shutdown; without a deletion seen or read, it stays installed.
//
// Kubernetes permissions it needs (least privilege):
//
//   - pods: get, list, watch (its node's, by field selector; get by name
//     for a pod the informer has not seen yet, and for its own pod to learn
//     its DaemonSet) and patch (the redirection annotation);
//   - namespaces: get, list, watch;
//   - daemonsets.apps: get, list, watch, in its own namespace, of its own
//     DaemonSet (watched with a metadata.name field selector, so
//     resourceNames can limit the grant to it): to tell an uninstall from a
//     restart.
package agent
