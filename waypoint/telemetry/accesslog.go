package telemetry

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// Access is one access log record.
type Access struct {
	Method, Authority, Path, Protocol string
	Status                            int
	Flags                             string
	Duration                          time.Duration
	BytesIn, BytesOut                 int64
	SourceAddr, SourcePrincipal       string
	DestService, Route, Upstream      string
	UpstreamPrincipal                 string
	Attempts                          int
	TraceID                           string
}

// AccessLogger writes access log records.
type AccessLogger interface {
	LogAccess(ctx context.Context, a *Access)
}

// SlogAccess writes the records through a slog logger (Info, message
// "access"), in whatever format its handler has.
func SlogAccess(l *slog.Logger) AccessLogger { return slogAccess{l} }

type slogAccess struct{ l *slog.Logger }

func (s slogAccess) LogAccess(ctx context.Context, a *Access) { LogAccess(ctx, s.l, a) }

// LogAccess writes the access log line (Info, message "access").
func LogAccess(ctx context.Context, log *slog.Logger, a *Access) {
	log.LogAttrs(ctx, slog.LevelInfo, "access",
		slog.String("method", a.Method), slog.String("authority", a.Authority), slog.String("path", a.Path),
		slog.String("protocol", a.Protocol), slog.Int("status", a.Status), slog.String("flags", orDash(a.Flags)),
		slog.Duration("duration", a.Duration), slog.Int64("bytes_in", a.BytesIn), slog.Int64("bytes_out", a.BytesOut),
		slog.String("src.addr", a.SourceAddr), slog.String("src.identity", a.SourcePrincipal),
		slog.String("dst.service", a.DestService), slog.String("route", a.Route), slog.String("upstream", a.Upstream),
		slog.String("upstream.identity", a.UpstreamPrincipal), slog.Int("attempts", a.Attempts), slog.String("trace_id", a.TraceID))
}

// JSONAccess writes each record as one JSON line with the fields and
// names slog's JSON handler gives LogAccess (time, level, msg, the fixed
// attrs, then the record; durations in nanoseconds), appended by hand:
// through slog it was about a tenth of the waypoint's CPU per request.
type JSONAccess struct {
	w      io.Writer
	level  slog.Leveler
	prefix []byte // `,"k":"v"` of the fixed attrs
}

// NewJSONAccess writes to w (one Write per line; w must take concurrent
// writes, as LogBuffer and os.Stderr do) when level allows Info
// (nil: always); attrs are added to every line (string values).
func NewJSONAccess(w io.Writer, level slog.Leveler, attrs ...string) *JSONAccess {
	j := &JSONAccess{w: w, level: level}
	for i := 0; i+1 < len(attrs); i += 2 {
		j.prefix = appendStrField(j.prefix, attrs[i], attrs[i+1])
	}
	return j
}

var lineBufs = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}

// LogAccess implements AccessLogger.
func (j *JSONAccess) LogAccess(_ context.Context, a *Access) {
	if j.level != nil && j.level.Level() > slog.LevelInfo {
		return
	}
	bp := lineBufs.Get().(*[]byte)
	b := (*bp)[:0]
	b = append(b, `{"time":"`...)
	b = time.Now().AppendFormat(b, "2006-01-02T15:04:05.000Z07:00")
	b = append(b, `","level":"INFO","msg":"access"`...)
	b = append(b, j.prefix...)
	b = appendStrField(b, "method", a.Method)
	b = appendStrField(b, "authority", a.Authority)
	b = appendStrField(b, "path", a.Path)
	b = appendStrField(b, "protocol", a.Protocol)
	b = appendIntField(b, "status", int64(a.Status))
	b = appendStrField(b, "flags", orDash(a.Flags))
	b = appendIntField(b, "duration", int64(a.Duration))
	b = appendIntField(b, "bytes_in", a.BytesIn)
	b = appendIntField(b, "bytes_out", a.BytesOut)
	b = appendStrField(b, "src.addr", a.SourceAddr)
	b = appendStrField(b, "src.identity", a.SourcePrincipal)
	b = appendStrField(b, "dst.service", a.DestService)
	b = appendStrField(b, "route", a.Route)
	b = appendStrField(b, "upstream", a.Upstream)
	b = appendStrField(b, "upstream.identity", a.UpstreamPrincipal)
	b = appendIntField(b, "attempts", int64(a.Attempts))
	b = appendStrField(b, "trace_id", a.TraceID)
	b = append(b, "}\n"...)
	_, _ = j.w.Write(b)
	if cap(b) <= 64<<10 { // a huge path does not pin its buffer
		*bp = b
		lineBufs.Put(bp)
	}
}

func appendStrField(b []byte, k, v string) []byte {
	b = append(b, ',')
	b = appendJSONString(b, k)
	b = append(b, ':')
	return appendJSONString(b, v)
}

func appendIntField(b []byte, k string, v int64) []byte {
	b = append(b, ',')
	b = appendJSONString(b, k)
	b = append(b, ':')
	return strconv.AppendInt(b, v, 10)
}

const hexDigits = "0123456789abcdef"

// appendJSONString quotes s as a JSON string: quotes, backslashes and
// control characters escaped, invalid UTF-8 replaced by U+FFFD (request
// paths and hosts come from clients).
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		// U+2028 and U+2029 are valid JSON but break JavaScript readers.
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
