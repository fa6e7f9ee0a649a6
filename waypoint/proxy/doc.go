// Package proxy is the waypoint's data path. It terminates the HBONE
// tunnels ztunnels open to the waypoint (internal/hbone's server hands each
// CONNECT to HandleTunnel), finds the Service the tunnel targets, sniffs
// HTTP/1.1, HTTP/2 prior knowledge (h2c, gRPC included) or opaque TCP, and
// serves HTTP with net/http and x/net/http2: L7 authorization, route
// matching, fault injection, rate limits, filters, weighted backends,
// circuit breaking, retries, timeouts and outlier ejection, then sends the
// request upstream over HBONE to the chosen endpoint's ztunnel with the
// waypoint's identity (plain TCP to endpoints without HBONE). WebSocket
// upgrades are passed on and spliced after the backend's 101. Non-HTTP
// traffic is relayed with L4 policy. Decisions come from the feature
// packages (route, authz, ratelimit, circuit, fault, retry); this package
// wires them in the order the handler list in http.go shows and owns all
// I/O. It does not fetch configuration or certificates.
package proxy
