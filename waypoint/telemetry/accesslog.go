package telemetry

import (
	"context"
	"log/slog"
	"time"
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
