// Package load drives the load generators of the data-plane benchmarks
// inside a pod's network namespace: fortio at a fixed rate (TCP echo or
// HTTP), wrk at full speed, and a connection-rate loop of our own. It
// returns parsed figures (package measure) and starts the servers they
// talk to.
package load

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlite/meshlite/bench/measure"
	"github.com/meshlite/meshlite/bench/meshenv"
)

// Fixed is a fixed-rate fortio run.
type Fixed struct {
	QPS         int
	Connections int
	Duration    time.Duration
	// PayloadBytes is the TCP echo payload (tcp:// targets only).
	PayloadBytes int
}

// Fortio runs `fortio load` from the namespace at netns against url
// (tcp://ip:port for the TCP echo, http://... for HTTP).
func Fortio(ctx context.Context, e *meshenv.Env, netns, url string, f Fixed) (measure.Fortio, error) {
	argv := []string{filepath.Join(e.Tools, "fortio"), "load", "-quiet", "-qps", fmt.Sprint(f.QPS), "-c", fmt.Sprint(f.Connections),
		"-t", f.Duration.String(), "-p", "50,90,99", "-json", "-"}
	if f.PayloadBytes > 0 {
		argv = append(argv, "-payload-size", fmt.Sprint(f.PayloadBytes))
	}
	argv = append(argv, url)
	rctx, cancel := context.WithTimeout(ctx, f.Duration+60*time.Second)
	defer cancel()
	out, err := e.Run(rctx, netns, argv...)
	r, perr := measure.ParseFortio(out)
	if perr != nil {
		if err != nil {
			return r, fmt.Errorf("%w (%v)", perr, err)
		}
		return r, perr
	}
	if r.Errors > 0 {
		return r, fmt.Errorf("fortio: %d of %d calls failed", r.Errors, r.Count)
	}
	return r, nil
}

// Wrk runs wrk (2 threads, conns connections) from netns against url for d.
func Wrk(ctx context.Context, e *meshenv.Env, netns, url string, conns int, d time.Duration) (measure.Wrk, error) {
	rctx, cancel := context.WithTimeout(ctx, d+60*time.Second)
	defer cancel()
	out, err := e.Run(rctx, netns, "wrk", "-t2", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", max(1, int(d.Seconds()))), url)
	r, perr := measure.ParseWrk(out)
	if perr != nil {
		if err != nil {
			return r, fmt.Errorf("%w (%v)", perr, err)
		}
		return r, perr
	}
	if r.Non2xx > 0 || r.SocketErrors > 0 {
		return r, fmt.Errorf("wrk: %d non-2xx answers and %d socket errors in %d requests", r.Non2xx, r.SocketErrors, r.Requests)
	}
	return r, nil
}

// StartEcho runs fortio's TCP echo server on port in the namespace at
// netns and waits until it accepts.
func StartEcho(ctx context.Context, e *meshenv.Env, netns string, port int) (*meshenv.Proc, error) {
	p, err := e.Start(netns, "fortio-tcp-echo", filepath.Join(e.Tools, "fortio"), "tcp-echo", "-tcp-port", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return nil, err
	}
	if err := e.WaitListening(ctx, netns, fmt.Sprintf("127.0.0.1:%d", port), p); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// ConnRate opens, uses once and closes TCP connections to an echo server
// at addr from netns, with workers in parallel for d, and returns new
// connections per second. Each connection sends one byte and reads its
// echo (so the far end really answered), then closes with RST (linger 0)
// so the client's ports do not pile up in TIME_WAIT.
func ConnRate(ctx context.Context, netns, addr string, workers int, d time.Duration) (float64, error) {
	var n atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := meshenv.InNetns(netns, func() error {
				var dl net.Dialer
				buf := []byte{'x'}
				for time.Now().Before(deadline) && ctx.Err() == nil {
					c, err := dl.DialContext(ctx, "tcp", addr)
					if err != nil {
						return fmt.Errorf("dial %s: %w", addr, err)
					}
					c.SetDeadline(time.Now().Add(5 * time.Second))
					_, err = c.Write(buf)
					if err == nil {
						_, err = io.ReadFull(c, buf)
					}
					c.(*net.TCPConn).SetLinger(0)
					c.Close()
					if err != nil {
						return fmt.Errorf("echo over a new connection to %s: %w", addr, err)
					}
					n.Add(1)
				}
				return nil
			})
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	return float64(n.Load()) / time.Since(start).Seconds(), nil
}
