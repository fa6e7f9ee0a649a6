// Package cmd holds meshctl's cobra commands: flag parsing, calling the
// gathering and verdict packages, and printing. It owns the exit status
// (ExitError) but no mesh logic.
package cmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericclioptions"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/meshctl/cluster"
	"github.com/meshlite/meshlite/meshctl/output"
)

// ExitError ends meshctl with Code after printing Err (when not nil; the
// command may have said everything already).
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// ExitCode is the status meshctl exits with for err.
func ExitCode(err error) int {
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	return 1
}

// Options are the flags every command shares.
type Options struct {
	Config *genericclioptions.ConfigFlags
	// Output is -o: table, json or yaml.
	Output string
	// IstioNamespace holds the mesh's components and root policies.
	IstioNamespace string
	// Timeout bounds each remote call.
	Timeout  time.Duration
	Out, Err io.Writer
}

func (o *Options) format() (output.Format, error) { return output.ParseFormat(o.Output) }

// connect reaches the cluster.
func (o *Options) connect(ctx context.Context) (*cluster.Clients, error) {
	return cluster.Connect(ctx, o.Config, o.Timeout)
}

// NewRoot builds the meshctl command tree; version is the client's.
func NewRoot(out, errOut io.Writer, version string) *cobra.Command {
	o := &Options{Config: genericclioptions.NewConfigFlags(true), Out: out, Err: errOut}
	root := &cobra.Command{
		Use:   "meshctl",
		Short: "meshctl operates the meshlite ambient mesh: enroll namespaces, inspect ztunnels, check mTLS",
		Long: `meshctl operates the meshlite ambient mesh.

Its headline is 'meshctl mtls status': for every pod, whether it is in the
mesh, how peers reach it (HBONE or TCP), the mTLS mode ztunnel enforces,
whether its traffic is really redirected into ztunnel, its certificate and
its live connections by security, with an exit status you can script on.

It talks to the cluster the kubeconfig names (--kubeconfig, --context, -n as
kubectl takes them) and reaches each node's ztunnel admin endpoint through
the Kubernetes API's port-forward, so it works from outside the cluster.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	root.SetErr(errOut)
	fs := root.PersistentFlags()
	o.Config.AddFlags(fs)
	fs.StringVarP(&o.Output, "output", "o", "table", "output format: table, json or yaml")
	fs.StringVar(&o.IstioNamespace, "istio-namespace", kube.DefaultRootNamespace, "namespace of the mesh's components (istiod-lite, ztunnel) and of mesh-wide policies")
	fs.DurationVar(&o.Timeout, "timeout", 10*time.Second, "limit for each call to the API server or a ztunnel")
	root.AddCommand(newMTLSCmd(o), newEnrollCmd(o, true), newEnrollCmd(o, false), newZtunnelConfigCmd(o),
		newWaypointCmd(o), newVersionCmd(o, version), newInstallCmd(o), newUninstallCmd(o))
	return root
}
