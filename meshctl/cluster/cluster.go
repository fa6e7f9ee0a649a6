// Package cluster connects meshctl to the Kubernetes API (from kubectl's
// kubeconfig, context and namespace flags) and gathers what the commands
// need: pods, namespaces, PeerAuthentications and the mesh's own pods. It
// turns transport failures into errors a person can act on ("cannot reach
// the Kubernetes API at ...", "meshlite is not installed"), and bounds
// every call with a timeout.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
)

// Clients are the API clients of one cluster.
type Clients struct {
	Config  *rest.Config
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
	Gateway gatewayclient.Interface
	// Namespace is the namespace from the flags or the kubeconfig context.
	Namespace string
	// NamespaceSet says -n/--namespace was given explicitly.
	NamespaceSet bool
	// Timeout bounds each remote call.
	Timeout time.Duration
}

// ErrUnreachable wraps every failure to talk to the API server.
var ErrUnreachable = errors.New("cannot reach the Kubernetes API")

// Connect loads the kubeconfig the flags name and checks the API server
// answers within timeout.
func Connect(ctx context.Context, flags *genericclioptions.ConfigFlags, timeout time.Duration) (*Clients, error) {
	cfg, err := flags.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w (set --kubeconfig or KUBECONFIG)", err)
	}
	cfg = rest.CopyConfig(cfg)
	if cfg.Timeout == 0 {
		cfg.Timeout = timeout
	}
	// meshctl reads pods and dumps of a whole cluster at once.
	cfg.QPS, cfg.Burst = 50, 100
	ns, explicit, err := flags.ToRawKubeConfigLoader().Namespace()
	if err != nil {
		return nil, fmt.Errorf("read the kubeconfig's namespace: %w", err)
	}
	if flags.Namespace != nil && *flags.Namespace != "" {
		explicit = true
	}
	c := &Clients{Config: cfg, Namespace: ns, NamespaceSet: explicit, Timeout: timeout}
	if c.Kube, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	if c.Dynamic, err = dynamic.NewForConfig(cfg); err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	if c.Gateway, err = gatewayclient.NewForConfig(cfg); err != nil {
		return nil, fmt.Errorf("gateway API client: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// Discovery's ServerVersion takes no context: probe with a request
	// that does.
	if err := c.Kube.CoreV1().RESTClient().Get().AbsPath("/version").Do(pctx).Error(); err != nil {
		return nil, c.Unreachable(err)
	}
	return c, nil
}

// Unreachable explains a failed API call: where meshctl tried to go and
// why it failed, without the transport's noise.
func (c *Clients) Unreachable(err error) error {
	host := c.Config.Host
	if u, perr := url.Parse(host); perr == nil && u.Host != "" {
		host = u.Host
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "connection refused"):
		msg = "connection refused (is the cluster running? `bin/sandbox up` starts the sandbox)"
	case strings.Contains(msg, "no such host"):
		msg = "no such host"
	case errors.Is(err, context.DeadlineExceeded) || strings.Contains(msg, "Client.Timeout") || strings.Contains(msg, "i/o timeout"):
		msg = fmt.Sprintf("no answer within %v", c.Timeout)
	}
	return fmt.Errorf("%w at %s: %s", ErrUnreachable, host, msg)
}

// Ctx is a context bounded by the call timeout.
func (c *Clients) Ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.Timeout)
}
