package kubelet

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// Container logs are kept in the CRI log format, one entry a line:
// "<RFC3339Nano time> <stdout|stderr> <P|F> <content>", where P marks a
// partial line (split at maxLogLine) and F a full one. It carries what
// `kubectl logs --timestamps/--since-time` need.
const maxLogLine = 16 << 10

// logWriter appends entries to one container instance's log file.
type logWriter struct {
	mu sync.Mutex
	f  *os.File
	wg sync.WaitGroup
}

func openLogWriter(path string) (*logWriter, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open container log %s: %w", path, err)
	}
	return &logWriter{f: f}, nil
}

func (l *logWriter) write(now time.Time, stream string, content []byte, partial bool) error {
	tag := "F"
	if partial {
		tag = "P"
	}
	buf := make([]byte, 0, len(content)+48)
	buf = now.UTC().AppendFormat(buf, time.RFC3339Nano)
	buf = append(buf, ' ')
	buf = append(buf, stream...)
	buf = append(buf, ' ')
	buf = append(buf, tag...)
	buf = append(buf, ' ')
	buf = append(buf, content...)
	buf = append(buf, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err := l.f.Write(buf)
	return err
}

// copyFrom copies r (a container's stdout or stderr pipe) into the log until
// EOF, in the background; wait waits for all copies.
func (l *logWriter) copyFrom(r io.ReadCloser, stream string) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer r.Close()
		br := bufio.NewReaderSize(r, maxLogLine)
		for {
			line, err := br.ReadSlice('\n')
			switch {
			case err == nil:
				_ = l.write(time.Now(), stream, line[:len(line)-1], false)
			case errors.Is(err, bufio.ErrBufferFull):
				_ = l.write(time.Now(), stream, line, true)
			default:
				if len(line) > 0 {
					_ = l.write(time.Now(), stream, line, false)
				}
				return
			}
		}
	}()
}

// wait waits for the copies and closes the file.
func (l *logWriter) wait() {
	l.wg.Wait()
	l.f.Close()
}

type logEntry struct {
	ts      time.Time
	stream  string
	partial bool
	content []byte
}

// parseLogLine parses one CRI log line (without its newline).
func parseLogLine(line []byte) (logEntry, error) {
	var e logEntry
	ts, rest, ok := bytes.Cut(line, []byte{' '})
	if !ok {
		return e, errors.New("log line: no timestamp")
	}
	t, err := time.Parse(time.RFC3339Nano, string(ts))
	if err != nil {
		return e, fmt.Errorf("log line: timestamp: %w", err)
	}
	stream, rest, ok := bytes.Cut(rest, []byte{' '})
	if !ok || (string(stream) != "stdout" && string(stream) != "stderr") {
		return e, errors.New("log line: bad stream")
	}
	tag, content, ok := bytes.Cut(rest, []byte{' '})
	if !ok {
		// "<ts> <stream> F" with empty content and no trailing space.
		tag, content = rest, nil
	}
	// The tag may carry more, colon-separated; the first part is P or F.
	first, _, _ := bytes.Cut(tag, []byte{':'})
	switch string(first) {
	case "P":
		e.partial = true
	case "F":
	default:
		return e, errors.New("log line: bad tag")
	}
	e.ts, e.stream, e.content = t, string(stream), content
	return e, nil
}

// logOptions are the kubelet API's containerLogs query parameters.
type logOptions struct {
	follow     bool
	timestamps bool
	tailLines  int64 // <0: all
	since      time.Time
	limitBytes int64 // <=0: no limit
}

// errLimitReached stops output at limitBytes.
var errLimitReached = errors.New("limit reached")

type limitedWriter struct {
	w     io.Writer
	left  int64
	limit bool
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if !l.limit {
		return l.w.Write(p)
	}
	if l.left <= 0 {
		return 0, errLimitReached
	}
	if int64(len(p)) > l.left {
		n, err := l.w.Write(p[:l.left])
		l.left -= int64(n)
		if err == nil {
			err = errLimitReached
		}
		return n, err
	}
	n, err := l.w.Write(p)
	l.left -= int64(n)
	return n, err
}

// writeLogs renders the log file at path to w as `kubectl logs` expects. With
// follow it keeps reading until running() is false and the file is drained,
// or ctx ends; flush is called after each burst.
func writeLogs(ctx context.Context, w io.Writer, flush func(), path string, opts logOptions, running func() bool) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	defer f.Close()
	out := &limitedWriter{w: w, left: opts.limitBytes, limit: opts.limitBytes > 0}
	emit := func(e logEntry) error {
		if !opts.since.IsZero() && e.ts.Before(opts.since) {
			return nil
		}
		var buf []byte
		if opts.timestamps {
			buf = e.ts.AppendFormat(buf, time.RFC3339Nano)
			buf = append(buf, ' ')
		}
		buf = append(buf, e.content...)
		if !e.partial {
			buf = append(buf, '\n')
		}
		_, err := out.Write(buf)
		return err
	}

	br := bufio.NewReaderSize(f, 64<<10)
	var pending []byte // a line read without its newline yet
	readLines := func(fn func(logEntry) error) error {
		for {
			chunk, err := br.ReadBytes('\n')
			pending = append(pending, chunk...)
			if err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
			line := pending[:len(pending)-1]
			pending = nil
			e, perr := parseLogLine(line)
			if perr != nil {
				continue // a corrupt line is skipped, not fatal
			}
			if err := fn(e); err != nil {
				return err
			}
		}
	}

	if opts.tailLines >= 0 {
		var all []logEntry
		if err := readLines(func(e logEntry) error { all = append(all, e); return nil }); err != nil {
			return err
		}
		for _, e := range all[tailStart(all, opts.tailLines):] {
			if err := emit(e); err != nil {
				return ignoreLimit(err)
			}
		}
	} else if err := readLines(emit); err != nil {
		return ignoreLimit(err)
	}
	flush()
	if !opts.follow {
		return nil
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		// Check before reading, so the last lines written before the exit
		// are still read once more.
		live := running()
		if err := readLines(emit); err != nil {
			return ignoreLimit(err)
		}
		flush()
		if !live {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func ignoreLimit(err error) error {
	if errors.Is(err, errLimitReached) {
		return nil
	}
	return err
}

// tailStart is the index of the first entry of the last n lines, a line
// being a run of partial entries closed by a full one.
func tailStart(all []logEntry, n int64) int {
	if n <= 0 {
		return len(all)
	}
	var lines int64
	for i := len(all) - 1; i >= 0; i-- {
		if !all[i].partial || i == len(all)-1 {
			lines++
			if lines > n {
				return i + 1
			}
		}
	}
	return 0
}
