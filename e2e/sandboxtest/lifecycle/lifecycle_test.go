// Package lifecycle tests `sandbox up` and `sandbox down` through the CLI,
// holding the sandbox exclusively (other test binaries wait).
package lifecycle

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/cluster/daemon"
	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

type cli struct {
	bin, stateDir string
}

func (c cli) run(t *testing.T, args ...string) (stdout string, took time.Duration, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(c.bin, append([]string{"--state-dir", c.stateDir}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err = cmd.Run()
	took = time.Since(start)
	if err != nil {
		err = fmt.Errorf("sandbox %s: %w\nstderr:\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), took, err
}

func prerequisites(t *testing.T) (repo string, c cli) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the sandbox tests need root")
	}
	repo, err := sandbox.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if missing := cluster.MissingBinaries(sandbox.KubeBinDir(repo)); len(missing) > 0 {
		t.Fatalf("kube binaries %v missing in %s: run hack/kube-bins.sh", missing, sandbox.KubeBinDir(repo))
	}
	bin := filepath.Join(repo, "bin", "sandbox")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s missing: run make build (go build -o bin/sandbox ./e2e/cmd/sandbox)", bin)
	}
	return repo, cli{bin: bin, stateDir: sandbox.StateDirFromEnv()}
}

// TestUpDown_WarmUpUnderAMinuteAndDownLeavesNothing drives the CLI: up
// (timed), a second up that must change nothing, a pod so that pod
// namespaces and processes exist, then down, which must leave no
// namespace, link, route, process, mount or state file behind; a second
// down is a no-op.
func TestUpDown_WarmUpUnderAMinuteAndDownLeavesNothing(t *testing.T) {
	_, c := prerequisites(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	release, err := sandbox.Exclusive(ctx, c.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer release()

	// A developer's kept sandbox comes back afterwards.
	if sb, err := sandbox.Open(c.stateDir, nil); err == nil && sb.State.Persistent && sb.Healthy(ctx) == nil {
		nodes := sb.State.Nodes
		t.Cleanup(func() {
			if _, _, err := c.run(t, "up", "--nodes", fmt.Sprint(nodes)); err != nil {
				t.Errorf("restore the developer's sandbox: %v", err)
			}
		})
	}
	if _, _, err := c.run(t, "down"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _, _ = c.run(t, "down") })

	out, upTook, err := c.run(t, "up", "--nodes", "2")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("warm `sandbox up` took %v", upTook.Round(time.Millisecond))
	if upTook > 60*time.Second {
		t.Errorf("sandbox up took %v, want under 60s", upTook)
	}
	kubeconfig := strings.TrimSpace(out)
	if want := filepath.Join(c.stateDir, "kubeconfig"); kubeconfig != want {
		t.Errorf("up printed %q, want the kubeconfig path %q", kubeconfig, want)
	}
	if got, _, err := c.run(t, "kubeconfig"); err != nil || strings.TrimSpace(got) != kubeconfig {
		t.Errorf("kubeconfig printed %q (%v), want %q", got, err, kubeconfig)
	}
	if _, _, err := c.run(t, "status"); err != nil {
		t.Errorf("status of a fresh sandbox: %v", err)
	}
	kubectl, err := exec.Command("kubectl", "--kubeconfig", kubeconfig, "get", "nodes", "-o", "name").CombinedOutput()
	if err != nil || strings.Count(string(kubectl), "node/") != 2 {
		t.Errorf("kubectl get nodes: %v\n%s", err, kubectl)
	}

	sb, err := sandbox.Open(c.stateDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Every daemon, recorded before the second up and before down.
	var pids []daemon.Proc
	pidFiles, _ := filepath.Glob(filepath.Join(sb.Layout.RunDir, "*.pid"))
	if len(pidFiles) != len(cluster.Components)+2 {
		t.Errorf("pid files %v, want the 4 control-plane components and 2 kubelets", pidFiles)
	}
	for _, pf := range pidFiles {
		p, err := daemon.ReadPidFile(pf)
		if err != nil || !p.Alive() {
			t.Fatalf("%s: %+v %v (not alive)", pf, p, err)
		}
		pids = append(pids, p)
	}

	// Kubelets run inside their node's namespace.
	for i := 0; i < 2; i++ {
		p, err := daemon.ReadPidFile(filepath.Join(sb.Layout.RunDir, "kubelet-"+sb.NodeName(i)+".pid"))
		if err != nil {
			t.Fatal(err)
		}
		want, err := netlab.NetnsInode(netlab.NetnsPath(sb.Plan.NodeNetns(i)))
		if err != nil {
			t.Fatal(err)
		}
		link, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", p.Pid))
		if link != fmt.Sprintf("net:[%d]", want) {
			t.Errorf("kubelet of %s is in %s, want net:[%d] (its node namespace)", sb.NodeName(i), link, want)
		}
	}

	// A second up is a no-op: quick, same processes.
	_, againTook, err := c.run(t, "up", "--nodes", "2")
	if err != nil {
		t.Fatal(err)
	}
	if againTook > 10*time.Second {
		t.Errorf("second up took %v; a healthy sandbox should be reused at once", againTook)
	}
	for _, p := range pids {
		if !p.Alive() {
			t.Errorf("pid %d died across the second up", p.Pid)
		}
	}
	if _, _, err := c.run(t, "up", "--nodes", "3"); err == nil {
		t.Error("up --nodes 3 over a running 2-node sandbox succeeded; want an error saying to run down")
	}

	// A pod, so down must also remove pod namespaces and processes.
	_, err = sb.Apply(ctx, `
apiVersion: v1
kind: Pod
metadata: {name: sleeper, namespace: default}
spec:
  containers:
  - {name: sleep, image: busybox, command: ["sleep", "3600"]}
`)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := sb.WaitPodsRunning(ctx, "default", "", 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	podNetns := netlab.NetnsPath(sb.PodNetnsName(string(pods[0].UID)))
	if _, err := os.Stat(podNetns); err != nil {
		t.Fatalf("pod netns: %v", err)
	}
	podIno, _ := netlab.NetnsInode(podNetns)
	podProcs, _ := netlab.ProcessesIn(map[uint64]bool{podIno: true})
	if len(podProcs) == 0 {
		t.Fatal("no process runs in the pod's namespace")
	}
	if _, err := sb.Client().CoreV1().Pods("default").Get(ctx, "sleeper", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}

	_, downTook, err := c.run(t, "down")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("`sandbox down` took %v", downTook.Round(time.Millisecond))

	left, err := sandbox.Leftovers(c.stateDir, sb.Plan.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("left behind by down:\n%s", strings.Join(left, "\n"))
	}
	for _, p := range pids {
		if p.Alive() {
			t.Errorf("daemon pid %d survives down", p.Pid)
		}
	}
	for _, pid := range podProcs {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			if p, err := daemon.Of(pid); err == nil && p.Alive() {
				t.Errorf("pod process %d survives down", pid)
			}
		}
	}
	if _, err := os.Stat(podNetns); err == nil {
		t.Errorf("pod netns %s survives down", podNetns)
	}
	// No host firewall rule mentions the sandbox's networks.
	if out, err := exec.Command("iptables-save").Output(); err == nil {
		for _, needle := range []string{"172.30.0.", "10.244.", "sandbox"} {
			if strings.Contains(string(out), needle) {
				t.Errorf("host iptables still mention %q", needle)
			}
		}
	}
	if _, _, err := c.run(t, "status"); err == nil {
		t.Error("status succeeds with no sandbox; want exit 1")
	}

	if _, again, err := c.run(t, "down"); err != nil || again > 5*time.Second {
		t.Errorf("second down: %v (took %v); want a quick no-op", err, again)
	}
}
