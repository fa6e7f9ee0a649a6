// Package istiodtest runs bin/istiod-lite in the sandbox the way a cluster
// runs it (the istiod part of the Helm chart deploy/helm/meshlite: its own
// namespace, service account, least-privilege RBAC, readiness probe,
// Service on 15012, non-root uid 1337) and tests it from the outside: a
// Delta ADS client on the host connects to the pod IP over TLS, trusting
// the root istiod-lite published, with real service-account tokens, and
// the workloads are real pods of the sample app run by kubelet-lite. The
// in-process tests of istiod-lite/controlplane cover the same behaviour
// against a bare control plane; these check that the binary, its chart and
// its permissions work in a cluster.
package istiodtest
