// Command echo is the sandbox's sample app: `echo server` echoes HTTP/1.1,
// h2c and gRPC requests and raw TCP; `echo client URL` sends requests to
// one and exits non-zero unless all succeed. See package e2e/echo.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshlite/meshlite/e2e/echo"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "server":
		err = server(ctx, os.Args[2:])
	case "client":
		err = client(ctx, os.Args[2:])
	case "-h", "--help", "help":
		usage()
		return
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  echo server [--http-ports 8080] [--grpc-ports 7070] [--tcp-ports 9090] [--version v1]
  echo client [-n N] [-interval D] [-timeout D] [-H "Name: value"]... [-d body] [-X method]
              [-expect-status code] [-new-conn] (http|h2c)://host:port/path | grpc://host:port | tcp://host:port`)
}

// ports parses "8080,8081" ("" = none).
func ports(s string) ([]int, error) {
	var out []int
	for _, p := range strings.Split(s, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 65535 {
			return nil, fmt.Errorf("bad port %q", p)
		}
		out = append(out, n)
	}
	return out, nil
}

func server(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("echo server", flag.ContinueOnError)
	httpPorts := fs.String("http-ports", "8080", "comma-separated ports for HTTP/1.1, h2c and gRPC")
	grpcPorts := fs.String("grpc-ports", "7070", "comma-separated ports for gRPC only")
	tcpPorts := fs.String("tcp-ports", "9090", "comma-separated ports for raw TCP echo")
	host := fs.String("host", "", "address to bind (default all)")
	version := fs.String("version", os.Getenv("SERVICE_VERSION"), "version to report (default $SERVICE_VERSION)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg := echo.ServerConfig{Host: *host, Identity: echo.IdentityFromEnv(), Log: slog.Default()}
	cfg.Identity.Version = *version
	var err error
	if cfg.HTTPPorts, err = ports(*httpPorts); err != nil {
		return err
	}
	if cfg.GRPCPorts, err = ports(*grpcPorts); err != nil {
		return err
	}
	if cfg.TCPPorts, err = ports(*tcpPorts); err != nil {
		return err
	}
	s, err := echo.NewServer(cfg)
	if err != nil {
		return err
	}
	return s.Run(ctx)
}

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

func client(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("echo client", flag.ContinueOnError)
	var cfg echo.ClientConfig
	var headers headerList
	fs.IntVar(&cfg.Count, "n", 1, "number of requests")
	fs.DurationVar(&cfg.Interval, "interval", 0, "pause between requests")
	fs.DurationVar(&cfg.Timeout, "timeout", 5*time.Second, "timeout of each request")
	fs.Var(&headers, "H", `request header "Name: value" (repeatable)`)
	fs.StringVar(&cfg.Body, "d", "", "HTTP body, or the tcp/grpc message (default hello)")
	fs.StringVar(&cfg.Method, "X", "", "HTTP method")
	fs.IntVar(&cfg.ExpectStatus, "expect-status", 0, "HTTP status that counts as success (default any 2xx)")
	fs.BoolVar(&cfg.NewConnPerRequest, "new-conn", false, "a new connection for each request")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		usage()
		return errors.New("client needs exactly one URL")
	}
	cfg.URL = fs.Arg(0)
	cfg.Headers = headers
	cfg.Out = os.Stdout
	_, err := echo.RunClient(ctx, cfg)
	return err
}
