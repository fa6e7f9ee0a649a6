package kubelet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/kubelet/pkg/cri/streaming/portforward"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// streamIdleTimeout closes exec and port-forward sessions idle this long,
// the kubelet's default.
const streamIdleTimeout = 4 * time.Hour

// startAPIServer serves the kubelet API on NodeIP:10250 until ctx ends.
func (k *Kubelet) startAPIServer(ctx context.Context) (*http.Server, error) {
	tlsCfg, err := apiServerTLS(k.cfg)
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort(k.cfg.NodeIP, strconv.Itoa(KubeletPort))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s for the kubelet API: %w", addr, err)
	}
	srv := &http.Server{
		Handler:           newAPIHandler(k.r, k.log),
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(k.log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			k.log.Error("kubelet API server stopped", "err", err)
		}
	}()
	k.log.Info("serving the kubelet API", "addr", addr)
	return srv, nil
}

// apiServerTLS is TLS 1.3 with the node's serving certificate; client
// certificates are verified against ClientCAFile when presented (the API
// server presents its kubelet-client certificate) and required for
// everything but /healthz.
func apiServerTLS(c *Config) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.ServingCert, c.ServingKey)
	if err != nil {
		return nil, fmt.Errorf("load kubelet serving certificate: %w", err)
	}
	caPEM, err := os.ReadFile(c.ClientCAFile)
	if err != nil {
		return nil, fmt.Errorf("read kubelet client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no certificates in client CA file %s", c.ClientCAFile)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    pool,
		// SPDY upgrades (exec, port-forward) need HTTP/1.1 connections.
		NextProtos: []string{"http/1.1"},
	}, nil
}

// apiHandler serves the kubelet API parts that kubectl logs, exec and
// port-forward reach through the API server.
type apiHandler struct {
	r   *runner
	log *slog.Logger
}

func newAPIHandler(r *runner, log *slog.Logger) http.Handler {
	h := &apiHandler{r: r, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	mux.Handle("GET /containerLogs/{ns}/{pod}/{container}", h.authn(h.containerLogs))
	mux.Handle("/exec/{ns}/{pod}/{container}", h.authn(h.exec))
	mux.Handle("/exec/{ns}/{pod}/{uid}/{container}", h.authn(h.exec))
	mux.Handle("/portForward/{ns}/{pod}", h.authn(h.portForward))
	mux.Handle("/portForward/{ns}/{pod}/{uid}", h.authn(h.portForward))
	mux.Handle("/attach/", h.authn(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "attach is not supported by the sandbox kubelet; use exec", http.StatusNotImplemented)
	}))
	return mux
}

// AdminGroup is the group a client certificate must carry to use the
// kubelet API. The API server's kubelet-client certificate has it, as in
// kubeadm clusters; node certificates (system:nodes) do not, so one node
// cannot exec into another's pods.
const AdminGroup = "system:masters"

// authn requires a verified client certificate of AdminGroup. (A kubelet
// asks the API server with a SubjectAccessReview; the sandbox's only caller
// is the API server itself, so a fixed rule does.)
func (h *apiHandler) authn(next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.TLS == nil || len(req.TLS.VerifiedChains) == 0 || len(req.TLS.VerifiedChains[0]) == 0 {
			h.log.Warn("kubelet API request without a client certificate", "path", req.URL.Path, "remote", req.RemoteAddr)
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		subj := req.TLS.VerifiedChains[0][0].Subject
		if !slices.Contains(subj.Organization, AdminGroup) {
			h.log.Warn("kubelet API request denied", "user", subj.CommonName, "groups", subj.Organization, "path", req.URL.Path, "remote", req.RemoteAddr)
			http.Error(w, fmt.Sprintf("Forbidden (user=%s, path=%s): needs group %s", subj.CommonName, req.URL.Path, AdminGroup), http.StatusForbidden)
			return
		}
		next(w, req)
	})
}

// findPod resolves {ns}/{pod}[/{uid}] or writes a 404.
func (h *apiHandler) findPod(w http.ResponseWriter, req *http.Request) *podRun {
	ns, name, uid := req.PathValue("ns"), req.PathValue("pod"), req.PathValue("uid")
	p := h.r.lookup(ns, name)
	if p == nil || (uid != "" && types.UID(uid) != p.uid) {
		http.Error(w, fmt.Sprintf("pod %s/%s not found on this node", ns, name), http.StatusNotFound)
		return nil
	}
	return p
}

func (h *apiHandler) findContainer(w http.ResponseWriter, req *http.Request, p *podRun) *container {
	name := req.PathValue("container")
	c := p.container(name)
	if c == nil {
		http.Error(w, fmt.Sprintf("container %q in pod %q is not available", name, req.PathValue("pod")), http.StatusNotFound)
	}
	return c
}

