package identity

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestNewID(t *testing.T) {
	tests := []struct {
		name, td, ns, sa string
		want             string
		wantErr          string
	}{
		{name: "default trust domain", td: "cluster.local", ns: "default", sa: "sleep", want: "spiffe://cluster.local/ns/default/sa/sleep"},
		{name: "dotted names", td: "example.org", ns: "kube-system", sa: "ztunnel.v2", want: "spiffe://example.org/ns/kube-system/sa/ztunnel.v2"},
		{name: "empty trust domain", td: "", ns: "a", sa: "b", wantErr: "trust domain"},
		{name: "uppercase trust domain", td: "Cluster.local", ns: "a", sa: "b", wantErr: "trust domain"},
		{name: "empty namespace", td: "cluster.local", ns: "", sa: "b", wantErr: "empty namespace"},
		{name: "empty service account", td: "cluster.local", ns: "a", sa: "", wantErr: "empty service account"},
		{name: "slash in namespace", td: "cluster.local", ns: "a/b", sa: "c", wantErr: "path segment"},
		{name: "dot segment", td: "cluster.local", ns: "..", sa: "c", wantErr: "dot segments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := NewID(tt.td, tt.ns, tt.sa)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("NewID() error = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("NewID() error = %v", err)
			}
			if id.String() != tt.want {
				t.Fatalf("NewID() = %s, want %s", id, tt.want)
			}
			back, err := ParseID(id.String())
			if err != nil {
				t.Fatalf("ParseID(%s) error = %v", id, err)
			}
			if back.Namespace != tt.ns || back.ServiceAccount != tt.sa || back.TrustDomain.Name() != tt.td {
				t.Fatalf("ParseID(%s) = %+v, want round trip", id, back)
			}
			if back.String() != tt.want {
				t.Fatalf("Identity.String() = %s, want %s", back.String(), tt.want)
			}
		})
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		in      string
		want    Identity
		wantErr string
	}{
		{in: "spiffe://cluster.local/ns/foo/sa/bar", want: Identity{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), Namespace: "foo", ServiceAccount: "bar"}},
		{in: "", wantErr: "cannot be empty"},
		{in: "https://cluster.local/ns/foo/sa/bar", wantErr: "scheme"},
		{in: "spiffe://cluster.local", wantErr: "path must be"},
		{in: "spiffe://cluster.local/ns/foo", wantErr: "path must be"},
		{in: "spiffe://cluster.local/ns/foo/sa/bar/extra", wantErr: "path must be"},
		{in: "spiffe://cluster.local/sa/bar/ns/foo", wantErr: "path must be"},
		{in: "spiffe://cluster.local/ns//sa/bar", wantErr: "empty segments"},
		{in: "spiffe://cluster.local/ns/foo/sa/bar/", wantErr: "trailing slash"},
		{in: "spiffe:///ns/foo/sa/bar", wantErr: "trust domain is missing"},
		{in: "spiffe://Cluster/ns/foo/sa/bar", wantErr: "trust domain characters"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseID(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseID(%q) error = %v, want containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseID(%q) error = %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseID(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func FuzzParseID(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/a/sa/b", "spiffe://x/ns//sa/", "spiffe://td/ns/a/sa/b/c", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseID(s)
		if err != nil {
			return
		}
		// A parsed identity must build back to the same ID.
		id, err := got.ID()
		if err != nil {
			t.Fatalf("ParseID(%q) = %+v, but ID() fails: %v", s, got, err)
		}
		if id.String() != s {
			t.Fatalf("ParseID(%q) round trips to %q", s, id)
		}
	})
}
