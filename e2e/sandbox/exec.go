package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// ExecIn runs argv inside the network namespace of pod ns/name (the host's
// filesystem and the caller's user; only the network is the pod's) with the
// given stdio, and waits for it. A non-zero exit is an *exec.ExitError.
func (s *Sandbox) ExecIn(ctx context.Context, ns, name string, argv []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(argv) == 0 {
		return fmt.Errorf("exec in pod %s/%s: no command", ns, name)
	}
	path, err := s.PodNetns(ctx, ns, name)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	if err := nsenter.DoPath(path, cmd.Start); err != nil {
		return fmt.Errorf("exec %q in pod %s/%s: %w", argv[0], ns, name, err)
	}
	return cmd.Wait()
}

// Exec runs argv in pod ns/name's network namespace and returns its
// combined output.
func (s *Sandbox) Exec(ctx context.Context, ns, name string, argv ...string) ([]byte, error) {
	var out bytes.Buffer
	err := s.ExecIn(ctx, ns, name, argv, nil, &out, &out)
	if err != nil {
		return out.Bytes(), fmt.Errorf("exec %v in pod %s/%s: %w: %s", argv, ns, name, err, out.Bytes())
	}
	return out.Bytes(), nil
}

// Logs copies pod ns/name's container log (through the apiserver and the
// kubelet API, as kubectl logs does) to w; follow streams until ctx ends
// or the container stops.
func (s *Sandbox) Logs(ctx context.Context, ns, name, container string, follow bool, w io.Writer) error {
	req := s.cs.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: container, Follow: follow})
	rc, err := req.Stream(ctx)
	if err != nil {
		return fmt.Errorf("logs of pod %s/%s: %w", ns, name, err)
	}
	defer rc.Close()
	if _, err := io.Copy(w, rc); err != nil && ctx.Err() == nil {
		return fmt.Errorf("logs of pod %s/%s: %w", ns, name, err)
	}
	return nil
}
