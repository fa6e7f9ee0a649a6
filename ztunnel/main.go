// Command ztunnel is not written yet; issue #6 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "ztunnel: not implemented")
	os.Exit(2)
}
