package kubelet

import (
	"strings"
	"testing"
)

func TestExpandVars(t *testing.T) {
	vars := map[string]string{"A": "alpha", "B": "$(A)", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
	cases := map[string]string{
		"plain":          "plain",
		"$(A)":           "alpha",
		"x-$(A)-y":       "x-alpha-y",
		"$(A)$(A)":       "alphaalpha",
		"$(MISSING)":     "$(MISSING)",
		"$$(A)":          "$(A)",
		"$$":             "$",
		"$$$(A)":         "$alpha",
		"$(B)":           "$(A)", // values are not expanded twice
		"$(EMPTY)x":      "x",
		"$A":             "$A",
		"$":              "$",
		"$(A":            "$(A",
		"$()":            "$()",
		"cost: $5 $(A)":  "cost: $5 alpha",
		"nested $($(A))": "nested $($(A))",
	}
	for in, want := range cases {
		if got := expandVars(in, lookup); got != want {
			t.Errorf("expandVars(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzExpandVars(f *testing.F) {
	for _, s := range []string{"$(A)", "$$(A)", "$(", "$$$", "a$(B)c$(", "$()"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		none := func(string) (string, bool) { return "", false }
		out := expandVars(s, none)
		// With nothing defined, only $$ escapes change the text.
		if !strings.Contains(s, "$$") && out != s {
			t.Fatalf("expandVars(%q) with no vars = %q", s, out)
		}
		if len(out) > len(s) {
			t.Fatalf("grew without vars: %q -> %q", s, out)
		}
		all := func(string) (string, bool) { return "X", true }
		_ = expandVars(s, all)
	})
}
