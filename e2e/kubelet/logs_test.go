package kubelet

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeTestLog(t *testing.T, entries []logEntry) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "0.log")
	lw, err := openLogWriter(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := lw.write(e.ts, e.stream, e.content, e.partial); err != nil {
			t.Fatal(err)
		}
	}
	lw.wait()
	return path
}

func renderLogs(t *testing.T, path string, opts logOptions) string {
	t.Helper()
	var b bytes.Buffer
	if err := writeLogs(context.Background(), &b, func() {}, path, opts, func() bool { return false }); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestLogs_WriteParseAndRender(t *testing.T) {
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 600, time.UTC)
	path := writeTestLog(t, []logEntry{
		{ts: t0, stream: "stdout", content: []byte("first")},
		{ts: t0.Add(time.Second), stream: "stderr", content: []byte("par"), partial: true},
		{ts: t0.Add(time.Second), stream: "stderr", content: []byte("tial")},
		{ts: t0.Add(2 * time.Second), stream: "stdout", content: []byte("")},
		{ts: t0.Add(3 * time.Second), stream: "stdout", content: []byte("last line")},
	})
	all := logOptions{tailLines: -1}
	if got := renderLogs(t, path, all); got != "first\npartial\n\nlast line\n" {
		t.Fatalf("all = %q", got)
	}
	tail := all
	tail.tailLines = 2
	if got := renderLogs(t, path, tail); got != "\nlast line\n" {
		t.Fatalf("tail 2 = %q", got)
	}
	tail.tailLines = 3
	if got := renderLogs(t, path, tail); got != "partial\n\nlast line\n" {
		t.Fatalf("tail 3 keeps a split line whole: %q", got)
	}
	tail.tailLines = 0
	if got := renderLogs(t, path, tail); got != "" {
		t.Fatalf("tail 0 = %q", got)
	}
	since := all
	since.since = t0.Add(2 * time.Second)
	if got := renderLogs(t, path, since); got != "\nlast line\n" {
		t.Fatalf("since = %q", got)
	}
	ts := all
	ts.timestamps = true
	ts.tailLines = 1
	if got := renderLogs(t, path, ts); got != "2025-01-02T03:04:08.0000006Z last line\n" {
		t.Fatalf("timestamps = %q", got)
	}
	lim := all
	lim.limitBytes = 8
	if got := renderLogs(t, path, lim); got != "first\npa" {
		t.Fatalf("limitBytes = %q", got)
	}
}

func TestLogWriter_SplitsLongLinesAndKeepsStreams(t *testing.T) {
	path := filepath.Join(t.TempDir(), "0.log")
	lw, err := openLogWriter(path)
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", maxLogLine+10)
	lw.copyFrom(io.NopCloser(strings.NewReader("hello\n"+long+"\nno newline at end")), "stdout")
	lw.copyFrom(io.NopCloser(strings.NewReader("oops\n")), "stderr")
	lw.wait()
	raw, _ := os.ReadFile(path)
	var partial, full, stderr int
	var stdout strings.Builder
	for _, line := range strings.Split(strings.TrimSuffix(string(raw), "\n"), "\n") {
		e, err := parseLogLine([]byte(line))
		if err != nil {
			t.Fatalf("unparsable line %q: %v", line, err)
		}
		if e.partial {
			partial++
		} else {
			full++
		}
		if e.stream == "stderr" {
			stderr++
		} else {
			stdout.Write(e.content)
			if !e.partial {
				stdout.WriteByte('\n')
			}
		}
	}
	if partial != 1 || full != 4 || stderr != 1 {
		t.Fatalf("partial=%d full=%d stderr=%d\n%s", partial, full, stderr, raw)
	}
	// Both streams interleave; stdout alone is what was written.
	if stdout.String() != "hello\n"+long+"\nno newline at end\n" {
		t.Fatalf("stdout entries lost content")
	}
}

func TestWriteLogs_FollowStopsWhenContainerEnds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "0.log")
	lw, err := openLogWriter(path)
	if err != nil {
		t.Fatal(err)
	}
	_ = lw.write(time.Now(), "stdout", []byte("one"), false)
	running := make(chan struct{})
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- writeLogs(context.Background(), &out, func() {}, path, logOptions{follow: true, tailLines: -1}, func() bool {
			select {
			case <-running:
				return false
			default:
				return true
			}
		})
	}()
	time.Sleep(150 * time.Millisecond)
	_ = lw.write(time.Now(), "stdout", []byte("two"), false)
	close(running)
	lw.wait()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("follow did not end after the container stopped")
	}
	if out.String() != "one\ntwo\n" {
		t.Fatalf("followed = %q", out.String())
	}
}

func TestParseLogLine_Rejects(t *testing.T) {
	for _, bad := range []string{"", "nots a time stdout F x", "2025-01-02T03:04:05Z stdin F x", "2025-01-02T03:04:05Z stdout X x", "2025-01-02T03:04:05Z"} {
		if _, err := parseLogLine([]byte(bad)); err == nil {
			t.Errorf("parseLogLine(%q) accepted", bad)
		}
	}
	e, err := parseLogLine([]byte("2025-01-02T03:04:05Z stdout F"))
	if err != nil || len(e.content) != 0 {
		t.Fatalf("empty full line: %+v %v", e, err)
	}
}

func FuzzParseLogLine(f *testing.F) {
	f.Add([]byte("2025-01-02T03:04:05.123456789Z stdout F hello world"))
	f.Add([]byte("2025-01-02T03:04:05Z stderr P part"))
	f.Add([]byte("2025-01-02T03:04:05Z stdout F:x y"))
	f.Fuzz(func(t *testing.T, line []byte) {
		e, err := parseLogLine(line)
		if err != nil {
			return
		}
		// What parses renders back to an equivalent line.
		path := filepath.Join(t.TempDir(), "l")
		lw, werr := openLogWriter(path)
		if werr != nil {
			t.Fatal(werr)
		}
		if bytes.ContainsRune(e.content, '\n') {
			return
		}
		_ = lw.write(e.ts, e.stream, e.content, e.partial)
		lw.wait()
		raw, _ := os.ReadFile(path)
		e2, err := parseLogLine(bytes.TrimSuffix(raw, []byte("\n")))
		if err != nil || !e2.ts.Equal(e.ts) || e2.stream != e.stream || e2.partial != e.partial || !bytes.Equal(e2.content, e.content) {
			t.Fatalf("round trip of %q: %+v vs %+v (%v)", line, e, e2, err)
		}
	})
}
