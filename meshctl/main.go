// Command meshctl is meshlite's CLI: enroll namespaces, inspect each
// node's ztunnel, manage waypoints and check mTLS with one verdict. It
// only wires the cobra commands of package cmd.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/meshlite/meshlite/meshctl/cmd"
)

// version is set with -ldflags "-X main.version=...".
var version string

func main() {
	// client-go reports port-forward hiccups through klog; meshctl says
	// what failed itself, once, without a stack of transport noise.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := cmd.NewRoot(os.Stdout, os.Stderr, version).ExecuteContext(ctx)
	stop()
	if err != nil {
		if msg := err.Error(); !isSilent(err) {
			fmt.Fprintln(os.Stderr, "meshctl:", msg)
		}
		os.Exit(cmd.ExitCode(err))
	}
}

func isSilent(err error) bool {
	ee, ok := err.(*cmd.ExitError)
	return ok && ee.Err == nil
}
