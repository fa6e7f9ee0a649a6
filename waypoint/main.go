// Command waypoint is not written yet; issue #8 brings it.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "waypoint: not implemented")
	os.Exit(2)
}
