package install

import "testing"

// FuzzDecode: any input gives objects that name apiVersion, kind and name,
// or an error; never a panic.
func FuzzDecode(f *testing.F) {
	f.Add([]byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n"))
	f.Add([]byte("kind: [\n"))
	f.Add([]byte("- a\n- b\n"))
	f.Add([]byte("{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"p\"}}"))
	f.Add([]byte("apiVersion: v1\nkind: List\nitems: []\nmetadata: {name: l}\n"))
	f.Add([]byte("null\n---\n{}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		objs, err := decode(data)
		if err != nil {
			return
		}
		for _, o := range objs {
			if o.GetAPIVersion() == "" || o.GetKind() == "" || o.GetName() == "" {
				t.Fatalf("decoded an object without apiVersion, kind or name: %v", o.Object)
			}
		}
	})
}
