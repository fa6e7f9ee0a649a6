package output

import (
	"bytes"
	"strings"
	"testing"
)

func TestWriteTable_AlignsAndMarksEmptyCells(t *testing.T) {
	var b bytes.Buffer
	if err := WriteTable(&b, []string{"NAME", "VALUE"}, [][]string{{"a", ""}, {"longer-name", "x\ty"}}); err != nil {
		t.Fatal(err)
	}
	want := "NAME          VALUE\na             -\nlonger-name   x y\n"
	if b.String() != want {
		t.Errorf("got\n%q\nwant\n%q", b.String(), want)
	}
}

func TestParseFormat(t *testing.T) {
	for in, want := range map[string]Format{"": Table, "table": Table, "json": JSON, "yaml": YAML} {
		if f, err := ParseFormat(in); err != nil || f != want {
			t.Errorf("%q: %v %v", in, f, err)
		}
	}
	if _, err := ParseFormat("wide"); err == nil || !strings.Contains(err.Error(), "table, json or yaml") {
		t.Errorf("wide: %v", err)
	}
}

func TestWriteData_JSONAndYAML(t *testing.T) {
	v := struct {
		Name string `json:"name"`
		N    int    `json:"count"`
	}{"x", 2}
	var j, y bytes.Buffer
	if err := WriteData(&j, JSON, v); err != nil || j.String() != "{\n  \"name\": \"x\",\n  \"count\": 2\n}\n" {
		t.Errorf("json %q %v", j.String(), err)
	}
	if err := WriteData(&y, YAML, v); err != nil || y.String() != "count: 2\nname: x\n" {
		t.Errorf("yaml %q %v", y.String(), err)
	}
}
