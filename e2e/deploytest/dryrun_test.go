package deploytest

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/meshlite/meshlite/e2e/sandbox"
	"github.com/meshlite/meshlite/meshctl/install"
)

// TestChart_ServerSideDryRunAccepted applies the chart, with its default
// values (two istiod-lite replicas, the PodDisruptionBudget, priority
// classes) and with custom ones, to the sandbox's kube-apiserver as a
// server-side dry run: every object passes admission and validation, and
// nothing is stored. An object the server would refuse makes it fail, so
// the dry run does check.
func TestChart_ServerSideDryRunAccepted(t *testing.T) {
	sb := sandbox.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "deploytest-dryrun"
	rc := sb.RESTConfig()

	objs, err := install.Render(ctx, install.Options{Namespace: ns})
	if err != nil {
		t.Fatal(err)
	}
	// The server cannot check objects in a namespace it does not have.
	err = install.Apply(ctx, rc, objs, install.ApplyOptions{DryRun: true})
	if err == nil || !strings.Contains(err.Error(), "namespace "+ns+" does not exist") {
		t.Fatalf("dry run into a missing namespace: %v", err)
	}

	nss := sb.Client().CoreV1().Namespaces()
	if _, err := nss.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := nss.Delete(context.Background(), ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete namespace %s: %v", ns, err)
		}
	})
	_, crErr := sb.Client().RbacV1().ClusterRoles().Get(ctx, "meshlite-cni-agent", metav1.GetOptions{})
	hadClusterRole := crErr == nil

	for _, tc := range []struct {
		name string
		opts install.Options
	}{
		{"defaults", install.Options{Namespace: ns}},
		{"custom", install.Options{Namespace: ns, Set: []string{
			"istiod.replicas=3", "ztunnel.tunnel=quic", "trustDomain=example.org", "cni.dnsCapture=false",
			"cni.privileged=true", "cni.hostPID=true", "ztunnel.xdsAddressConfigMap=ztunnel-xds",
			"cni.binDir=/home/kubernetes/bin", "istiod.nodeSelector.kubernetes\\.io/os=linux",
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := install.Render(ctx, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if err := install.Apply(ctx, rc, objs, install.ApplyOptions{DryRun: true, FieldManager: "deploytest"}); err != nil {
				t.Fatalf("server-side dry run: %v", err)
			}
			t.Logf("%d objects accepted", len(objs))
		})
	}

	// Nothing was stored.
	if _, err := sb.Client().AppsV1().DaemonSets(ns).Get(ctx, "ztunnel", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("DaemonSet %s/ztunnel after a dry run: %v", ns, err)
	}
	if _, err := sb.Client().AppsV1().Deployments(ns).Get(ctx, "istiod", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("Deployment %s/istiod after a dry run: %v", ns, err)
	}
	if _, err := sb.Client().RbacV1().ClusterRoles().Get(ctx, "meshlite-cni-agent", metav1.GetOptions{}); !hadClusterRole && !apierrors.IsNotFound(err) {
		t.Errorf("ClusterRole meshlite-cni-agent after a dry run: %v", err)
	}

	// The server really checks: a DaemonSet it must refuse.
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" && o.GetName() == "ztunnel" {
			bad := o.DeepCopy()
			if err := unstructured.SetNestedField(bad.Object, "Sometimes", "spec", "template", "spec", "restartPolicy"); err != nil {
				t.Fatal(err)
			}
			err := install.Apply(ctx, rc, []*unstructured.Unstructured{bad}, install.ApplyOptions{DryRun: true})
			if err == nil || !apierrors.IsInvalid(unwrapAll(err)) {
				t.Fatalf("dry run of an invalid DaemonSet: %v, want Invalid", err)
			}
		}
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok || u.Unwrap() == nil {
			return err
		}
		err = u.Unwrap()
	}
}
