package hbone

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/http2/hpack"
)

func TestParseAuthority(t *testing.T) {
	tests := []struct {
		in, want, wantErr string
	}{
		{in: "10.0.0.1:80", want: "10.0.0.1:80"},
		{in: "[2001:db8::1]:8080", want: "[2001:db8::1]:8080"},
		{in: "[::ffff:10.0.0.1]:80", want: "10.0.0.1:80"},
		{in: "127.0.0.1:15008", want: "127.0.0.1:15008"},
		{in: "", wantErr: "empty"},
		{in: "example.com:80", wantErr: "not a literal ip:port"},
		{in: "10.0.0.1", wantErr: "not a literal ip:port"},
		{in: "10.0.0.1:", wantErr: "not a literal ip:port"},
		{in: "10.0.0.1:http", wantErr: "not a literal ip:port"},
		{in: "2001:db8::1:80", wantErr: "not a literal ip:port"},
		{in: "[fe80::1%eth0]:80", wantErr: "zone"},
		{in: "10.0.0.1:0", wantErr: "port 0"},
		{in: "0.0.0.0:80", wantErr: "not a unicast"},
		{in: "[::]:80", wantErr: "not a unicast"},
		{in: "224.0.0.1:80", wantErr: "not a unicast"},
		{in: "255.255.255.255:80", wantErr: "not a unicast"},
		{in: "10.0.0.1:65536", wantErr: "not a literal ip:port"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseAuthority(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseAuthority(%q) error = %v, want containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("ParseAuthority(%q) = %v, %v; want %s", tt.in, got, err, tt.want)
			}
		})
	}
}

func fields(kv ...string) []hpack.HeaderField {
	var out []hpack.HeaderField
	for i := 0; i+1 < len(kv); i += 2 {
		out = append(out, hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return out
}

func TestParseConnect(t *testing.T) {
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	tests := []struct {
		name        string
		fields      []hpack.HeaderField
		wantErr     string
		wantIgnored string
		check       func(t *testing.T, r *Request)
	}{
		{
			name:   "plain",
			fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:8080"),
			check: func(t *testing.T, r *Request) {
				if r.Target != netip.MustParseAddrPort("10.0.0.2:8080") || r.Forwarded.IsValid() || !r.TraceParent.IsZero() || r.Baggage != nil {
					t.Fatalf("got %+v", r)
				}
			},
		},
		{
			name: "all headers and unknown ones",
			fields: fields(":method", "CONNECT", ":authority", "[fd00::2]:80", "forwarded", `for="[fd00::1]:5555"`,
				"traceparent", tp, "baggage", "k8s.namespace.name=default", "user-agent", "istio", "x-istio-foo", "bar"),
			check: func(t *testing.T, r *Request) {
				if r.Target != netip.MustParseAddrPort("[fd00::2]:80") {
					t.Fatalf("target %v", r.Target)
				}
				if r.Forwarded != netip.MustParseAddrPort("[fd00::1]:5555") {
					t.Fatalf("forwarded %v", r.Forwarded)
				}
				if r.TraceParent.String() != tp {
					t.Fatalf("traceparent %v", r.TraceParent)
				}
				if v, _ := r.Baggage.Get("k8s.namespace.name"); v != "default" {
					t.Fatalf("baggage %v", r.Baggage)
				}
				if r.Header.Get("X-Istio-Foo") != "bar" || r.Header.Get("User-Agent") != "istio" {
					t.Fatalf("raw headers %v", r.Header)
				}
			},
		},
		{name: "two forwarded lines joined", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "forwarded", "for=10.9.9.9", "forwarded", "for=10.8.8.8"),
			check: func(t *testing.T, r *Request) {
				if r.Forwarded.Addr() != netip.MustParseAddr("10.9.9.9") {
					t.Fatalf("forwarded %v", r.Forwarded)
				}
			}},
		{name: "bad traceparent ignored", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "traceparent", "garbage"), wantIgnored: "traceparent"},
		{name: "bad baggage ignored", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "baggage", "no value"), wantIgnored: "baggage"},
		{name: "GET", fields: fields(":method", "GET", ":authority", "10.0.0.2:80", ":path", "/", ":scheme", "https"), wantErr: "is not CONNECT"},
		{name: "no method", fields: fields(":authority", "10.0.0.2:80"), wantErr: "is not CONNECT"},
		{name: "extended CONNECT", fields: fields(":method", "CONNECT", ":protocol", "websocket", ":scheme", "https", ":path", "/", ":authority", "10.0.0.2:80"), wantErr: "extended CONNECT"},
		{name: "path", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", ":path", "/"), wantErr: ":path or :scheme"},
		{name: "scheme", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", ":scheme", "https"), wantErr: ":path or :scheme"},
		{name: "hostname", fields: fields(":method", "CONNECT", ":authority", "httpbin.default:80"), wantErr: "literal ip:port"},
		{name: "no authority", fields: fields(":method", "CONNECT"), wantErr: "empty :authority"},
		{name: "connection header", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "connection", "close"), wantErr: "connection-specific"},
		{name: "transfer-encoding", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "transfer-encoding", "chunked"), wantErr: "connection-specific"},
		{name: "te gzip", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "te", "gzip"), wantErr: "TE"},
		{name: "bad forwarded", fields: fields(":method", "CONNECT", ":authority", "10.0.0.2:80", "forwarded", "for=[::1]"), wantErr: "Forwarded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r Request
			ignored, err := parseConnect(headFromFields(tt.fields), &r)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want containing %q", err, tt.wantErr)
				}
				if !errors.Is(err, ErrBadRequest) || statusFor(err) != http.StatusBadRequest {
					t.Fatalf("error %v does not map to 400", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("error = %v", err)
			}
			if tt.wantIgnored != "" {
				if ignored == nil || !strings.Contains(ignored.Error(), tt.wantIgnored) {
					t.Fatalf("ignored = %v, want containing %q", ignored, tt.wantIgnored)
				}
			} else if ignored != nil {
				t.Fatalf("ignored = %v", ignored)
			}
			if tt.check != nil {
				tt.check(t, &r)
			}
		})
	}
}

