// Command hello is the static binary the image tests pack and run.
package main

import (
	"fmt"
	"os"
)

func main() { fmt.Println("hello from", os.Args[0]) }
