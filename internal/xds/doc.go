// Package xds holds what meshlite's Delta ADS clients and server share: the
// Workload API type URLs and names, and a Delta ADS client that keeps what
// it received, ACKs or NACKs each response, subscribes on demand and
// resumes after a reconnect with initial_resource_versions. It holds no
// resource semantics; the caller's handler decides what a response means.
package xds
