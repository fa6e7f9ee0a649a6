package hbone

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestFormatForwarded(t *testing.T) {
	tests := []struct {
		in   netip.AddrPort
		want string
	}{
		{netip.MustParseAddrPort("10.0.0.1:8080"), `for="10.0.0.1:8080"`},
		{netip.MustParseAddrPort("[2001:db8::1]:443"), `for="[2001:db8::1]:443"`},
		{netip.MustParseAddrPort("[::ffff:10.0.0.1]:80"), `for="10.0.0.1:80"`},
		{netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), 0), `for="10.0.0.1"`},
		{netip.AddrPortFrom(netip.MustParseAddr("fd00::5"), 0), `for="[fd00::5]"`},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			got := FormatForwarded(tt.in)
			if got != tt.want {
				t.Fatalf("FormatForwarded(%v) = %s, want %s", tt.in, got, tt.want)
			}
			ap, ok, err := forwardedFor(got)
			if err != nil || !ok || ap != netip.AddrPortFrom(tt.in.Addr().Unmap(), tt.in.Port()) {
				t.Fatalf("forwardedFor(%s) = %v %v %v, want round trip", got, ap, ok, err)
			}
		})
	}
}

func TestParseForwarded(t *testing.T) {
	tests := []struct {
		in      string
		want    []ForwardedElement
		wantFor string // first for= as AddrPort string, "" = none
		wantErr string
	}{
		{in: `for="10.1.2.3:5555"`, want: []ForwardedElement{{For: "10.1.2.3:5555"}}, wantFor: "10.1.2.3:5555"},
		{in: `for=10.1.2.3`, want: []ForwardedElement{{For: "10.1.2.3"}}, wantFor: "10.1.2.3:0"},
		{in: `For="[2001:db8:cafe::17]:4711"`, want: []ForwardedElement{{For: "[2001:db8:cafe::17]:4711"}}, wantFor: "[2001:db8:cafe::17]:4711"},
		{in: `for=192.0.2.60;proto=http;by=203.0.113.43`, want: []ForwardedElement{{For: "192.0.2.60", Proto: "http", By: "203.0.113.43"}}, wantFor: "192.0.2.60:0"},
		{in: `for=192.0.2.43, for="[2001:db8:cafe::17]"`, want: []ForwardedElement{{For: "192.0.2.43"}, {For: "[2001:db8:cafe::17]"}}, wantFor: "192.0.2.43:0"},
		{in: ` for=unknown ;host="a.example" `, want: []ForwardedElement{{For: "unknown", Host: "a.example"}}},
		{in: `for=_hidden, for=10.0.0.1`, want: []ForwardedElement{{For: "_hidden"}, {For: "10.0.0.1"}}},
		{in: `for="10.0.0.1:_port"`, want: []ForwardedElement{{For: "10.0.0.1:_port"}}, wantFor: "10.0.0.1:0"},
		{in: `for="a\"b"`, wantErr: "bad IP address"},
		{in: ``, wantErr: "empty"},
		{in: `for`, wantErr: "has no value"},
		{in: `for=`, wantErr: "unexpected end"},
		{in: `for="10.0.0.1`, wantErr: "unterminated"},
		{in: `for=1;for=2`, wantErr: "repeated"},
		{in: `for=10.0.0.1 junk`, wantErr: "unexpected"},
		{in: `for="::1"`, wantErr: "brackets"},
		{in: `for="[::1"`, wantErr: "missing ]"},
		{in: `for="[::1]x"`, wantErr: "junk after ]"},
		{in: `for="[10.0.0.1]:80"`, wantErr: "bad IPv6"},
		{in: `for="10.0.0.1:99999"`, wantErr: "bad port"},
		{in: `for="10.0.0.1:+80"`, wantErr: "bad port"},
		{in: `for="[fe80::1%eth0]:80"`, wantErr: "bad IPv6"},
		{in: `for=example.com`, wantErr: "bad IP address"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			els, err := ParseForwarded(tt.in)
			var ap netip.AddrPort
			var ok bool
			if err == nil {
				ap, ok, err = forwardedFor(tt.in)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("error = %v", err)
			}
			if !reflect.DeepEqual(els, tt.want) {
				t.Fatalf("ParseForwarded = %+v, want %+v", els, tt.want)
			}
			if tt.wantFor == "" {
				if ok {
					t.Fatalf("for address = %v, want none", ap)
				}
			} else if !ok || ap.String() != tt.wantFor {
				t.Fatalf("for address = %v (ok=%v), want %s", ap, ok, tt.wantFor)
			}
		})
	}
}

