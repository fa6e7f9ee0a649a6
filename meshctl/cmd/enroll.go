package cmd

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/meshctl/cluster"
)

func newEnrollCmd(o *Options, enroll bool) *cobra.Command {
	use, short := "enroll NAMESPACE", "Enroll a namespace in the mesh (label "+kube.LabelDataplaneMode+"="+kube.DataplaneModeAmbient+")"
	if !enroll {
		use, short = "unenroll NAMESPACE", "Take a namespace out of the mesh (remove label "+kube.LabelDataplaneMode+")"
	}
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := o.connect(cmd.Context())
			if err != nil {
				return err
			}
			return setEnrollment(cmd.Context(), o, cl, args[0], enroll)
		},
	}
}

// setEnrollment labels (or unlabels) the namespace with a merge patch, so
// other labels and concurrent writers are left alone.
func setEnrollment(ctx context.Context, o *Options, cl *cluster.Clients, ns string, enroll bool) error {
	var value any // nil removes the label
	if enroll {
		value = kube.DataplaneModeAmbient
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{kube.LabelDataplaneMode: value}}})
	ctx, cancel := cl.Ctx(ctx)
	defer cancel()
	before, err := cl.Kube.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("namespace %s does not exist", ns)
	}
	if err != nil {
		return fmtAPIErr(cl, "get namespace "+ns, err)
	}
	was := before.Labels[kube.LabelDataplaneMode]
	if _, err := cl.Kube.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmtAPIErr(cl, "label namespace "+ns, err)
	}
	switch {
	case enroll && was == kube.DataplaneModeAmbient:
		fmt.Fprintf(o.Out, "namespace %s was enrolled already (%s=%s)\n", ns, kube.LabelDataplaneMode, kube.DataplaneModeAmbient)
	case enroll:
		fmt.Fprintf(o.Out, "namespace %s enrolled (%s=%s): its pods' traffic now goes through ztunnel over HBONE; check with: meshctl mtls status -n %s\n",
			ns, kube.LabelDataplaneMode, kube.DataplaneModeAmbient, ns)
	case was == "":
		fmt.Fprintf(o.Out, "namespace %s was not enrolled\n", ns)
	default:
		fmt.Fprintf(o.Out, "namespace %s unenrolled (label %s=%s removed): its pods' traffic no longer goes through ztunnel\n", ns, kube.LabelDataplaneMode, was)
	}
	return nil
}

func fmtAPIErr(cl *cluster.Clients, what string, err error) error {
	if _, ok := err.(apierrors.APIStatus); ok {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, cl.Unreachable(err))
}
