package cmd

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshlite/meshlite/meshctl/cluster"
	"github.com/meshlite/meshlite/meshctl/mtls"
	"github.com/meshlite/meshlite/meshctl/output"
	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

func newMTLSCmd(o *Options) *cobra.Command {
	c := &cobra.Command{Use: "mtls", Short: "mTLS state of the mesh's workloads"}
	var all bool
	var pod string
	status := &cobra.Command{
		Use:   "status [-n NAMESPACE | -A] [--pod NAME]",
		Short: "One verdict on mTLS: configured, enforced and observed, per pod",
		Long: `Show, for every running pod in scope: NAMESPACE, POD, ADDRESS, NODE, WAYPOINT,
PROTOCOL (how peers reach it in ztunnel's view: HBONE or TCP), MODE (the mTLS
mode enforced for an enrolled pod: STRICT or PERMISSIVE, from PeerAuthentications
and checked against the policies its ztunnel holds), REDIRECTION (verified by
its ztunnel, annotated by the CNI only, pending, missing or none), CERT (its
SPIFFE identity and expiry as its ztunnel holds it; EXPIRING below a quarter of
the lifetime or an hour, MISSING), and LIVE (its open connections by security,
both directions, from every ztunnel's connection table).

Exit status 1 when an enrolled pod has a plaintext connection open, lacks
redirection or a certificate, or cannot be checked (its ztunnel did not
answer); the summary line says why.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runMTLSStatus(cmd.Context(), o, all, pod)
		},
	}
	status.Flags().BoolVarP(&all, "all-namespaces", "A", false, "every namespace")
	status.Flags().StringVar(&pod, "pod", "", "only this pod (in the namespace -n gives)")
	c.AddCommand(status)
	return c
}

// mtlsInput gathers the verdict's input from the cluster: the scope's
// pods, every namespace and pod, PeerAuthentications and each ztunnel's
// dump. It fails only when the cluster cannot be read or meshlite is not
// installed; a silent ztunnel is part of the input.
func mtlsInput(ctx context.Context, o *Options, cl *cluster.Clients, scope string, pod string) (mtls.Input, []string, error) {
	var notes []string
	in := mtls.Input{Now: time.Now(), RootNamespace: o.IstioNamespace}
	zc := ztunnel.NewClient(cl.Config, cl.Kube, o.IstioNamespace)
	zc.Timeout = o.Timeout
	lctx, cancel := cl.Ctx(ctx)
	zpods, err := zc.Pods(lctx, "")
	cancel()
	if errors.Is(err, ztunnel.ErrNotInstalled) {
		return in, nil, notInstalled(ctx, o, cl, err)
	}
	if err != nil {
		return in, nil, err
	}
	istiod, err := cl.MeshPods(ctx, o.IstioNamespace, "istiod")
	if err != nil {
		return in, nil, err
	}
	if len(istiod) == 0 {
		notes = append(notes, fmt.Sprintf("istiod-lite is not running (no pod labelled app=istiod in %s): ztunnels keep the configuration they have", o.IstioNamespace))
	}
	if in.Namespaces, err = cl.Namespaces(ctx); err != nil {
		return in, nil, err
	}
	if in.AllPods, err = cl.Pods(ctx, ""); err != nil {
		return in, nil, err
	}
	hostNet := 0
	for _, p := range in.AllPods {
		if (scope == "" || p.Namespace == scope) && (pod == "" || p.Name == pod) {
			// Host-network pods (ztunnel, the CNI agent) share their
			// node's network: no mesh can capture them.
			if p.HostNetwork && pod == "" {
				hostNet++
				continue
			}
			in.Pods = append(in.Pods, p)
		}
	}
	if hostNet > 0 {
		notes = append(notes, fmt.Sprintf("%d host-network pod(s) not shown (they share their node's network; no mesh captures them)", hostNet))
	}
	if pod != "" && len(in.Pods) == 0 {
		return in, nil, fmt.Errorf("no running pod %s in namespace %s", pod, scope)
	}
	pas, installed, err := cl.PeerAuthentications(ctx)
	if err != nil {
		return in, nil, err
	}
	if !installed {
		notes = append(notes, "the PeerAuthentication CRD (security.istio.io/v1) is not installed: every pod is PERMISSIVE")
	}
	in.PeerAuthentications = pas
	for _, r := range zc.Dumps(ctx, zpods) {
		z := mtls.Ztunnel{Node: r.Pod.Node, Pod: r.Pod.Namespace + "/" + r.Pod.Name, Dump: r.Dump}
		if r.Err != nil {
			z.Err = r.Err.Error()
		}
		in.Ztunnels = append(in.Ztunnels, z)
	}
	return in, notes, nil
}

// notInstalled says what of meshlite is missing.
func notInstalled(ctx context.Context, o *Options, cl *cluster.Clients, zerr error) error {
	istiod, err := cl.MeshPods(ctx, o.IstioNamespace, "istiod")
	if err != nil {
		return err
	}
	if len(istiod) == 0 {
		return &ExitError{Code: 1, Err: fmt.Errorf("meshlite is not installed in this cluster: no istiod-lite and no ztunnel pods in namespace %s", o.IstioNamespace)}
	}
	return &ExitError{Code: 1, Err: fmt.Errorf("meshlite's data plane is not installed: istiod-lite runs but %v", zerr)}
}

func runMTLSStatus(ctx context.Context, o *Options, all bool, pod string) error {
	f, err := o.format()
	if err != nil {
		return err
	}
	if all && pod != "" {
		return errors.New("--pod needs a namespace (-n), not -A")
	}
	cl, err := o.connect(ctx)
	if err != nil {
		return err
	}
	scope := cl.Namespace
	if all {
		scope = ""
	}
	in, notes, err := mtlsInput(ctx, o, cl, scope, pod)
	if err != nil {
		return err
	}
	rep := mtls.Compute(in)
	rep.Summary.Notes = append(notes, rep.Summary.Notes...)
	if f == output.Table {
		if len(rep.Workloads) == 0 {
			fmt.Fprintf(o.Out, "No running pods in %s.\n", scopeName(scope))
		} else if err := output.WriteTable(o.Out, mtls.Headers, mtls.TableRows(rep)); err != nil {
			return err
		}
		fmt.Fprint(o.Out, "\n"+mtls.SummaryText(rep.Summary))
	} else {
		if err := output.WriteData(o.Out, f, rep); err != nil {
			return err
		}
		// Scripts read the data; a person at the terminal reads this.
		fmt.Fprintln(o.Err, rep.Summary.Line)
	}
	if !rep.Summary.OK {
		return &ExitError{Code: 1}
	}
	return nil
}

func scopeName(ns string) string {
	if ns == "" {
		return "any namespace"
	}
	return "namespace " + ns
}
