package hbone

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Transport is the HTTP version an HBONE tunnel runs over.
type Transport uint8

const (
	// H2 is HBONE over HTTP/2 over TLS 1.3 on TCP.
	H2 Transport = iota + 1
	// H3 is HBONE over HTTP/3 over QUIC on UDP.
	H3
)

func (t Transport) String() string {
	switch t {
	case H2:
		return "h2"
	case H3:
		return "h3"
	}
	return fmt.Sprintf("transport(%d)", uint8(t))
}

// Errors a Handler returns (wrapped as it likes) to choose the response
// status; any other error answers 503. On the client side a *StatusError
// matches them with errors.Is.
var (
	// ErrDenied answers 401: the request was denied by policy.
	ErrDenied = errors.New("hbone: denied by policy")
	// ErrBadRequest answers 400: the request is malformed.
	ErrBadRequest = errors.New("hbone: bad request")
	// ErrUpstream answers 503: connecting to the target failed.
	ErrUpstream = errors.New("hbone: upstream connect failed")
)

// statusFor maps a handler error to the response status.
func statusFor(err error) int {
	switch {
	case errors.Is(err, ErrDenied):
		return http.StatusUnauthorized
	case errors.Is(err, ErrBadRequest):
		return http.StatusBadRequest
	default:
		return http.StatusServiceUnavailable
	}
}

// StatusError is returned by Client.Dial when the tunnel endpoint answers the
// CONNECT with a status other than 200.
type StatusError struct {
	Status    int
	Transport Transport
	Endpoint  netip.AddrPort
	Target    netip.AddrPort
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone %s CONNECT %s via %s: status %d %s", e.Transport, e.Target, e.Endpoint, e.Status, http.StatusText(e.Status))
}

// Is lets errors.Is(err, ErrDenied) etc. match the status.
func (e *StatusError) Is(target error) bool {
	switch target {
	case ErrDenied:
		return e.Status == http.StatusUnauthorized
	case ErrBadRequest:
		return e.Status == http.StatusBadRequest
	case ErrUpstream:
		return e.Status == http.StatusServiceUnavailable
	}
	return false
}

// Conn is one HBONE tunnel: a net.Conn over a single HTTP/2 or HTTP/3 stream.
type Conn interface {
	net.Conn
	// CloseWrite half-closes the tunnel: the peer reads EOF (HTTP/2
	// END_STREAM, QUIC FIN) while this side can still read.
	CloseWrite() error
	// Reset aborts the tunnel in both directions (RST_STREAM or QUIC stream
	// reset with CONNECT_ERROR), which the peer turns into a TCP RST.
	Reset() error
}

// Request is a validated HBONE CONNECT as a Handler sees it.
type Request struct {
	Transport  Transport
	PeerID     spiffeid.ID    // the client's SPIFFE ID, verified during the TLS handshake
	LocalAddr  netip.AddrPort // this end of the tunnel connection: the original destination (pod IP:15008)
	RemoteAddr netip.AddrPort // the peer's address
	Target     netip.AddrPort // the CONNECT :authority

	// Forwarded is the for= address of the first Forwarded element (the
	// original client), if the peer sent one; trust it only from a waypoint.
	Forwarded   netip.AddrPort
	TraceParent TraceParent // zero if absent or invalid
	Baggage     Baggage     // nil if absent or invalid
	Header      http.Header // every regular request header as received

	accept func() (Conn, error)
}

// Accept answers 200 and hands the tunnel to the handler, for handlers that
// process the stream themselves (a waypoint) instead of returning an upstream
// connection. After Accept the handler returns (nil, nil) and owns the Conn.
func (r *Request) Accept() (Conn, error) {
	if r.accept == nil {
		return nil, errors.New("hbone: Accept called twice or outside the handler")
	}
	a := r.accept
	r.accept = nil
	return a()
}

// connectHead is what both transports extract from a request head.
type connectHead struct {
	method, authority, protocol string
	hasPath, hasScheme          bool
	header                      http.Header
}

