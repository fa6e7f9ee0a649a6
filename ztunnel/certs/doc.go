// Package certs is ztunnel's certificate manager: a workload certificate
// per local pod identity, asked of istiod-lite's CA on the pod's behalf
// (ImpersonatedIdentity) through internal/caclient, shared by every pod of
// the identity, rotated at half its remaining life, retried with backoff,
// and kept in use while the CA is unreachable for as long as it is valid.
// It also reports what it holds (Statuses, Ready, metrics).
//
// It must not decide which pods are local (the caller says so with AddPod
// and RemovePod), leaves the mesh roots and the CA connection to
// internal/caclient, and never serves traffic.
package certs
