// Command meshctl is not written yet; issue #7 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "meshctl: not implemented")
	os.Exit(2)
}
