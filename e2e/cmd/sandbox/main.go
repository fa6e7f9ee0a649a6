// Command sandbox is not written yet; issue #3 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "sandbox: not implemented")
	os.Exit(2)
}
