package hbone

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Request header names HBONE uses (lower case, as on the HTTP/2 wire).
const (
	headerForwarded   = "forwarded"
	headerTraceparent = "traceparent"
	headerBaggage     = "baggage"
)

// ForwardedElement is one element of an RFC 7239 Forwarded header.
type ForwardedElement struct {
	For, By, Host, Proto string // raw parameter values, unquoted
}

// FormatForwarded returns the Forwarded header value naming src as the
// original client: for="<ip>:<port>", IPv6 in brackets (RFC 7239 §6); the
// port is left out when zero.
func FormatForwarded(src netip.AddrPort) string {
	return `for="` + formatNode(src) + `"`
}

func formatNode(ap netip.AddrPort) string {
	a := ap.Addr().Unmap()
	if ap.Port() == 0 {
		if a.Is6() {
			return "[" + a.String() + "]"
		}
		return a.String()
	}
	return netip.AddrPortFrom(a, ap.Port()).String()
}

// ParseForwarded parses a Forwarded header value (RFC 7239). Several header
// lines must be joined with ", " first.
func ParseForwarded(v string) ([]ForwardedElement, error) {
	var out []ForwardedElement
	p := &listParser{s: v}
	for {
		p.skipOWS()
		if p.done() {
			break
		}
		var el ForwardedElement
		seen := map[string]bool{}
		for {
			p.skipOWS()
			name, err := p.token()
			if err != nil {
				return nil, fmt.Errorf("parse Forwarded: %w", err)
			}
			if !p.consume('=') {
				return nil, fmt.Errorf("parse Forwarded: parameter %q has no value", name)
			}
			val, err := p.tokenOrQuoted()
			if err != nil {
				return nil, fmt.Errorf("parse Forwarded: parameter %q: %w", name, err)
			}
			lname := strings.ToLower(name)
			if seen[lname] {
				return nil, fmt.Errorf("parse Forwarded: parameter %q repeated in one element", name)
			}
			seen[lname] = true
			switch lname {
			case "for":
				el.For = val
			case "by":
				el.By = val
			case "host":
				el.Host = val
			case "proto":
				el.Proto = val
			}
			p.skipOWS()
			if p.consume(';') {
				continue
			}
			break
		}
		out = append(out, el)
		p.skipOWS()
		if p.done() {
			break
		}
		if !p.consume(',') {
			return nil, fmt.Errorf("parse Forwarded: unexpected %q at offset %d", p.s[p.i], p.i)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("parse Forwarded: empty header")
	}
	return out, nil
}

// ParseForwardedNode parses a node (the value of for= or by=): an IPv4
// address or a bracketed IPv6 address, each with an optional port. It
// returns ok=false without error for "unknown" and obfuscated identifiers.
func ParseForwardedNode(node string) (ap netip.AddrPort, ok bool, err error) {
	if node == "" {
		return netip.AddrPort{}, false, errors.New("parse Forwarded node: empty")
	}
	if strings.EqualFold(node, "unknown") || node[0] == '_' {
		return netip.AddrPort{}, false, nil
	}
	host, port := node, ""
	if node[0] == '[' {
		end := strings.IndexByte(node, ']')
		if end < 0 {
			return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: missing ]", node)
		}
		host = node[1:end]
		rest := node[end+1:]
		if rest != "" {
			if rest[0] != ':' {
				return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: junk after ]", node)
			}
			port = rest[1:]
		}
		a, err := netip.ParseAddr(host)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: bad IPv6 address", node)
		}
	} else if strings.Count(node, ":") > 1 {
		return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: IPv6 must be in brackets", node)
	} else if i := strings.IndexByte(node, ':'); i >= 0 {
		host, port = node[:i], node[i+1:]
	}
	a, err := netip.ParseAddr(host)
	if err != nil || a.Zone() != "" {
		return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: bad IP address", node)
	}
	if node[0] != '[' && !a.Is4() {
		return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: IPv6 must be in brackets", node)
	}
	var pn uint64
	if port != "" {
		if port[0] == '_' { // obfuscated port: address is still usable
			if !isObfuscated(port) {
				return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: bad obfuscated port", node)
			}
		} else {
			pn, err = strconv.ParseUint(port, 10, 16)
			if err != nil || port[0] == '+' {
				return netip.AddrPort{}, false, fmt.Errorf("parse Forwarded node %q: bad port", node)
			}
		}
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(pn)), true, nil
}

