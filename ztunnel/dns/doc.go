// Package dns is ztunnel's DNS proxy, served on 15053 (UDP and TCP) inside
// every enrolled pod's network namespace, where the pod's rules redirect
// its port 53 traffic. It answers A and AAAA queries for the mesh's
// Kubernetes Service names (<svc>.<ns>.svc.<domain>; the pod's resolver
// expands short names with its search path) from the Workload API state:
// a Service's VIPs, or a headless Service's endpoint IPs. Everything else
// (other names, other types) goes to the upstream resolvers of ztunnel's
// resolv.conf, from the pod's network namespace on sockets marked 0x539
// so the pod's rules do not capture them again; a forward that fails or
// times out is answered SERVFAIL, promptly.
//
// It never invents NXDOMAIN for a name outside the mesh's domain; inside
// it, only for names no Kubernetes DNS could hold (a search suffix
// appended to an already qualified name), which saves the pod's resolver
// a round trip upstream per search domain.
//
// It owns the request path (Answer) and the serving loops; the sockets are
// opened (and closed) by package inpod, the state is package state's.
package dns
