package manifest

import (
	"strings"
	"testing"
)

func TestDecode(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []string // kind/name
		wantErr string
	}{
		{
			name: "multi-document with empty ones and comments",
			in: `---
# leading comment
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
`,
			want: []string{"Namespace/demo", "Deployment/web"},
		},
		{
			name: "JSON document",
			in:   `{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}`,
			want: []string{"ConfigMap/c"},
		},
		{
			name: "List is flattened",
			in: `apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a}}
- {apiVersion: v1, kind: Service, metadata: {name: b}}
`,
			want: []string{"Service/a", "Service/b"},
		},
		{name: "empty input", in: "", want: nil},
		{name: "missing kind", in: "apiVersion: v1\nmetadata: {name: x}\n", wantErr: "without apiVersion or kind"},
		{name: "missing name", in: "apiVersion: v1\nkind: Pod\nmetadata: {}\n", wantErr: "without metadata.name"},
		{name: "bad apiVersion", in: "apiVersion: a/b/c\nkind: Pod\nmetadata: {name: x}\n", wantErr: "document 0"},
		{name: "not a mapping", in: "- just\n- a list\n", wantErr: "decode document 0"},
		{name: "broken YAML", in: "apiVersion: v1\nkind: [\n", wantErr: "decode document 0"},
		{name: "list item without name", in: "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod}\n", wantErr: "item 0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := Decode([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			var got []string
			for _, o := range objs {
				got = append(got, o.GetKind()+"/"+o.GetName())
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// FuzzDecode: arbitrary bytes give objects or an error, never a panic, and
// every object returned names its kind and name.
func FuzzDecode(f *testing.F) {
	f.Add([]byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\napiVersion: v1\nkind: List\nitems: []\n"))
	f.Add([]byte(`{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}]}`))
	f.Add([]byte("---\n---\n"))
	f.Add([]byte("kind: &a [*a, *a]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		objs, err := Decode(data)
		if err != nil {
			return
		}
		for _, o := range objs {
			if o.GetKind() == "" || o.GetName() == "" || o.GetAPIVersion() == "" {
				t.Fatalf("Decode returned an incomplete object %v", o.Object)
			}
		}
	})
}
