package cmd

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/meshlite/meshlite/meshctl/install"
)

// installFlags are the chart's inputs, as helm takes them.
type installFlags struct {
	values []string // -f files
	set    []string // --set
}

func (f *installFlags) add(c *cobra.Command) {
	c.Flags().StringArrayVarP(&f.values, "values", "f", nil, "a values YAML file for the chart (repeatable; later files win)")
	c.Flags().StringArrayVar(&f.set, "set", nil, "a chart value as helm --set takes it, e.g. ztunnel.tunnel=quic (repeatable)")
}

func (f *installFlags) options(o *Options, kubeVersion string) (install.Options, error) {
	opts := install.Options{Namespace: o.IstioNamespace, Set: f.set, KubeVersion: kubeVersion}
	for _, path := range f.values {
		b, err := os.ReadFile(path)
		if err != nil {
			return opts, fmt.Errorf("read values: %w", err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(b, &m); err != nil {
			return opts, fmt.Errorf("values file %s: %w", path, err)
		}
		opts.Values = mergeValues(opts.Values, m)
	}
	return opts, nil
}

// mergeValues deep-merges b over a, as helm merges -f files.
func mergeValues(a, b map[string]any) map[string]any {
	out := make(map[string]any, len(a)+len(b))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if bm, ok := v.(map[string]any); ok {
			if am, ok := out[k].(map[string]any); ok {
				out[k] = mergeValues(am, bm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

func newInstallCmd(o *Options) *cobra.Command {
	var f installFlags
	var dryRun bool
	c := &cobra.Command{
		Use:   "install [-f values.yaml] [--set key=value] [--dry-run]",
		Short: "Install meshlite (istiod-lite, the CNI agent, ztunnel) from its embedded Helm chart",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runInstall(cmd.Context(), o, f, dryRun)
		},
	}
	f.add(c)
	c.Flags().BoolVar(&dryRun, "dry-run", false, "let the API server check every object without creating any")
	return c
}

func runInstall(ctx context.Context, o *Options, f installFlags, dryRun bool) error {
	cl, err := o.connect(ctx)
	if err != nil {
		return err
	}
	kv := ""
	if sv, err := cl.Kube.Discovery().ServerVersion(); err == nil {
		kv = sv.GitVersion
	}
	opts, err := f.options(o, kv)
	if err != nil {
		return err
	}
	r, err := install.RenderChart(ctx, opts)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(o.Err, nil))
	ictx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if err := install.Apply(ictx, cl.Config, r.All(), install.ApplyOptions{DryRun: dryRun, Log: log}); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if dryRun {
		fmt.Fprintf(o.Out, "dry run: the API server accepts all %d objects; nothing was created\n", len(r.All()))
		return nil
	}
	fmt.Fprintf(o.Out, "meshlite installed in namespace %s (%d objects)\n", opts.Namespace, len(r.All()))
	if r.Notes != "" {
		fmt.Fprintln(o.Out, r.Notes)
	}
	return nil
}

func newUninstallCmd(o *Options) *cobra.Command {
	var f installFlags
	var opts install.UninstallOptions
	c := &cobra.Command{
		Use:   "uninstall [--delete-crds] [--delete-namespace]",
		Short: "Remove what meshctl install created",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			cl, err := o.connect(ctx)
			if err != nil {
				return err
			}
			io, err := f.options(o, "")
			if err != nil {
				return err
			}
			r, err := install.RenderChart(ctx, io)
			if err != nil {
				return err
			}
			// Uninstall skips the namespace and the CRDs unless opts ask.
			objs := r.All()
			opts.Log = slog.New(slog.NewTextHandler(o.Err, nil))
			uctx, cancel := context.WithTimeout(ctx, opts.Wait+time.Minute)
			defer cancel()
			if err := install.Uninstall(uctx, cl.Config, objs, opts); err != nil {
				return fmt.Errorf("uninstall: %w", err)
			}
			fmt.Fprintf(o.Out, "meshlite uninstalled from namespace %s\n", io.Namespace)
			return nil
		},
	}
	f.add(c)
	c.Flags().BoolVar(&opts.DeleteCRDs, "delete-crds", false, "also delete the CRDs (and every AuthorizationPolicy and PeerAuthentication)")
	c.Flags().BoolVar(&opts.DeleteNamespace, "delete-namespace", false, "also delete the namespace (and the mesh's root CA)")
	c.Flags().DurationVar(&opts.Wait, "wait", 2*time.Minute, "how long to wait for the mesh's pods to be gone (0: do not wait)")
	return c
}
