// Command sandbox drives the e2e sandbox cluster: `up`, `down`, `status`,
// `kubeconfig`, `exec` and `logs` for people and scripts, and the node-side
// verbs the sandbox itself runs (`kubelet`, and kubelet-lite's re-exec
// `kubelet-init`).
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/cluster/daemon"
	"github.com/meshlite/meshlite/e2e/kubelet"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

func main() {
	// kubelet-lite re-executes this binary to become a container; that path
	// must not touch flags, signals or goroutines.
	if len(os.Args) > 1 && os.Args[1] == kubelet.InitVerb {
		if err := kubelet.InitMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "sandbox "+kubelet.InitVerb+":", err)
		}
		os.Exit(127)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := root().ExecuteContext(ctx)
	stop()
	var exit *exitCode
	if errors.As(err, &exit) {
		os.Exit(exit.code)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox:", err)
		os.Exit(1)
	}
}

// exitCode carries a command's exit status through cobra.
type exitCode struct{ code int }

func (e *exitCode) Error() string { return fmt.Sprintf("exit status %d", e.code) }

type globals struct {
	stateDir string
	verbose  bool
}

func (g *globals) logger() *slog.Logger {
	lvl := slog.LevelInfo
	if g.verbose {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

func root() *cobra.Command {
	g := &globals{}
	cmd := &cobra.Command{
		Use:           "sandbox",
		Short:         "A real Kubernetes cluster on one machine: network namespaces as nodes, no container engine",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.PersistentFlags().StringVar(&g.stateDir, "state-dir", sandbox.StateDirFromEnv(), "where the sandbox keeps its files ($MESHLITE_SANDBOX_DIR)")
	cmd.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "log each step")
	cmd.AddCommand(upCmd(g), downCmd(g), statusCmd(g), kubeconfigCmd(g), execCmd(g), logsCmd(g), kubeletCmd())
	return cmd
}

func upCmd(g *globals) *cobra.Command {
	var nodes int
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start the sandbox (a no-op when a healthy one runs)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			log := g.logger()
			self, err := os.Executable()
			if err != nil {
				return fmt.Errorf("find own binary: %w", err)
			}
			lock, err := sandbox.LockChanges(ctx, g.stateDir)
			if err != nil {
				return err
			}
			defer lock.Unlock()
			start := time.Now()
			sb, reused, err := sandbox.Up(ctx, sandbox.Options{
				StateDir:     g.stateDir,
				Nodes:        nodes,
				KubeletBin:   self,
				Persistent:   true,
				ReadyTimeout: timeout,
				Log:          log,
			})
			if err != nil {
				return err
			}
			if reused {
				fmt.Fprintf(os.Stderr, "sandbox already up (%d nodes)\n", sb.State.Nodes)
			} else {
				fmt.Fprintf(os.Stderr, "sandbox up: %d nodes in %v\n", sb.State.Nodes, time.Since(start).Round(10*time.Millisecond))
			}
			fmt.Println(sb.Kubeconfig())
			return nil
		},
	}
	cmd.Flags().IntVar(&nodes, "nodes", 2, "number of nodes")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "how long to wait for the nodes to be Ready")
	return cmd
}

func downCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove the sandbox and everything it made (a no-op when none runs)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			lock, err := sandbox.LockChanges(ctx, g.stateDir)
			if err != nil {
				return err
			}
			defer lock.Unlock()
			start := time.Now()
			if err := sandbox.Down(ctx, g.stateDir, g.logger()); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "sandbox down in %v\n", time.Since(start).Round(10*time.Millisecond))
			return nil
		},
	}
}

func statusCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the sandbox's processes and nodes; exit 1 unless it is healthy",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			sb, err := sandbox.Open(g.stateDir, g.logger())
			if errors.Is(err, os.ErrNotExist) {
				fmt.Printf("no sandbox in %s\n", g.stateDir)
				return &exitCode{1}
			}
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintf(w, "state\t%s\n", sb.Dir)
			fmt.Fprintf(w, "kubeconfig\t%s\n", sb.Kubeconfig())
			fmt.Fprintf(w, "started\t%s (up took %.1fs, persistent=%v)\n", sb.State.StartedAt.Format(time.RFC3339), sb.State.UpSeconds, sb.State.Persistent)
			for _, c := range cluster.Components {
				fmt.Fprintf(w, "%s\t%s\n", c, procState(sb.Layout.PidFile(c)))
			}
			for i := 0; i < sb.State.Nodes; i++ {
				fmt.Fprintf(w, "kubelet %s\t%s\n", sb.NodeName(i), procState(sb.Layout.RunDir+"/kubelet-"+sb.NodeName(i)+".pid"))
			}
			w.Flush()
			nodes, err := sb.Client().CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			if err == nil {
				w = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "\nNODE\tREADY\tINTERNAL-IP\tPOD-CIDR")
				for _, n := range nodes.Items {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", n.Name, readiness(&n), internalIP(&n), n.Spec.PodCIDR)
				}
				w.Flush()
			}
			if err := sb.Healthy(ctx); err != nil {
				fmt.Printf("\nunhealthy: %v\n", err)
				return &exitCode{1}
			}
			fmt.Println("\nhealthy")
			return nil
		},
	}
}

func procState(pidFile string) string {
	p, err := daemon.ReadPidFile(pidFile)
	if err != nil {
		return "not started"
	}
	if p.Alive() {
		return fmt.Sprintf("running (pid %d)", p.Pid)
	}
	return fmt.Sprintf("dead (pid %d)", p.Pid)
}

func readiness(n *corev1.Node) string {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return string(c.Status)
		}
	}
	return "Unknown"
}

func internalIP(n *corev1.Node) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	return ""
}

func kubeconfigCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "kubeconfig",
		Short: "Print the admin kubeconfig's path (kubectl --kubeconfig \"$(sandbox kubeconfig)\")",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l := cluster.LayoutOf(g.stateDir)
			if _, err := os.Stat(l.AdminKubeconfig); err != nil {
				return fmt.Errorf("no sandbox kubeconfig (run `sandbox up`): %w", err)
			}
			fmt.Println(l.AdminKubeconfig)
			return nil
		},
	}
}

func splitPod(arg string) (ns, name string, err error) {
	ns, name, ok := strings.Cut(arg, "/")
	if !ok {
		ns, name = "default", arg
	}
	if ns == "" || name == "" || strings.Contains(name, "/") {
		return "", "", fmt.Errorf("want <namespace>/<pod> or <pod>, got %q", arg)
	}
	return ns, name, nil
}

func execCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "exec <ns>/<pod> -- <cmd> [args...]",
		Short: "Run a command inside a pod's network namespace (host filesystem)",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dash := cmd.ArgsLenAtDash(); dash != 1 {
				return errors.New("usage: sandbox exec <ns>/<pod> -- <cmd> [args...]")
			}
			ns, name, err := splitPod(args[0])
			if err != nil {
				return err
			}
			sb, err := sandbox.Open(g.stateDir, g.logger())
			if err != nil {
				return err
			}
			err = sb.ExecIn(cmd.Context(), ns, name, args[1:], os.Stdin, os.Stdout, os.Stderr)
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return &exitCode{ee.ExitCode()}
			}
			return err
		},
	}
}

func logsCmd(g *globals) *cobra.Command {
	var container string
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs <ns>/<pod>",
		Short: "Print a pod's container log (through the kubelet API, as kubectl logs)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, name, err := splitPod(args[0])
			if err != nil {
				return err
			}
			sb, err := sandbox.Open(g.stateDir, g.logger())
			if err != nil {
				return err
			}
			return sb.Logs(cmd.Context(), ns, name, container, follow, os.Stdout)
		},
	}
	cmd.Flags().StringVarP(&container, "container", "c", "", "container name (the pod's only one by default)")
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "stream the log")
	return cmd
}

func kubeletCmd() *cobra.Command {
	var config string
	cmd := &cobra.Command{
		Use:   "kubelet --config <file>",
		Short: "Run kubelet-lite for one node (the sandbox starts it inside the node's namespace)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
			return kubelet.Main(cmd.Context(), config)
		},
	}
	cmd.Flags().StringVar(&config, "config", "", "kubelet-lite configuration (JSON)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}
