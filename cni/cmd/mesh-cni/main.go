// Command mesh-cni is meshlite's chained CNI plugin; the runtime runs it
// from the node's CNI bin dir (package plugin does the work).
package main

import "github.com/meshlite/meshlite/cni/plugin"

func main() { plugin.Main() }