func (h *apiHandler) containerLogs(w http.ResponseWriter, req *http.Request) {
	p := h.findPod(w, req)
	if p == nil {
		return
	}
	c := h.findContainer(w, req, p)
	if c == nil {
		return
	}
	q := req.URL.Query()
	opts := logOptions{tailLines: -1}
	var err error
	parseBool := func(k string) bool { b, _ := strconv.ParseBool(q.Get(k)); return b }
	opts.follow = parseBool("follow")
	opts.timestamps = parseBool("timestamps")
	if v := q.Get("tailLines"); v != "" {
		if opts.tailLines, err = strconv.ParseInt(v, 10, 64); err != nil || opts.tailLines < 0 {
			http.Error(w, "tailLines must be a non-negative integer", http.StatusBadRequest)
			return
		}
	}
	if v := q.Get("limitBytes"); v != "" {
		if opts.limitBytes, err = strconv.ParseInt(v, 10, 64); err != nil || opts.limitBytes <= 0 {
			http.Error(w, "limitBytes must be a positive integer", http.StatusBadRequest)
			return
		}
	}
	if v := q.Get("sinceSeconds"); v != "" {
		secs, err := strconv.ParseInt(v, 10, 64)
		if err != nil || secs <= 0 {
			http.Error(w, "sinceSeconds must be a positive integer", http.StatusBadRequest)
			return
		}
		opts.since = time.Now().Add(-time.Duration(secs) * time.Second)
	}
	if v := q.Get("sinceTime"); v != "" {
		if opts.since, err = time.Parse(time.RFC3339, v); err != nil {
			http.Error(w, "sinceTime must be RFC 3339", http.StatusBadRequest)
			return
		}
	}

	p.mu.Lock()
	n := c.restartCount
	inst := c.inst
	waiting := c.state.Waiting
	p.mu.Unlock()
	if parseBool("previous") {
		n--
		if n < 0 {
			http.Error(w, fmt.Sprintf("previous terminated container %q in pod %q not found", c.spec.Name, p.currentPod().Name), http.StatusBadRequest)
			return
		}
		inst = nil
	}
	path := filepath.Join(p.dir, "logs", c.spec.Name, fmt.Sprintf("%d.log", n))
	if _, err := os.Stat(path); err != nil {
		reason := "ContainerCreating"
		if waiting != nil {
			reason = waiting.Reason
		}
		http.Error(w, fmt.Sprintf("container %q in pod %q is waiting to start: %s", c.spec.Name, p.currentPod().Name, reason), http.StatusBadRequest)
		return
	}
	running := func() bool {
		if inst == nil || inst.n != n {
			return false
		}
		select {
		case <-inst.logsDone:
			return false
		default:
			return true
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	if err := writeLogs(req.Context(), w, flush, path, opts, running); err != nil {
		h.log.Debug("serve container logs", "err", err)
	}
}

func (h *apiHandler) exec(w http.ResponseWriter, req *http.Request) {
	p := h.findPod(w, req)
	if p == nil {
		return
	}
	c := h.findContainer(w, req, p)
	if c == nil {
		return
	}
	streamOpts, err := remotecommandserver.NewOptions(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	cmd := req.URL.Query()["command"]
	pod := p.currentPod()
	h.log.Info("exec", "pod", pod.Namespace+"/"+pod.Name, "container", c.spec.Name, "command", cmd, "tty", streamOpts.TTY)
	remotecommandserver.ServeExec(w, req, &executor{r: h.r, p: p, c: c}, pod.Name+"_"+pod.Namespace, pod.UID, c.spec.Name, cmd,
		streamOpts, streamIdleTimeout, remotecommandconsts.DefaultStreamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
}

func (h *apiHandler) portForward(w http.ResponseWriter, req *http.Request) {
	p := h.findPod(w, req)
	if p == nil {
		return
	}
	opts, err := portforward.NewV4Options(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pod := p.currentPod()
	h.log.Info("port-forward", "pod", pod.Namespace+"/"+pod.Name)
	portforward.ServePortForward(w, req, &forwarder{r: h.r, p: p}, pod.Name+"_"+pod.Namespace, pod.UID, opts,
		streamIdleTimeout, remotecommandconsts.DefaultStreamCreationTimeout, portforward.SupportedProtocols)
}

// executor adapts the runner to the streaming server's Executor.
type executor struct {
	r *runner
	p *podRun
	c *container
}

func (e *executor) ExecInContainer(ctx context.Context, _ string, _ types.UID, _ string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, _ time.Duration) error {
	var stdout, stderr io.Writer
	if out != nil {
		stdout = out
	}
	if errw != nil {
		stderr = errw
	}
	code, err := e.r.execInContainer(ctx, e.p, e.c, cmd, in, stdout, stderr, tty, resize)
	if err != nil {
		return err
	}
	if code != 0 {
		return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
	}
	return nil
}

// forwarder adapts the runner to the streaming server's PortForwarder.
type forwarder struct {
	r *runner
	p *podRun
}

func (f *forwarder) PortForward(ctx context.Context, _ string, _ types.UID, port int32, stream io.ReadWriteCloser) error {
	return f.r.portForward(ctx, f.p, port, stream)
}
