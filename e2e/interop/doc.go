// Package interop tests meshlite's HBONE implementation against Istio's
// (istio.io/istio/pkg/hbone), an implementation we did not write. It lives in a
// nested module so the main module does not pull in Istio's dependency tree.
package interop
