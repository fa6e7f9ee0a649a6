// Package hbone owns HBONE tunnels: HTTP CONNECT to a literal ip:port over
// mutual TLS, on HTTP/2 (TLS 1.3 on TCP, ALPN h2) and on HTTP/3 (QUIC on
// UDP, ALPN h3), as Istio ambient speaks it on port 15008.
//
// A Server validates each CONNECT, hands a Request (verified peer SPIFFE ID,
// original destination, target, Forwarded/traceparent/baggage) to a Handler
// that authorizes and connects, answers 200/401/400/503, and relays bytes. A
// Client opens tunnels over pooled connections keyed by {source identity,
// destination identities, source IP, endpoint, transport}. A FIN on one side
// of a tunnel becomes a FIN on the other (END_STREAM, QUIC FIN, TCP
// half-close) and a reset becomes a reset (RST_STREAM/QUIC reset with
// CONNECT_ERROR, TCP RST).
//
// HTTP/2 streams are implemented here on top of golang.org/x/net/http2's
// Framer and hpack: x/net's Server cannot end a response while still reading
// the request, which half-close needs. HTTP/3 uses quic-go's http3 package.
// TLS configurations come from package identity; this package does no
// policy, no certificate management and no socket redirection.
package hbone
