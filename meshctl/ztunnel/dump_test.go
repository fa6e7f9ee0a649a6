package ztunnel

import (
	"os"
	"path/filepath"
	"testing"
)

func TestDecode_ReadsRedirectionOnlyWhenReported(t *testing.T) {
	d, err := Decode([]byte(`{"ztunnel":{"node":"node-1","version":"dev","tunnel":"h2"},
		"workloads":[{"uid":"a","name":"a","namespace":"n","redirection":"verified"},
		             {"uid":"b","name":"b","namespace":"n","redirection":""},
		             {"uid":"c","name":"c","namespace":"n"}],
		"certificates":[{"identity":"spiffe://cluster.local/ns/n/sa/a","pods":["a"],"state":"valid","not_after":"2026-11-23T02:00:00Z"}],
		"connections":[{"direction":"inbound-plaintext","pod":"a","src":"1.2.3.4:5","dst":"5.6.7.8:9","security":"plaintext"}],
		"something_new":{"ignored":true}}`))
	if err != nil {
		t.Fatal(err)
	}
	if d.Ztunnel == nil || d.Ztunnel.Node != "node-1" {
		t.Errorf("ztunnel info: %+v", d.Ztunnel)
	}
	if r := d.Workloads[0].Redirection; r == nil || *r != RedirectionVerified {
		t.Errorf("a: %v", r)
	}
	if r := d.Workloads[1].Redirection; r == nil || *r != "" {
		t.Errorf("b: reported empty, got %v", r)
	}
	if d.Workloads[2].Redirection != nil {
		t.Errorf("c: not reported, got %q", *d.Workloads[2].Redirection)
	}
	if d.Certificates[0].NotAfter.IsZero() || d.Connections[0].Security != SecurityPlaintext {
		t.Errorf("certificates %+v connections %+v", d.Certificates, d.Connections)
	}
}

func TestDecode_RejectsGarbage(t *testing.T) {
	for _, in := range []string{"", "not json", `{"workloads": 3}`, `{"certificates":[{"not_after":"yesterday"}]}`} {
		if _, err := Decode([]byte(in)); err == nil {
			t.Errorf("%q decoded", in)
		}
	}
}

func TestPolicy_NameAndNamespace(t *testing.T) {
	p := Policy{Key: "istio-system/istio_converted_static_strict"}
	if p.Namespace() != "istio-system" || p.Name() != StaticStrictPolicy {
		t.Errorf("%q %q", p.Namespace(), p.Name())
	}
	if p := (Policy{Key: "bare"}); p.Namespace() != "" || p.Name() != "bare" {
		t.Errorf("%q %q", p.Namespace(), p.Name())
	}
}

// FuzzDecode: a ztunnel's answer is untrusted input; decoding never
// panics.
func FuzzDecode(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*.json")
	for _, s := range seeds {
		if b, err := os.ReadFile(s); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(`{"workloads":[{"uid":"x","redirection":null}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = Decode(b)
	})
}
