// Package meshctltest tests meshctl, run as a subprocess the way a person
// runs it, against the sandbox cluster with the mesh installed from
// the Helm chart: `meshctl mtls status -o json` against the truth for
// enrolled, un-enrolled, opted-out and STRICT pods, its exit status with and
// without a plaintext connection into an enrolled namespace, the enroll /
// unenroll round trip, and its errors when the cluster is unreachable or the
// mesh is not installed.
package meshctltest