func isObfuscated(s string) bool {
	if len(s) < 2 || s[0] != '_' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(isAlnum(c) || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// forwardedFor returns the address of the first Forwarded element's for=
// node: the original client. ok is false when there is none or it is hidden.
func forwardedFor(v string) (netip.AddrPort, bool, error) {
	els, err := ParseForwarded(v)
	if err != nil {
		return netip.AddrPort{}, false, err
	}
	if els[0].For == "" {
		return netip.AddrPort{}, false, nil
	}
	return ParseForwardedNode(els[0].For)
}

// TraceParent is a W3C Trace Context traceparent header.
type TraceParent struct {
	Version  byte
	TraceID  [16]byte
	ParentID [8]byte
	Flags    byte
}

// IsZero reports whether t is unset.
func (t TraceParent) IsZero() bool { return t == TraceParent{} }

// String formats t as a traceparent header value.
func (t TraceParent) String() string {
	b := make([]byte, 0, 55)
	b = hex.AppendEncode(b, []byte{t.Version})
	b = append(b, '-')
	b = hex.AppendEncode(b, t.TraceID[:])
	b = append(b, '-')
	b = hex.AppendEncode(b, t.ParentID[:])
	b = append(b, '-')
	b = hex.AppendEncode(b, []byte{t.Flags})
	return string(b)
}

// ParseTraceParent parses a traceparent value per W3C Trace Context level 1.
// Versions above 00 are parsed by their 00 prefix, as the spec asks.
func ParseTraceParent(s string) (TraceParent, error) {
	var t TraceParent
	if len(s) < 55 {
		return t, fmt.Errorf("parse traceparent: too short (%d bytes)", len(s))
	}
	if s[2] != '-' || s[35] != '-' || s[52] != '-' {
		return t, errors.New("parse traceparent: bad delimiters")
	}
	var v [1]byte
	if err := lowerHex(v[:], s[0:2]); err != nil {
		return t, fmt.Errorf("parse traceparent: version: %w", err)
	}
	t.Version = v[0]
	if t.Version == 0xff {
		return t, errors.New("parse traceparent: version ff is invalid")
	}
	if t.Version == 0 && len(s) != 55 {
		return t, errors.New("parse traceparent: version 00 must be 55 bytes")
	}
	if len(s) > 55 && s[55] != '-' {
		return t, errors.New("parse traceparent: bad delimiter after flags")
	}
	if err := lowerHex(t.TraceID[:], s[3:35]); err != nil {
		return t, fmt.Errorf("parse traceparent: trace-id: %w", err)
	}
	if t.TraceID == [16]byte{} {
		return t, errors.New("parse traceparent: trace-id is all zero")
	}
	if err := lowerHex(t.ParentID[:], s[36:52]); err != nil {
		return t, fmt.Errorf("parse traceparent: parent-id: %w", err)
	}
	if t.ParentID == [8]byte{} {
		return t, errors.New("parse traceparent: parent-id is all zero")
	}
	if err := lowerHex(v[:], s[53:55]); err != nil {
		return t, fmt.Errorf("parse traceparent: flags: %w", err)
	}
	t.Flags = v[0]
	return t, nil
}

func lowerHex(dst []byte, s string) error {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("%q is not lower-case hex", s)
		}
	}
	_, err := hex.Decode(dst, []byte(s))
	return err
}

// Limits from W3C Baggage.
const (
	maxBaggageBytes   = 8192
	maxBaggageMembers = 180
)

// BaggageMember is one list member of a W3C baggage header.
type BaggageMember struct {
	Key        string
	Value      string   // percent-decoded
	Properties []string // raw, e.g. "ttl=30" or "flag"
}

// Baggage is a parsed W3C baggage header.
type Baggage []BaggageMember

// Get returns the value of the first member named key.
func (b Baggage) Get(key string) (string, bool) {
	for _, m := range b {
		if m.Key == key {
			return m.Value, true
		}
	}
	return "", false
}

// String encodes b as a baggage header value, percent-encoding values.
func (b Baggage) String() string {
	var sb strings.Builder
	for i, m := range b {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(m.Key)
		sb.WriteByte('=')
		for j := 0; j < len(m.Value); j++ {
			c := m.Value[j]
			if isBaggageOctet(c) && c != '%' {
				sb.WriteByte(c)
			} else {
				fmt.Fprintf(&sb, "%%%02X", c)
			}
		}
		for _, p := range m.Properties {
			sb.WriteByte(';')
			sb.WriteString(p)
		}
	}
	return sb.String()
}

