// Command istiod-lite is not written yet; issue #4 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "istiod-lite: not implemented")
	os.Exit(2)
}
