package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// AdminPort is where ztunnel's admin interface listens (on localhost).
const AdminPort = 15000

// Selector finds the ztunnel pods (the DaemonSet's pod label).
const Selector = "app=ztunnel"

// ErrNotInstalled says no ztunnel runs in the cluster.
var ErrNotInstalled = errors.New("no ztunnel pods")

// Pod is one ztunnel: the pod and the node it serves.
type Pod struct {
	Namespace, Name, Node string
}

// Result is what one ztunnel answered: a dump or the error that stopped
// it.
type Result struct {
	Pod  Pod
	Dump *ConfigDump
	Err  error
}

// Client reaches ztunnels through the API server.
type Client struct {
	cfg       *rest.Config
	cs        kubernetes.Interface
	namespace string
	// Timeout bounds each ztunnel's port-forward and request.
	Timeout time.Duration
}

// NewClient returns a client for the ztunnels in namespace.
func NewClient(cfg *rest.Config, cs kubernetes.Interface, namespace string) *Client {
	return &Client{cfg: cfg, cs: cs, namespace: namespace, Timeout: 10 * time.Second}
}

// Pods lists the running ztunnel pods, one per node, sorted by node; node
// != "" keeps that node's only. It returns ErrNotInstalled (wrapped) when
// there are none.
func (c *Client) Pods(ctx context.Context, node string) ([]Pod, error) {
	opts := metav1.ListOptions{LabelSelector: Selector}
	if node != "" {
		opts.FieldSelector = "spec.nodeName=" + node
	}
	l, err := c.cs.CoreV1().Pods(c.namespace).List(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("list ztunnel pods in %s: %w", c.namespace, err)
	}
	var out []Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning {
			continue
		}
		out = append(out, Pod{Namespace: p.Namespace, Name: p.Name, Node: p.Spec.NodeName})
	}
	if len(out) == 0 {
		where := "namespace " + c.namespace
		if node != "" {
			where += " on node " + node
		}
		return nil, fmt.Errorf("%w running in %s (label %s)", ErrNotInstalled, where, Selector)
	}
	slices.SortFunc(out, func(a, b Pod) int { return strings.Compare(a.Node, b.Node) })
	return out, nil
}

// Dumps fetches /config_dump from every pod at once; each result carries
// its own error, so one silent ztunnel does not hide the others.
func (c *Client) Dumps(ctx context.Context, pods []Pod) []Result {
	out := make([]Result, len(pods))
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i].Pod = p
			b, err := c.Get(ctx, p, "/config_dump")
			if err != nil {
				out[i].Err = err
				return
			}
			d, err := Decode(b)
			if err != nil {
				out[i].Err = fmt.Errorf("decode /config_dump of ztunnel %s/%s: %w", p.Namespace, p.Name, err)
				return
			}
			out[i].Dump = d
		}()
	}
	wg.Wait()
	return out
}

// Get port-forwards to pod's admin port and GETs path, within c.Timeout.
func (c *Client) Get(ctx context.Context, pod Pod, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	fail := func(what string, err error) error {
		return fmt.Errorf("ztunnel %s/%s on node %s: %s: %w", pod.Namespace, pod.Name, pod.Node, what, err)
	}
	dialer, err := c.dialer(pod)
	if err != nil {
		return nil, fail("port-forward", err)
	}
	stop, ready := make(chan struct{}), make(chan struct{})
	errOut := &lockedWriter{}
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", AdminPort)},
		stop, ready, io.Discard, errOut)
	if err != nil {
		return nil, fail("port-forward", err)
	}
	fwErr := make(chan error, 1)
	go func() { fwErr <- fw.ForwardPorts() }()
	defer func() {
		close(stop)
		<-fwErr
	}()
	select {
	case <-ready:
	case err := <-fwErr:
		fwErr <- err // for the deferred receive
		return nil, fail("port-forward", err)
	case <-ctx.Done():
		return nil, fail("port-forward", fmt.Errorf("not ready after %v", c.Timeout))
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		return nil, fail("port-forward", fmt.Errorf("no local port: %v", err))
	}
	url := fmt.Sprintf("http://127.0.0.1:%d%s", ports[0].Local, path)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fail("GET "+path, err)
	}
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		if msg := strings.TrimSpace(errOut.String()); msg != "" {
			err = fmt.Errorf("%w (%s)", err, firstLine(msg))
		}
		return nil, fail(fmt.Sprintf("GET localhost:%d%s", AdminPort, path), err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fail("read "+path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fail("GET "+path, fmt.Errorf("%s: %s", resp.Status, firstLine(string(b))))
	}
	return b, nil
}

// dialer speaks websockets to the API server and falls back to SPDY, as
// kubectl port-forward does.
func (c *Client) dialer(pod Pod) (httpstream.Dialer, error) {
	u := c.cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).
		SubResource("portforward").URL()
	rt, upgrader, err := spdy.RoundTripperFor(c.cfg)
	if err != nil {
		return nil, err
	}
	spdyDialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	ws, err := portforward.NewSPDYOverWebsocketDialer(u, c.cfg)
	if err != nil {
		return nil, err
	}
	return portforward.NewFallbackDialer(ws, spdyDialer, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	}), nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

// lockedWriter lets the forwarder's goroutines write errors safely.
type lockedWriter struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
