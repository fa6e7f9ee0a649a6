package measure

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// Wrk is wrk's summary: requests per second and the error counts it prints.
type Wrk struct {
	RequestsPerSec float64
	Requests       int64
	// Non2xx counts "Non-2xx or 3xx responses"; SocketErrors sums the
	// connect, read, write and timeout errors.
	Non2xx, SocketErrors int64
}

// ParseWrk reads wrk's text summary.
func ParseWrk(out []byte) (Wrk, error) {
	var w Wrk
	var haveRate bool
	s := bufio.NewScanner(bytes.NewReader(out))
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		switch {
		case strings.HasPrefix(line, "Requests/sec:"):
			v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, "Requests/sec:")), 64)
			if err != nil {
				return Wrk{}, fmt.Errorf("wrk Requests/sec: %w", err)
			}
			w.RequestsPerSec, haveRate = v, true
		case strings.Contains(line, " requests in "):
			if f := strings.Fields(line); len(f) > 0 {
				w.Requests, _ = strconv.ParseInt(f[0], 10, 64)
			}
		case strings.HasPrefix(line, "Non-2xx or 3xx responses:"):
			w.Non2xx, _ = strconv.ParseInt(strings.TrimSpace(strings.TrimPrefix(line, "Non-2xx or 3xx responses:")), 10, 64)
		case strings.HasPrefix(line, "Socket errors:"):
			// Socket errors: connect 0, read 12, write 0, timeout 3
			for _, part := range strings.Split(strings.TrimPrefix(line, "Socket errors:"), ",") {
				if f := strings.Fields(part); len(f) == 2 {
					n, _ := strconv.ParseInt(f[1], 10, 64)
					w.SocketErrors += n
				}
			}
		}
	}
	if !haveRate {
		return Wrk{}, fmt.Errorf("wrk printed no Requests/sec line: %q", firstLines(out, 5))
	}
	return w, nil
}

func firstLines(b []byte, n int) string {
	lines := strings.SplitN(string(b), "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, " | ")
}
