// Command mesh-cni is not written yet; issue #5 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "mesh-cni: not implemented")
	os.Exit(2)
}
