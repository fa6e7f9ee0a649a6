// Command mkimages packs meshlite's static binaries into one OCI image
// layout tarball per component (deploy/images.Components), with no
// container engine. hack/images.sh builds the binaries and runs it:
//
//	mkimages -bin out/images/bin -out out/images -registry ghcr.io/meshlite -tag 0.1.0
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshlite/meshlite/deploy/images"
)

func main() {
	var (
		binDir   = flag.String("bin", "out/images/bin", "directory of the static binaries")
		outDir   = flag.String("out", "out/images", "directory for the <name>.oci.tar files")
		registry = flag.String("registry", "ghcr.io/meshlite", "registry and path the images are named under")
		tag      = flag.String("tag", "dev", "image tag")
		arch     = flag.String("arch", "", "GOARCH of the binaries (default this machine's)")
		only     = flag.String("only", "", "comma-separated image names to build (default all)")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	created := time.Unix(0, 0)
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			log.Error("SOURCE_DATE_EPOCH is not a number of seconds", "value", s)
			os.Exit(2)
		}
		created = time.Unix(sec, 0)
	}
	want := map[string]bool{}
	for _, n := range strings.Split(*only, ",") {
		if n != "" {
			want[n] = true
		}
	}
	if err := os.MkdirAll(*outDir, 0o755); err != nil {
		log.Error("create output directory", "err", err)
		os.Exit(1)
	}
	opts := images.Options{BinDir: *binDir, Arch: *arch, Created: created, Version: *tag}
	built := 0
	for _, s := range images.Components {
		if len(want) > 0 && !want[s.Name] {
			continue
		}
		img, err := images.Build(s, opts)
		if err != nil {
			log.Error("build image", "image", s.Name, "err", err)
			os.Exit(1)
		}
		ref := images.RefName(*registry, s.Name, *tag)
		dst := filepath.Join(*outDir, s.Name+".oci.tar")
		if err := images.WriteLayoutTar(dst, ref, img); err != nil {
			log.Error("write image", "image", s.Name, "err", err)
			os.Exit(1)
		}
		d, _ := img.Digest()
		fi, _ := os.Stat(dst)
		fmt.Printf("%-12s %s  %s  %.1f MiB  %s\n", s.Name, ref, d, float64(fi.Size())/(1<<20), dst)
		built++
	}
	if built == 0 {
		log.Error("no image matched -only", "only", *only)
		os.Exit(2)
	}
}