// ParseBaggage parses a W3C baggage header value.
func ParseBaggage(s string) (Baggage, error) {
	if len(s) > maxBaggageBytes {
		return nil, fmt.Errorf("parse baggage: %d bytes exceeds %d", len(s), maxBaggageBytes)
	}
	var out Baggage
	for _, raw := range strings.Split(s, ",") {
		raw = trimOWS(raw)
		if raw == "" {
			continue
		}
		if len(out) == maxBaggageMembers {
			return nil, fmt.Errorf("parse baggage: more than %d members", maxBaggageMembers)
		}
		parts := strings.Split(raw, ";")
		key, val, ok := strings.Cut(parts[0], "=")
		if !ok {
			return nil, fmt.Errorf("parse baggage: member %q has no '='", parts[0])
		}
		key, val = trimOWS(key), trimOWS(val)
		if !isToken(key) {
			return nil, fmt.Errorf("parse baggage: bad key %q", key)
		}
		dec, err := decodeBaggageValue(val)
		if err != nil {
			return nil, fmt.Errorf("parse baggage: key %q: %w", key, err)
		}
		m := BaggageMember{Key: key, Value: dec}
		for _, prop := range parts[1:] {
			prop = trimOWS(prop)
			pk, pv, hasVal := strings.Cut(prop, "=")
			pk = trimOWS(pk)
			if !isToken(pk) {
				return nil, fmt.Errorf("parse baggage: key %q: bad property %q", key, prop)
			}
			if hasVal {
				pv = trimOWS(pv)
				if _, err := decodeBaggageValue(pv); err != nil {
					return nil, fmt.Errorf("parse baggage: key %q: property %q: %w", key, pk, err)
				}
				prop = pk + "=" + pv
			} else {
				prop = pk
			}
			m.Properties = append(m.Properties, prop)
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		return nil, errors.New("parse baggage: no members")
	}
	return out, nil
}

func decodeBaggageValue(v string) (string, error) {
	var b []byte
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !isBaggageOctet(c) {
			return "", fmt.Errorf("invalid byte %q in value", c)
		}
		if c == '%' && i+2 < len(v) && isHex(v[i+1]) && isHex(v[i+2]) {
			if b == nil {
				b = append(make([]byte, 0, len(v)), v[:i]...)
			}
			h, _ := hex.DecodeString(v[i+1 : i+3])
			b = append(b, h[0])
			i += 2
			continue
		}
		if b != nil {
			b = append(b, c)
		}
	}
	if b == nil {
		return v, nil
	}
	return string(b), nil
}

// isBaggageOctet: %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E
func isBaggageOctet(c byte) bool {
	return c == 0x21 || (c >= 0x23 && c <= 0x2B) || (c >= 0x2D && c <= 0x3A) ||
		(c >= 0x3C && c <= 0x5B) || (c >= 0x5D && c <= 0x7E)
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func isAlnum(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// isTchar reports RFC 9110 token characters.
func isTchar(c byte) bool {
	return isAlnum(c) || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isTchar(s[i]) {
			return false
		}
	}
	return true
}

func trimOWS(s string) string { return strings.Trim(s, " \t") }

// listParser scans RFC 9110 structured lists (tokens, quoted strings).
type listParser struct {
	s string
	i int
}

func (p *listParser) done() bool { return p.i >= len(p.s) }

func (p *listParser) skipOWS() {
	for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\t') {
		p.i++
	}
}

func (p *listParser) consume(c byte) bool {
	if p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *listParser) token() (string, error) {
	start := p.i
	for p.i < len(p.s) && isTchar(p.s[p.i]) {
		p.i++
	}
	if p.i == start {
		if p.done() {
			return "", errors.New("unexpected end")
		}
		return "", fmt.Errorf("unexpected %q at offset %d", p.s[p.i], p.i)
	}
	return p.s[start:p.i], nil
}

func (p *listParser) tokenOrQuoted() (string, error) {
	if !p.consume('"') {
		return p.token()
	}
	var sb strings.Builder
	for p.i < len(p.s) {
		c := p.s[p.i]
		p.i++
		switch {
		case c == '"':
			return sb.String(), nil
		case c == '\\':
			if p.i >= len(p.s) {
				return "", errors.New("unterminated escape")
			}
			sb.WriteByte(p.s[p.i])
			p.i++
		case c == '\t' || c == ' ' || c >= 0x21 && c != 0x7f:
			sb.WriteByte(c)
		default:
			return "", fmt.Errorf("invalid byte %q in quoted string", c)
		}
	}
	return "", errors.New("unterminated quoted string")
}
