// Package fault decides fault injection for one request: a fixed delay and
// an abort with a status code, each for a share of requests. It only
// decides (with a random source the caller passes in); the proxy sleeps and
// answers.
package fault

import (
	"net/http"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
)

// Action is what to do to one request.
type Action struct {
	Delay time.Duration
	// AbortStatus is the HTTP status to answer with; 0 means no abort.
	AbortStatus int
	// GRPCStatus is the grpc-status for gRPC requests (derived from the
	// HTTP status when the policy sets none).
	GRPCStatus int
}

// Decide draws for f with rnd (uniform in [0,1)); delay and abort are drawn
// independently.
func Decide(f *l7.FaultInjection, rnd func() float64) Action {
	var a Action
	if f == nil {
		return a
	}
	if d := f.GetDelay(); d != nil && d.GetFixedDelay() != nil && hit(d.GetPercentage(), rnd) {
		if dur := d.GetFixedDelay().AsDuration(); dur > 0 {
			a.Delay = min(dur, time.Hour)
		}
	}
	if ab := f.GetAbort(); ab != nil && hit(ab.GetPercentage(), rnd) {
		st := int(ab.GetHttpStatus())
		if st < 200 || st > 599 {
			st = http.StatusServiceUnavailable
		}
		a.AbortStatus = st
		a.GRPCStatus = int(ab.GetGrpcStatus())
		if a.GRPCStatus == 0 {
			a.GRPCStatus = GRPCStatusFor(st)
		}
	}
	return a
}

func hit(pct float64, rnd func() float64) bool {
	if !(pct > 0) { // also NaN
		return false
	}
	return rnd()*100 < pct
}

// GRPCStatusFor maps an HTTP status to a gRPC code as gRPC's HTTP mapping does.
func GRPCStatusFor(status int) int {
	switch status {
	case http.StatusBadRequest:
		return 13 // INTERNAL
	case http.StatusUnauthorized:
		return 16 // UNAUTHENTICATED
	case http.StatusForbidden:
		return 7 // PERMISSION_DENIED
	case http.StatusNotFound:
		return 12 // UNIMPLEMENTED
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return 14 // UNAVAILABLE
	}
	return 2 // UNKNOWN
}
