package cmd

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/meshctl/output"
)

// VersionInfo is what `meshctl version` reports.
type VersionInfo struct {
	Client string `json:"client"`
	// Components are the mesh's, as the cluster runs them (empty when
	// not reachable or not installed).
	Components []ComponentVersion `json:"components,omitempty"`
	Kubernetes string             `json:"kubernetes,omitempty"`
	Error      string             `json:"error,omitempty"`
}

// ComponentVersion is one component's image(s) and readiness.
type ComponentVersion struct {
	Name   string `json:"name"`
	Kind   string `json:"kind"`
	Images string `json:"images"`
	Ready  string `json:"ready"`
}

// ClientVersion is the -ldflags version, else the module's, else the VCS
// revision Go stamped into the binary.
func ClientVersion(ldflags string) string {
	if ldflags != "" {
		return ldflags
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				modified = "-dirty"
			}
		}
	}
	if v != "" && v != "(devel)" {
		return v
	}
	if rev != "" {
		return "devel-" + rev[:min(12, len(rev))] + modified
	}
	return "devel"
}

func newVersionCmd(o *Options, version string) *cobra.Command {
	var clientOnly bool
	c := &cobra.Command{
		Use:   "version",
		Short: "meshctl's version and the mesh components' in the cluster",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := o.format()
			if err != nil {
				return err
			}
			v := VersionInfo{Client: ClientVersion(version)}
			var cerr error
			if !clientOnly {
				cerr = serverVersions(cmd.Context(), o, &v)
				if cerr != nil {
					v.Error = cerr.Error()
				}
			}
			if f == output.Table {
				fmt.Fprintf(o.Out, "meshctl: %s\n", v.Client)
				if v.Kubernetes != "" {
					fmt.Fprintf(o.Out, "kubernetes: %s\n", v.Kubernetes)
				}
				for _, c := range v.Components {
					fmt.Fprintf(o.Out, "%s (%s %s/%s): %s, %s ready\n", c.Name, c.Kind, o.IstioNamespace, c.Name, c.Images, c.Ready)
				}
				if !clientOnly && cerr == nil && len(v.Components) == 0 {
					fmt.Fprintf(o.Out, "meshlite: not installed (no istiod or ztunnel in %s)\n", o.IstioNamespace)
				}
			} else if err := output.WriteData(o.Out, f, v); err != nil {
				return err
			}
			return cerr
		},
	}
	c.Flags().BoolVar(&clientOnly, "client", false, "only the client's version")
	return c
}

func serverVersions(ctx context.Context, o *Options, v *VersionInfo) error {
	cl, err := o.connect(ctx)
	if err != nil {
		return err
	}
	if sv, err := cl.Kube.Discovery().ServerVersion(); err == nil {
		v.Kubernetes = sv.GitVersion
	}
	cctx, cancel := cl.Ctx(ctx)
	defer cancel()
	images := func(spec []string) string { return strings.Join(spec, ",") }
	if d, err := cl.Kube.AppsV1().Deployments(o.IstioNamespace).Get(cctx, "istiod", metav1.GetOptions{}); err == nil {
		var ims []string
		for _, c := range d.Spec.Template.Spec.Containers {
			ims = append(ims, c.Image)
		}
		v.Components = append(v.Components, ComponentVersion{Name: "istiod", Kind: "Deployment", Images: images(ims),
			Ready: fmt.Sprintf("%d/%d", d.Status.ReadyReplicas, d.Status.Replicas)})
	} else if !apierrors.IsNotFound(err) {
		return fmtAPIErr(cl, "get deployment istiod", err)
	}
	for _, name := range []string{"ztunnel", "istio-cni-node"} {
		ds, err := cl.Kube.AppsV1().DaemonSets(o.IstioNamespace).Get(cctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return fmtAPIErr(cl, "get daemonset "+name, err)
		}
		var ims []string
		for _, c := range ds.Spec.Template.Spec.Containers {
			ims = append(ims, c.Image)
		}
		v.Components = append(v.Components, ComponentVersion{Name: name, Kind: "DaemonSet", Images: images(ims),
			Ready: fmt.Sprintf("%d/%d", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)})
	}
	return nil
}
