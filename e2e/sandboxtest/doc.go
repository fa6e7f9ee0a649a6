// Package sandboxtest holds the sandbox's end-to-end tests: workloads
// scheduled across nodes, pod networking, the kubelet API through kubectl,
// and the CLI. They share the sandbox with other test binaries (see package
// sandbox); lifecycle/ owns it outright to test `up` and `down`.
package sandboxtest