// connection-specific fields are malformed in HTTP/2 and HTTP/3 (RFC 9113 §8.2.2).
var connectionSpecific = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"}

// parseConnect validates a request head and fills req. Errors wrap ErrBadRequest.
// Bad traceparent and baggage values are not errors (W3C says to ignore them);
// ignored reports them for a debug log.
func parseConnect(h connectHead, req *Request) (ignored error, err error) {
	if h.method != http.MethodConnect {
		return nil, fmt.Errorf("%w: method %q is not CONNECT", ErrBadRequest, h.method)
	}
	if h.protocol != "" {
		return nil, fmt.Errorf("%w: extended CONNECT (:protocol %q) is not HBONE", ErrBadRequest, h.protocol)
	}
	if h.hasPath || h.hasScheme {
		return nil, fmt.Errorf("%w: CONNECT must not carry :path or :scheme", ErrBadRequest)
	}
	target, err := ParseAuthority(h.authority)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	for _, k := range connectionSpecific {
		if _, ok := h.header[k]; ok {
			return nil, fmt.Errorf("%w: connection-specific header %q", ErrBadRequest, k)
		}
	}
	if te, ok := h.header["Te"]; ok && (len(te) != 1 || te[0] != "trailers") {
		return nil, fmt.Errorf("%w: TE other than \"trailers\"", ErrBadRequest)
	}
	req.Target = target
	req.Header = h.header
	if fw, ok := h.header["Forwarded"]; ok {
		ap, ok, err := forwardedFor(strings.Join(fw, ", "))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadRequest, err)
		}
		if ok {
			req.Forwarded = ap
		}
	}
	var bad []error
	if tp, ok := h.header["Traceparent"]; ok {
		if len(tp) != 1 {
			bad = append(bad, errors.New("several traceparent headers"))
		} else if t, err := ParseTraceParent(tp[0]); err != nil {
			bad = append(bad, err)
		} else {
			req.TraceParent = t
		}
	}
	if bg, ok := h.header["Baggage"]; ok {
		if b, err := ParseBaggage(strings.Join(bg, ",")); err != nil {
			bad = append(bad, err)
		} else {
			req.Baggage = b
		}
	}
	return errors.Join(bad...), nil
}

// ParseAuthority parses a CONNECT :authority that must be a literal ip:port
// (IPv6 in brackets); host names, zones, port 0 and unspecified or multicast
// addresses are refused. IPv4-mapped IPv6 addresses are unmapped.
func ParseAuthority(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, errors.New("empty :authority")
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf(":authority %q is not a literal ip:port", truncate(s, 64))
	}
	a := ap.Addr()
	switch {
	case a.Zone() != "":
		return netip.AddrPort{}, fmt.Errorf(":authority %q has an IPv6 zone", s)
	case ap.Port() == 0:
		return netip.AddrPort{}, fmt.Errorf(":authority %q has port 0", s)
	case a.Unmap().IsUnspecified() || a.IsMulticast() || a.Unmap() == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return netip.AddrPort{}, fmt.Errorf(":authority %q is not a unicast address", s)
	}
	return netip.AddrPortFrom(a.Unmap(), ap.Port()), nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// requestHeaderFields returns the regular request headers a client sends.
func requestHeaderFields(d *DialRequest) ([][2]string, error) {
	var out [][2]string
	if d.Forwarded.IsValid() {
		out = append(out, [2]string{headerForwarded, FormatForwarded(d.Forwarded)})
	}
	if d.TraceParent != "" {
		if _, err := ParseTraceParent(d.TraceParent); err != nil {
			return nil, err
		}
		out = append(out, [2]string{headerTraceparent, d.TraceParent})
	}
	if d.Baggage != "" {
		if _, err := ParseBaggage(d.Baggage); err != nil {
			return nil, err
		}
		out = append(out, [2]string{headerBaggage, d.Baggage})
	}
	return out, nil
}
