package cmd

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/meshctl/cluster"
	"github.com/meshlite/meshlite/meshctl/output"
)

// WaypointInfo is one waypoint as `waypoint list` shows it.
type WaypointInfo struct {
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	For        string `json:"for"`
	Programmed string `json:"programmed"`
	// Used says the namespace uses it (label istio.io/use-waypoint).
	UsedByNamespace bool `json:"used_by_namespace"`
}

func newWaypointCmd(o *Options) *cobra.Command {
	c := &cobra.Command{Use: "waypoint", Short: "Manage waypoint proxies (Gateway resources of class " + kube.WaypointGatewayClass + ")"}
	var name, forWhat string
	var enrollNS, all bool
	apply := &cobra.Command{
		Use:   "apply -n NAMESPACE [--name NAME] [--for service|workload|all] [--enroll-namespace]",
		Short: "Create or update a waypoint in a namespace",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch forWhat {
			case kube.WaypointForService, kube.WaypointForWorkload, kube.WaypointForAll, kube.WaypointForNone:
			default:
				return fmt.Errorf("--for %q: want service, workload, all or none", forWhat)
			}
			cl, err := o.connect(cmd.Context())
			if err != nil {
				return err
			}
			return waypointApply(cmd.Context(), o, cl, name, forWhat, enrollNS)
		},
	}
	apply.Flags().StringVar(&name, "name", kube.DefaultWaypointName, "the waypoint's name")
	apply.Flags().StringVar(&forWhat, "for", kube.WaypointForService, "traffic it handles: service, workload, all or none")
	apply.Flags().BoolVar(&enrollNS, "enroll-namespace", false, "make the namespace use it (label "+kube.LabelUseWaypoint+"=NAME)")
	list := &cobra.Command{
		Use:   "list [-n NAMESPACE | -A]",
		Short: "List waypoints",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := o.connect(cmd.Context())
			if err != nil {
				return err
			}
			return waypointList(cmd.Context(), o, cl, all)
		},
	}
	list.Flags().BoolVarP(&all, "all-namespaces", "A", false, "every namespace")
	var delName string
	del := &cobra.Command{
		Use:   "delete -n NAMESPACE [--name NAME | NAME...]",
		Short: "Delete waypoints (and the namespace's use of them)",
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := o.connect(cmd.Context())
			if err != nil {
				return err
			}
			if len(args) == 0 {
				args = []string{delName}
			}
			return waypointDelete(cmd.Context(), o, cl, args)
		},
	}
	del.Flags().StringVar(&delName, "name", kube.DefaultWaypointName, "the waypoint's name")
	c.AddCommand(apply, list, del)
	return c
}

// WaypointGateway is the Gateway a waypoint is: class istio-waypoint, one
// HBONE listener named mesh on 15008.
func WaypointGateway(ns, name, forWhat string) *gwv1.Gateway {
	return &gwv1.Gateway{
		TypeMeta: metav1.TypeMeta{APIVersion: gwv1.GroupVersion.String(), Kind: "Gateway"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
			Labels: map[string]string{kube.LabelWaypointFor: forWhat}},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: kube.WaypointGatewayClass,
			Listeners: []gwv1.Listener{{
				Name:     "mesh",
				Port:     15008,
				Protocol: "HBONE",
			}},
		},
	}
}

func gatewayErr(cl *cluster.Clients, what string, err error) error {
	if meta.IsNoMatchError(err) || (apierrors.IsNotFound(err) && strings.Contains(err.Error(), "the server could not find the requested resource")) {
		return fmt.Errorf("%s: the Gateway API CRDs (gateway.networking.k8s.io/v1) are not installed in this cluster", what)
	}
	return fmtAPIErr(cl, what, err)
}

