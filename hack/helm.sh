#!/usr/bin/env bash
# The helm CLI, built from its Go module at the version go.mod pins for
# meshctl's rendering (so `helm` and `meshctl install` render alike), cached
# as .cache/tools/bin/helm. Used by `make lint` for `helm lint`.
#
# Usage: hack/helm.sh                 install if missing, print its path
#        hack/helm.sh lint            helm lint --strict the chart
#        hack/helm.sh <helm args...>  run helm
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="$(go list -m -f '{{.Version}}' helm.sh/helm/v3)"
bin="$root/.cache/tools/bin/helm"
stamp="$root/.cache/tools/bin/.helm.version"

if [[ ! -x "$bin" || "$(cat "$stamp" 2>/dev/null)" != "$version" ]]; then
	echo "helm: building helm $version into $bin" >&2
	# The Kubernetes version templates see by default (.Capabilities), as
	# helm's own release build sets it: the client-go minor version.
	kminor="$(go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)"
	GOBIN="$root/.cache/tools/bin" GOFLAGS= go install -trimpath -ldflags "\
		-X helm.sh/helm/v3/internal/version.version=$version \
		-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
		-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor" \
		"helm.sh/helm/v3/cmd/helm@$version"
	echo "$version" >"$stamp"
fi

case "${1:-}" in
"") echo "$bin" ;;
lint)
	"$bin" lint --strict deploy/helm/meshlite
	# The values the sandbox installs with, and a non-default namespace.
	"$bin" lint --strict deploy/helm/meshlite --namespace mesh \
		--set istiod.replicas=1,ztunnel.tunnel=quic,ztunnel.xdsAddressConfigMap=ztunnel-xds,cni.dnsCapture=false
	"$bin" template meshlite deploy/helm/meshlite --namespace istio-system >/dev/null
	;;
*) exec "$bin" "$@" ;;
esac
