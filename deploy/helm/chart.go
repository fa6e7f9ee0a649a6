// Package helm holds meshlite's Helm chart (deploy/helm/meshlite) compiled
// into the binary, so meshctl can render and install it with no files on
// disk. It only embeds the chart; rendering and applying live in
// meshctl/install, and `helm` itself reads the directory.
package helm

import (
	"embed"
	"io/fs"
)

// ChartName is the chart's name and its directory under deploy/helm.
const ChartName = "meshlite"

// The all: prefix keeps files starting with "_" (templates/_helpers.tpl)
// and dotfiles (.helmignore).
//
//go:embed all:meshlite
var files embed.FS

// Chart returns the chart's files, rooted at the chart directory
// (Chart.yaml, values.yaml, templates/..., crds/...).
func Chart() fs.FS {
	sub, err := fs.Sub(files, ChartName)
	if err != nil {
		// fs.Sub fails only on an invalid path, and ChartName is a constant.
		panic(err)
	}
	return sub
}
