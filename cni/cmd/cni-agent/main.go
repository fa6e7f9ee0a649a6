// Command cni-agent is not written yet; issue #5 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "cni-agent: not implemented")
	os.Exit(2)
}