func waypointApply(ctx context.Context, o *Options, cl *cluster.Clients, name, forWhat string, enrollNS bool) error {
	ns := cl.Namespace
	ctx, cancel := cl.Ctx(ctx)
	defer cancel()
	if _, err := cl.Kube.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("namespace %s does not exist", ns)
		}
		return fmtAPIErr(cl, "get namespace "+ns, err)
	}
	gws := cl.Gateway.GatewayV1().Gateways(ns)
	want := WaypointGateway(ns, name, forWhat)
	cur, err := gws.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err) && !strings.Contains(err.Error(), "the server could not find the requested resource"):
		if _, err := gws.Create(ctx, want, metav1.CreateOptions{}); err != nil {
			return gatewayErr(cl, "create waypoint "+ns+"/"+name, err)
		}
		fmt.Fprintf(o.Out, "waypoint %s/%s applied (for %s)\n", ns, name, forWhat)
	case err != nil:
		return gatewayErr(cl, "get waypoint "+ns+"/"+name, err)
	default:
		if cur.Spec.GatewayClassName != kube.WaypointGatewayClass {
			return fmt.Errorf("gateway %s/%s exists and is not a waypoint (class %s)", ns, name, cur.Spec.GatewayClassName)
		}
		cur.Spec = want.Spec
		if cur.Labels == nil {
			cur.Labels = map[string]string{}
		}
		cur.Labels[kube.LabelWaypointFor] = forWhat
		if _, err := gws.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return gatewayErr(cl, "update waypoint "+ns+"/"+name, err)
		}
		fmt.Fprintf(o.Out, "waypoint %s/%s updated (for %s)\n", ns, name, forWhat)
	}
	if enrollNS {
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{kube.LabelUseWaypoint: name}}})
		if _, err := cl.Kube.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			return fmtAPIErr(cl, "label namespace "+ns, err)
		}
		fmt.Fprintf(o.Out, "namespace %s labelled %s=%s\n", ns, kube.LabelUseWaypoint, name)
	}
	return nil
}

func waypointList(ctx context.Context, o *Options, cl *cluster.Clients, all bool) error {
	f, err := o.format()
	if err != nil {
		return err
	}
	ns := cl.Namespace
	if all {
		ns = ""
	}
	ctx, cancel := cl.Ctx(ctx)
	defer cancel()
	l, err := cl.Gateway.GatewayV1().Gateways(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return gatewayErr(cl, "list waypoints", err)
	}
	nsl, err := cl.Namespaces(ctx)
	if err != nil {
		return err
	}
	uses := map[string]string{}
	for _, n := range nsl {
		uses[n.Name] = n.Labels[kube.LabelUseWaypoint]
	}
	out := []WaypointInfo{}
	for _, g := range l.Items {
		if g.Spec.GatewayClassName != kube.WaypointGatewayClass {
			continue
		}
		w := WaypointInfo{Namespace: g.Namespace, Name: g.Name, For: g.Labels[kube.LabelWaypointFor], Programmed: "Unknown",
			UsedByNamespace: uses[g.Namespace] == g.Name}
		if w.For == "" {
			w.For = kube.WaypointForService
		}
		for _, c := range g.Status.Conditions {
			if c.Type == string(gwv1.GatewayConditionProgrammed) {
				w.Programmed = string(c.Status)
			}
		}
		out = append(out, w)
	}
	if f != output.Table {
		return output.WriteData(o.Out, f, out)
	}
	if len(out) == 0 {
		fmt.Fprintf(o.Out, "No waypoints in %s.\n", scopeName(ns))
		return nil
	}
	var rows [][]string
	for _, w := range out {
		used := "no"
		if w.UsedByNamespace {
			used = "yes"
		}
		rows = append(rows, []string{w.Namespace, w.Name, w.For, w.Programmed, used})
	}
	return output.WriteTable(o.Out, []string{"NAMESPACE", "NAME", "FOR", "PROGRAMMED", "NAMESPACE USES IT"}, rows)
}

func waypointDelete(ctx context.Context, o *Options, cl *cluster.Clients, names []string) error {
	ns := cl.Namespace
	ctx, cancel := cl.Ctx(ctx)
	defer cancel()
	nsObj, err := cl.Kube.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("namespace %s does not exist", ns)
		}
		return fmtAPIErr(cl, "get namespace "+ns, err)
	}
	for _, name := range names {
		g, err := cl.Gateway.GatewayV1().Gateways(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) && !strings.Contains(err.Error(), "the server could not find the requested resource") {
				return fmt.Errorf("no waypoint %s in namespace %s", name, ns)
			}
			return gatewayErr(cl, "get waypoint "+ns+"/"+name, err)
		}
		if g.Spec.GatewayClassName != kube.WaypointGatewayClass {
			return fmt.Errorf("gateway %s/%s is not a waypoint (class %s): not deleting it", ns, name, g.Spec.GatewayClassName)
		}
		if err := cl.Gateway.GatewayV1().Gateways(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return gatewayErr(cl, "delete waypoint "+ns+"/"+name, err)
		}
		fmt.Fprintf(o.Out, "waypoint %s/%s deleted\n", ns, name)
		if nsObj.Labels[kube.LabelUseWaypoint] == name {
			patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{kube.LabelUseWaypoint: nil}}})
			if _, err := cl.Kube.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
				return fmtAPIErr(cl, "unlabel namespace "+ns, err)
			}
			fmt.Fprintf(o.Out, "namespace %s no longer uses it (label %s removed)\n", ns, kube.LabelUseWaypoint)
		}
	}
	return nil
}