func TestParseTraceParent(t *testing.T) {
	const good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	tests := []struct {
		in      string
		wantErr string
	}{
		{in: good},
		{in: "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"},
		{in: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", wantErr: "55 bytes"},
		{in: "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", wantErr: "version ff"},
		{in: "00-00000000000000000000000000000000-00f067aa0ba902b7-01", wantErr: "trace-id is all zero"},
		{in: "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", wantErr: "parent-id is all zero"},
		{in: "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", wantErr: "lower-case hex"},
		{in: "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", wantErr: "delimiters"},
		{in: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g", wantErr: "flags"},
		{in: "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", wantErr: "delimiter after flags"},
		{in: "00-4bf9", wantErr: "too short"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			tp, err := ParseTraceParent(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := tp.String(); got != tt.in[:55] {
				t.Fatalf("String() = %s, want %s", got, tt.in[:55])
			}
		})
	}
	tp, _ := ParseTraceParent(good)
	if tp.Flags != 1 || tp.TraceID[0] != 0x4b || tp.ParentID[7] != 0xb7 || tp.IsZero() {
		t.Fatalf("parsed fields wrong: %+v", tp)
	}
}

func TestParseBaggage(t *testing.T) {
	tests := []struct {
		in      string
		want    Baggage
		wantErr string
	}{
		{in: "k8s.namespace.name=default", want: Baggage{{Key: "k8s.namespace.name", Value: "default"}}},
		{in: "a=1, b = 2 ;p1;p2=v", want: Baggage{{Key: "a", Value: "1"}, {Key: "b", Value: "2", Properties: []string{"p1", "p2=v"}}}},
		{in: "key=hello%20world%2C", want: Baggage{{Key: "key", Value: "hello world,"}}},
		{in: "key=100%", want: Baggage{{Key: "key", Value: "100%"}}},
		{in: "a=1,,b=2", want: Baggage{{Key: "a", Value: "1"}, {Key: "b", Value: "2"}}},
		{in: "a=", want: Baggage{{Key: "a", Value: ""}}},
		{in: "", wantErr: "no members"},
		{in: "novalue", wantErr: "no '='"},
		{in: "bad key=1", wantErr: "bad key"},
		{in: "a=b c", wantErr: "invalid byte"},
		{in: `a="q"`, wantErr: "invalid byte"},
		{in: "a=1;bad prop", wantErr: "bad property"},
		{in: "a=" + strings.Repeat("x", 9000), wantErr: "exceeds"},
		{in: strings.Repeat("a=1,", 181), wantErr: "more than"},
	}
	for _, tt := range tests {
		name := tt.in
		if len(name) > 40 {
			name = name[:40]
		}
		t.Run(name, func(t *testing.T) {
			got, err := ParseBaggage(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ParseBaggage = %+v, want %+v", got, tt.want)
			}
			back, err := ParseBaggage(got.String())
			if err != nil || !reflect.DeepEqual(back, got) {
				t.Fatalf("round trip via %q = %+v, %v", got.String(), back, err)
			}
		})
	}
	if v, ok := (Baggage{{Key: "a", Value: "1"}}).Get("a"); !ok || v != "1" {
		t.Fatal("Get failed")
	}
}

func FuzzParseForwarded(f *testing.F) {
	for _, s := range []string{`for="10.1.2.3:5555"`, `for=192.0.2.60;proto=http;by=203.0.113.43`, `for="[2001:db8::1]:80", for=unknown`, `for="a\"b"`, `for=_x;host="h"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		els, err := ParseForwarded(s)
		if err != nil {
			return
		}
		if len(els) == 0 {
			t.Fatal("no elements and no error")
		}
		ap, ok, err := forwardedFor(s)
		if err != nil || !ok {
			return
		}
		// What we accept must format back to something we parse the same way.
		back, ok2, err := forwardedFor(FormatForwarded(ap))
		if err != nil || !ok2 || back != ap {
			t.Fatalf("%q: for=%v does not round trip: %v %v %v", s, ap, back, ok2, err)
		}
	})
}

func FuzzParseTraceParent(f *testing.F) {
	f.Add("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	f.Add("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-holds")
	f.Fuzz(func(t *testing.T, s string) {
		tp, err := ParseTraceParent(s)
		if err != nil {
			return
		}
		if tp.String() != s[:55] {
			t.Fatalf("ParseTraceParent(%q).String() = %q", s, tp.String())
		}
	})
}

func FuzzParseBaggage(f *testing.F) {
	for _, s := range []string{"a=1", "k8s.pod.name=x%2Cy;p, b=2", "a=1,,b", "x=%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := ParseBaggage(s)
		if err != nil {
			return
		}
		back, err := ParseBaggage(b.String())
		if err != nil {
			t.Fatalf("re-encoded %q (from %q) does not parse: %v", b.String(), s, err)
		}
		if !reflect.DeepEqual(back, b) {
			t.Fatalf("round trip of %q: %+v != %+v", s, back, b)
		}
	})
}
