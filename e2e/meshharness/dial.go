package meshharness

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/meshlite/meshlite/e2e/echo"
	"github.com/meshlite/meshlite/internal/nsenter"
)

// NetnsDialer dials from inside one network namespace (a pod's or a
// node's), its path looked up once: a loop that dials many times pays for
// the lookup once.
type NetnsDialer struct{ path string }

// Dialer is the dialer of pod ns/name.
func (e *Env) Dialer(t testing.TB, ns, name string) NetnsDialer {
	t.Helper()
	p, err := e.Sandbox.PodNetns(e.Ctx, ns, name)
	if err != nil {
		t.Fatal(err)
	}
	return NetnsDialer{path: p}
}

// Dial connects to addr from inside the namespace.
func (d NetnsDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := nsenter.DoPath(d.path, func() error {
		var nd net.Dialer
		var err error
		c, err = nd.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Get sends GET url from inside the namespace on a new connection, within
// timeout, and returns the status and the echo server's answer.
func (d NetnsDialer) Get(ctx context.Context, url string, timeout time.Duration) (int, echo.Fields, error) {
	code, body, err := get(ctx, d.Dial, url, timeout)
	if err != nil {
		return code, nil, err
	}
	return code, echo.ParseFields(string(body)), nil
}

// HTTPGet sends GET url from inside pod ns/name's network namespace on a
// new connection, within 5 s, and returns the status and the echo server's
// answer. It looks the pod up on every call; a loop takes a Dialer.
func (e *Env) HTTPGet(ns, name, url string) (int, echo.Fields, error) {
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) {
		return e.Sandbox.Dial(ctx, ns, name, addr)
	}
	code, body, err := get(e.Ctx, dial, url, 5*time.Second)
	if err != nil {
		return code, nil, err
	}
	return code, echo.ParseFields(string(body)), nil
}

// MustGet is HTTPGet that fails the test unless the answer is 200.
func (e *Env) MustGet(t testing.TB, ns, name, url string) echo.Fields {
	t.Helper()
	code, f, err := e.HTTPGet(ns, name, url)
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET %s from %s/%s: status %d, %v", url, ns, name, code, err)
	}
	return f
}

// get sends GET url on a new connection that dial opens, within timeout,
// and returns the status and the body (status 0: no answer).
func get(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), url string, timeout time.Duration) (int, []byte, error) {
	tr := &http.Transport{DisableKeepAlives: true, DialContext: dial}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, body, fmt.Errorf("read answer of %s: %w", url, err)
	}
	return resp.StatusCode, body, nil
}
