package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// lineFields parses one JSON line; time is checked and dropped.
func lineFields(t testing.TB, line []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		t.Fatalf("not one JSON object: %v\n%s", err, line)
	}
	ts, _ := m["time"].(string)
	if _, err := time.Parse(time.RFC3339Nano, ts); err != nil {
		t.Errorf("time %q: %v", ts, err)
	}
	delete(m, "time")
	return m
}

// The hand-written line must carry what slog's JSON handler writes for
// the same record, so switching between them changes no consumer.
func TestJSONAccess_SameFieldsAsSlogJSON(t *testing.T) {
	tricky := sampleAccess()
	tricky.Path = "/a\"b\\c\n\t\x01<&>é\u2028\xff/ü"
	tricky.Authority = "host:80"
	tricky.Flags = ""
	for _, a := range []*Access{sampleAccess(), tricky} {
		var viaSlog, direct bytes.Buffer
		LogAccess(context.Background(), slog.New(slog.NewJSONHandler(&viaSlog, nil)).With("component", "waypoint", "part", "access"), a)
		NewJSONAccess(&direct, nil, "component", "waypoint", "part", "access").LogAccess(context.Background(), a)
		if !bytes.HasSuffix(direct.Bytes(), []byte("}\n")) || bytes.Count(direct.Bytes(), []byte("\n")) != 1 {
			t.Errorf("not one line: %q", direct.String())
		}
		want, got := lineFields(t, viaSlog.Bytes()), lineFields(t, direct.Bytes())
		if !reflect.DeepEqual(got, want) {
			t.Errorf("fields differ\n got %v\nwant %v", got, want)
		}
	}
}

func TestJSONAccess_HonoursTheLevel(t *testing.T) {
	var out bytes.Buffer
	lvl := new(slog.LevelVar)
	lvl.Set(slog.LevelWarn)
	j := NewJSONAccess(&out, lvl)
	j.LogAccess(context.Background(), sampleAccess())
	if out.Len() != 0 {
		t.Errorf("written at level warn: %s", out.String())
	}
	lvl.Set(slog.LevelInfo)
	j.LogAccess(context.Background(), sampleAccess())
	if !strings.Contains(out.String(), `"msg":"access"`) {
		t.Errorf("not written at level info: %q", out.String())
	}
}

// Whatever a client puts in a path or host, the line stays one valid JSON
// object and valid UTF-8 comes back unchanged.
func FuzzJSONAccess(f *testing.F) {
	for _, s := range []string{"/", "/a\"b", "\x00\x1f\x7f", "\xff\xfe", "é\u2028\u2029", strings.Repeat("\\", 5)} {
		f.Add(s, "h")
	}
	f.Fuzz(func(t *testing.T, path, host string) {
		a := sampleAccess()
		a.Path, a.Authority = path, host
		var out bytes.Buffer
		NewJSONAccess(&out, nil).LogAccess(context.Background(), a)
		if bytes.Count(out.Bytes(), []byte("\n")) != 1 {
			t.Fatalf("not one line: %q", out.String())
		}
		m := lineFields(t, out.Bytes())
		if utf8.ValidString(path) && m["path"] != path {
			t.Errorf("path %q came back as %q", path, m["path"])
		}
		if utf8.ValidString(host) && m["authority"] != host {
			t.Errorf("host %q came back as %q", host, m["authority"])
		}
	})
}
