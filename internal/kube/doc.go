// Package kube holds what several meshlite components share about
// Kubernetes: the label, annotation and object names of Istio's ambient API
// that meshlite honours, the enrollment rule, and building a client from a
// kubeconfig or the in-cluster service account. It holds no informers and no
// component logic.
package kube
