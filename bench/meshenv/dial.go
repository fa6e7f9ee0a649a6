package meshenv

import (
	"context"
	"net"

	"github.com/meshlite/meshlite/internal/nsenter"
)

var netDialer net.Dialer

// nsDialer dials from inside the network namespace at path.
func nsDialer(path string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := nsenter.DoPath(path, func() error {
			var err error
			c, err = netDialer.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// InNetns runs fn on a thread inside the network namespace at path (for a
// measuring loop that dials many times: one setns for all of them).
func InNetns(path string, fn func() error) error { return nsenter.DoPath(path, fn) }
