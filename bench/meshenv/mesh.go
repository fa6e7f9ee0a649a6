package meshenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/meshlite/meshlite/cni/install"
	"github.com/meshlite/meshlite/cni/plugin"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

// Mesh installs istiod-lite, the CNI agent (capturing only MeshNS) and
// ztunnel with the given tunnel mode from e2e/manifests, and starts the
// benchmark pods. The benchmarks choose ztunnel's flags, so a mesh someone
// else installed in the sandbox is an error rather than something to use.
func (e *Env) Mesh(ctx context.Context, t Tunnel) error {
	if e.tunnel != "" {
		return e.SetTunnel(ctx, t, false)
	}
	for _, d := range []string{"istiod", "ztunnel", "istio-cni-node"} {
		_, errD := e.SB.Client().AppsV1().Deployments(systemNS).Get(ctx, d, metav1.GetOptions{})
		_, errS := e.SB.Client().AppsV1().DaemonSets(systemNS).Get(ctx, d, metav1.GetOptions{})
		if errD == nil || errS == nil {
			return fmt.Errorf("%s/%s is installed in the sandbox already (make demo?): the benchmark installs its own mesh; remove it first (make down)", systemNS, d)
		}
	}
	istiod, err := e.readManifest("istiod-lite.yaml")
	if err != nil {
		return err
	}
	if err := e.apply(ctx, istiod, "app=istiod", 1); err != nil {
		return err
	}
	pods, err := e.SB.WaitPodsRunning(ctx, systemNS, "app=istiod", 1, time.Minute)
	if err != nil {
		return err
	}
	cni, err := e.readManifest("cni-agent.yaml",
		[2]string{"--host-root=" + sandbox.DefaultStateDir + "/", "--host-root=" + e.SB.Dir + "/"},
		[2]string{"- --log-level=info\n", "- --log-level=info\n        - --capture-namespaces=" + MeshNS + "\n"})
	if err != nil {
		return err
	}
	// Runs after the agent's removal (cleanups are last-in first-out).
	e.onClose(e.checkUnchained)
	if err := e.apply(ctx, cni, "app=istio-cni-node", e.SB.Plan.Nodes); err != nil {
		return err
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-xds", Namespace: systemNS},
		Data: map[string]string{"address": pods[0].Status.PodIP + ":15012"}}
	cms := e.SB.Client().CoreV1().ConfigMaps(systemNS)
	if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create ConfigMap ztunnel-xds: %w", err)
	}
	e.onClose(func(ctx context.Context) error {
		if err := cms.Delete(ctx, "ztunnel-xds", metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete ConfigMap ztunnel-xds: %w", err)
		}
		return nil
	})
	// ztunnel goes first on Close (cleanups run last-in first-out).
	e.onClose(func(ctx context.Context) error { return e.removeZtunnel(ctx) })
	if err := e.installZtunnel(ctx, t); err != nil {
		return err
	}
	return e.StartPods(ctx)
}

// SetTunnel makes ztunnel run with tunnel mode t, reinstalling it when the
// mode differs or fresh asks for new processes (for peak-memory figures
// that cover one measurement only). The enrolled pods stay; the CNI agent
// hands them to the new ztunnel.
func (e *Env) SetTunnel(ctx context.Context, t Tunnel, fresh bool) error {
	if e.tunnel == "" {
		return e.Mesh(ctx, t)
	}
	if e.tunnel == t && !fresh {
		return nil
	}
	if err := e.removeZtunnel(ctx); err != nil {
		return err
	}
	return e.installZtunnel(ctx, t)
}

// Tunnel is the mode ztunnel runs with now ("" before Mesh).
func (e *Env) Tunnel() Tunnel { return e.tunnel }

func (e *Env) installZtunnel(ctx context.Context, t Tunnel) error {
	objs, err := e.readManifest("ztunnel.yaml", [2]string{"--tunnel=h2", "--tunnel=" + string(t)})
	if err != nil {
		return err
	}
	if _, err := e.applier.Apply(ctx, objs...); err != nil {
		return fmt.Errorf("apply ztunnel.yaml: %w", err)
	}
	if _, err := e.SB.WaitPodsRunning(ctx, systemNS, "app=ztunnel", e.SB.Plan.Nodes, 2*time.Minute); err != nil {
		return err
	}
	e.tunnel = t
	if len(e.podIPs) > 0 {
		// Ready is not yet carrying: the new ztunnels take the pods over
		// from the CNI agent and fetch their certificates first.
		if err := e.waitTraffic(ctx); err != nil {
			return fmt.Errorf("ztunnel --tunnel=%s: %w", t, err)
		}
	}
	e.Log.Info("ztunnel ready", "tunnel", t)
	return nil
}

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

func (e *Env) removeZtunnel(ctx context.Context) error {
	if e.tunnel == "" {
		return nil
	}
	ds := e.SB.Client().AppsV1().DaemonSets(systemNS)
	if err := ds.Delete(ctx, "ztunnel", metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete ztunnel: %w", err)
	}
	if err := e.waitGone(ctx, "app=ztunnel"); err != nil {
		return err
	}
	e.tunnel = ""
	return nil
}

// apply applies a component's objects, waits for n pods matching selector
// and registers their removal (not the shared istio-system namespace).
func (e *Env) apply(ctx context.Context, objs []*unstructured.Unstructured, selector string, n int) error {
	var owned []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() != "Namespace" {
			owned = append(owned, o)
		}
	}
	e.onClose(func(ctx context.Context) error {
		var rev []*unstructured.Unstructured
		for _, o := range slices.Backward(owned) {
			rev = append(rev, o)
		}
		if err := e.applier.Delete(ctx, rev...); err != nil {
			return err
		}
		return e.waitGone(ctx, selector)
	})
	if _, err := e.applier.Apply(ctx, objs...); err != nil {
		return fmt.Errorf("apply %s: %w", selector, err)
	}
	if _, err := e.SB.WaitPodsRunning(ctx, systemNS, selector, n, 2*time.Minute); err != nil {
		return err
	}
	return nil
}

func (e *Env) waitGone(ctx context.Context, selector string) error {
	return e.SB.WaitFor(ctx, 90*time.Second, selector+" pods gone", func(ctx context.Context) (bool, error) {
		l, err := e.SB.Client().CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: selector})
		return err == nil && len(l.Items) == 0, nil
	})
}

// checkUnchained makes sure no node still chains mesh-cni once the agent
// is gone (a node that did would start no pod for the next user of the
// shared sandbox); it unchains such a node and says so.
func (e *Env) checkUnchained(context.Context) error {
	var errs []error
	for i := 0; i < e.SB.Plan.Nodes; i++ {
		conf := filepath.Join(e.SB.NodeRoot(i).CNIConfDir, netlab.ConflistName)
		b, err := os.ReadFile(conf)
		if err != nil {
			errs = append(errs, fmt.Errorf("node %d: %w", i, err))
			continue
		}
		if out, changed, err := install.Unchain(b, plugin.Type); err == nil && changed {
			errs = append(errs, fmt.Errorf("node %d still chained %s after the CNI agent was deleted; unchained it", i, plugin.Type))
			if err := os.WriteFile(conf, out, 0o644); err != nil {
				errs = append(errs, fmt.Errorf("node %d: %w", i, err))
			}
		}
	}
	return errors.Join(errs...)
}
