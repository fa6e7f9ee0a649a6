package kubelet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/tools/remotecommand"
)

// execInContainer runs cmd inside a running container (its net, UTS and
// mount namespaces, env and working dir) and returns its exit code. With tty
// the command gets a pseudo-terminal sized by resize. The command stops when
// ctx ends.
func (r *runner) execInContainer(ctx context.Context, p *podRun, c *container, cmd []string, stdin io.Reader, stdout, stderr io.Writer, tty bool, resize <-chan remotecommand.TerminalSize) (int, error) {
	if len(cmd) == 0 {
		return 0, errors.New("no command")
	}
	inst, err := c.runningInstance()
	if err != nil {
		return 0, err
	}
	argv, err := resolveArgv(c.spec.Image, cmd, nil, r.lookups)
	if err != nil {
		return 0, err
	}
	spec := &initSpec{Mode: "exec", TargetPID: inst.pid, Argv: argv, Env: inst.env, Dir: c.spec.WorkingDir}
	spec.UID, spec.GID, spec.Groups = runAs(p.currentPod(), &c.spec)
	proc, err := initCommand(r.initArgv, spec)
	if err != nil {
		return 0, err
	}

	var copies sync.WaitGroup
	var closeAfterStart []io.Closer
	var ptmx *os.File
	// ptyMu orders resizes before the close of the terminal.
	var ptyMu sync.Mutex
	ptyClosed := false
	if tty {
		m, s, err := pty.Open()
		if err != nil {
			return 0, fmt.Errorf("open pty: %w", err)
		}
		ptmx = m
		defer func() {
			ptyMu.Lock()
			ptyClosed = true
			m.Close()
			ptyMu.Unlock()
		}()
		proc.Stdin, proc.Stdout, proc.Stderr = s, s, s
		proc.SysProcAttr.Setsid = true
		proc.SysProcAttr.Setctty = true
		proc.SysProcAttr.Ctty = 0
		closeAfterStart = append(closeAfterStart, s)
	} else {
		proc.SysProcAttr.Setpgid = true
		if stdin != nil {
			inR, inW, err := os.Pipe()
			if err != nil {
				return 0, fmt.Errorf("create stdin pipe: %w", err)
			}
			proc.Stdin = inR
			closeAfterStart = append(closeAfterStart, inR)
			// Not waited for: it ends when the client closes stdin or the
			// stream goes away.
			go func() {
				_, _ = io.Copy(inW, stdin)
				inW.Close()
			}()
		}
		for _, o := range []struct {
			dst io.Writer
			set func(*os.File)
		}{
			{stdout, func(f *os.File) { proc.Stdout = f }},
			{stderr, func(f *os.File) { proc.Stderr = f }},
		} {
			if o.dst == nil {
				continue
			}
			pr, pw, err := os.Pipe()
			if err != nil {
				return 0, fmt.Errorf("create output pipe: %w", err)
			}
			o.set(pw)
			closeAfterStart = append(closeAfterStart, pw)
			copies.Add(1)
			go func() {
				defer copies.Done()
				defer pr.Close()
				_, _ = io.Copy(o.dst, pr)
			}()
		}
	}

	err = startInit(r.spawn, proc)
	for _, c := range closeAfterStart {
		c.Close()
	}
	if err != nil {
		copies.Wait()
		return 0, err
	}
	pid := proc.Process.Pid
	if tty {
		if stdin != nil {
			go func() { _, _ = io.Copy(ptmx, stdin) }()
		}
		if stdout != nil {
			copies.Add(1)
			go func() {
				defer copies.Done()
				// EIO when the last holder of the terminal exits: the end.
				_, _ = io.Copy(stdout, ptmx)
			}()
		}
		if resize != nil {
			go func() {
				for sz := range resize {
					ptyMu.Lock()
					if !ptyClosed {
						_ = pty.Setsize(ptmx, &pty.Winsize{Rows: sz.Height, Cols: sz.Width})
					}
					ptyMu.Unlock()
				}
			}()
		}
	}
	waited := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = unix.Kill(-pid, unix.SIGKILL)
		case <-waited:
		}
	}()
	_ = proc.Wait()
	close(waited)
	if !tty {
		// Descendants holding stdout open go with the command.
		_ = unix.Kill(-pid, unix.SIGKILL)
	}
	copies.Wait()
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	return int(exitCode(proc.ProcessState)), nil
}

// portForward copies between stream and a TCP connection to port on the
// pod's loopback, dialed from inside the pod's network namespace.
func (r *runner) portForward(ctx context.Context, p *podRun, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	p.mu.Lock()
	netns, ready := p.netns, p.sandboxReady
	p.mu.Unlock()
	if !ready {
		return errors.New("pod sandbox is not ready")
	}
	if port <= 0 || port > 65535 {
		return fmt.Errorf("invalid port %d", port)
	}
	ps := strconv.Itoa(int(port))
	var conn net.Conn
	var err error
	for _, addr := range []string{"127.0.0.1:" + ps, "[::1]:" + ps} {
		if conn, err = dialInNetns(ctx, netns, addr); err == nil {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("dial port %d in pod netns: %w", port, err)
	}
	defer conn.Close()
	go func() {
		_, err := io.Copy(conn, stream)
		if tc, ok := conn.(*net.TCPConn); ok && err == nil {
			// The client is done sending; the pod may still answer.
			_ = tc.CloseWrite()
			return
		}
		conn.Close() // the stream broke: unblock the copy below
	}()
	// The forward ends when the pod side closes (or fails); closing the
	// stream then tells the client.
	_, err = io.Copy(stream, conn)
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("port-forward %d: %w", port, err)
	}
	return nil
}
