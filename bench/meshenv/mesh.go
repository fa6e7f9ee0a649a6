package meshenv

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/meshlite/meshlite/e2e/meshinstall"
)

// Mesh installs the mesh from the Helm chart (deploy/helm/meshlite through
// e2e/meshinstall, as the e2e tests do: istiod-lite, the CNI agent
// capturing only MeshNS, ztunnel with ztunnel.tunnel=t), and starts the
// benchmark pods. The benchmarks choose ztunnel's flags, so a mesh someone
// else installed in the sandbox is an error rather than something to use.
func (e *Env) Mesh(ctx context.Context, t Tunnel) error {
	if e.tunnel != "" {
		return e.SetTunnel(ctx, t, false)
	}
	if have, err := meshinstall.Installed(ctx, e.SB); err != nil {
		return err
	} else if have {
		return fmt.Errorf("a mesh is installed in the sandbox already (make demo?): the benchmark installs its own; remove it first (make down)")
	}
	m, err := meshinstall.Install(ctx, e.SB, e.meshOptions(t))
	if err != nil {
		return fmt.Errorf("install the mesh from the chart: %w", err)
	}
	// Runs after the benchmark namespaces are gone (see Close), so their
	// pods are torn down with the CNI still in place; it checks that no
	// node still chains mesh-cni afterwards.
	e.onClose(m.Uninstall)
	e.mesh, e.tunnel = m, t
	return e.StartPods(ctx)
}

// meshOptions are the chart values of the benchmark's mesh with tunnel t.
func (e *Env) meshOptions(t Tunnel) meshinstall.Options {
	return meshinstall.Options{
		CaptureNamespaces: []string{MeshNS},
		Set:               []string{"ztunnel.tunnel=" + string(t)},
		Log:               e.Log,
	}
}

// SetTunnel makes ztunnel run with tunnel mode t: a different mode is a
// chart upgrade with ztunnel.tunnel=t (ztunnel rolls node by node, the new
// one beside the old, which hands the pods over and drains); fresh with
// the same mode restarts ztunnel the same way (for peak-memory figures
// that cover one measurement only). The enrolled pods stay.
func (e *Env) SetTunnel(ctx context.Context, t Tunnel, fresh bool) error {
	if e.tunnel == "" {
		return e.Mesh(ctx, t)
	}
	if e.tunnel == t && !fresh {
		return nil
	}
	start := time.Now()
	if e.tunnel != t {
		if err := e.mesh.Upgrade(ctx, e.meshOptions(t)); err != nil {
			return fmt.Errorf("upgrade ztunnel to --tunnel=%s: %w", t, err)
		}
		e.tunnel = t
	} else if err := e.mesh.Restart(ctx, "ztunnel"); err != nil {
		return err
	}
	if len(e.podIPs) > 0 {
		// Ready is not yet carrying: the new ztunnels take the pods over
		// from the old ones and fetch their certificates first.
		if err := e.waitTraffic(ctx); err != nil {
			return fmt.Errorf("ztunnel --tunnel=%s: %w", t, err)
		}
	}
	e.Log.Info("ztunnel ready", "tunnel", t, "fresh", fresh, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// Tunnel is the mode ztunnel runs with now ("" before Mesh).
func (e *Env) Tunnel() Tunnel { return e.tunnel }

// waitTraffic waits until a line sent from the enrolled client to the
// enrolled server's echo port (bin/echo, TCP 9090) comes back.
func (e *Env) waitTraffic(ctx context.Context) error {
	client, err := e.Netns(ctx, MeshNS, Client)
	if err != nil {
		return err
	}
	addr := net.JoinHostPort(e.PodIP(MeshNS, Server), "9090")
	var last error
	err = e.SB.WaitFor(ctx, time.Minute, "traffic from "+MeshNS+"/client to "+addr+" through the mesh", func(ctx context.Context) (bool, error) {
		last = roundTrip(ctx, client, addr)
		return last == nil, nil
	})
	if err != nil {
		return fmt.Errorf("%w (last: %v)", err, last)
	}
	return nil
}

func roundTrip(ctx context.Context, netns, addr string) error {
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := nsDialer(netns)(dctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "bench\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if line != "bench\n" {
		return fmt.Errorf("echoed %q", line)
	}
	return nil
}