func TestStatusMapping(t *testing.T) {
	tests := []struct {
		err    error
		status int
	}{
		{fmt.Errorf("policy deny-all rule 0: %w", ErrDenied), 401},
		{ErrBadRequest, 400},
		{errors.Join(ErrUpstream, errors.New("connection refused")), 503},
		{errors.New("anything else"), 503},
	}
	for _, tt := range tests {
		if got := statusFor(tt.err); got != tt.status {
			t.Errorf("statusFor(%v) = %d, want %d", tt.err, got, tt.status)
		}
		se := &StatusError{Status: tt.status}
		for _, sentinel := range []error{ErrDenied, ErrBadRequest, ErrUpstream} {
			want := statusFor(sentinel) == tt.status && !(tt.status == 503 && sentinel != ErrUpstream)
			if got := errors.Is(se, sentinel); got != want {
				t.Errorf("errors.Is(status %d, %v) = %v, want %v", tt.status, sentinel, got, want)
			}
		}
	}
}

func TestRequestHeaderFields(t *testing.T) {
	d := &DialRequest{
		Forwarded:   netip.MustParseAddrPort("[fd00::1]:1234"),
		TraceParent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		Baggage:     "a=1",
	}
	got, err := requestHeaderFields(d)
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]string{{"forwarded", `for="[fd00::1]:1234"`}, {"traceparent", d.TraceParent}, {"baggage", "a=1"}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if _, err := requestHeaderFields(&DialRequest{TraceParent: "bad"}); err == nil {
		t.Fatal("bad traceparent accepted")
	}
	if _, err := requestHeaderFields(&DialRequest{Baggage: "bad value"}); err == nil {
		t.Fatal("bad baggage accepted")
	}
	if got, _ := requestHeaderFields(&DialRequest{}); len(got) != 0 {
		t.Fatalf("empty request sends headers %v", got)
	}
}

// FuzzParseConnect feeds arbitrary header lists (name NUL value NUL ...)
// through the HTTP/2 request-head path.
func FuzzParseConnect(f *testing.F) {
	f.Add([]byte(":method\x00CONNECT\x00:authority\x0010.0.0.1:80\x00"))
	f.Add([]byte(":method\x00CONNECT\x00:authority\x00[::1]:80\x00forwarded\x00for=\"10.0.0.9:1\"\x00traceparent\x0000-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\x00baggage\x00a=1\x00"))
	f.Add([]byte(":method\x00GET\x00:path\x00/\x00"))
	f.Add([]byte(":method\x00CONNECT\x00:authority\x00host:80\x00te\x00trailers\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		parts := strings.Split(string(b), "\x00")
		var fs []hpack.HeaderField
		for i := 0; i+1 < len(parts); i += 2 {
			fs = append(fs, hpack.HeaderField{Name: parts[i], Value: parts[i+1]})
		}
		var r Request
		_, err := parseConnect(headFromFields(fs), &r)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("parse error %v is not a bad request", err)
			}
			return
		}
		if !r.Target.IsValid() || r.Target.Port() == 0 || r.Target.Addr().Is4In6() {
			t.Fatalf("accepted bad target %v", r.Target)
		}
		if back, err := ParseAuthority(r.Target.String()); err != nil || back != r.Target {
			t.Fatalf("target %v does not round trip: %v", r.Target, err)
		}
	})
}
