#!/usr/bin/env bash
# make images: meshlite's container images with no container engine. Builds
# every component as a static binary (CGO_ENABLED=0, linux, this machine's
# GOARCH unless GOARCH is set) and packs one OCI image layout tarball per
# component into out/images/<name>.oci.tar (deploy/images). Push one with,
# for instance, `skopeo copy oci-archive:out/images/ztunnel.oci.tar docker://...`
# or `crane push`.
#
#   REGISTRY=ghcr.io/meshlite TAG=0.1.0 hack/images.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-ghcr.io/meshlite}
# The chart's appVersion by default, so `helm install` finds the images.
TAG=${TAG:-$(awk -F'"' '/^appVersion:/ { print $2 }' deploy/helm/meshlite/Chart.yaml)}
GOARCH=${GOARCH:-$(go env GOARCH)}
OUT=out/images
# Reproducible: the same sources give the same image digests.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

mkdir -p "$OUT/bin"
for b in istiod-lite=./istiod-lite ztunnel=./ztunnel waypoint=./waypoint \
	mesh-cni=./cni/cmd/mesh-cni cni-agent=./cni/cmd/cni-agent meshctl=./meshctl; do
	echo "go build (static, linux/$GOARCH) ${b%%=*}"
	CGO_ENABLED=0 GOOS=linux GOARCH=$GOARCH go build -trimpath -buildvcs=false \
		-ldflags '-s -w' -o "$OUT/bin/${b%%=*}" "${b#*=}"
done
go run ./deploy/images/cmd/mkimages -bin "$OUT/bin" -out "$OUT" -registry "$REGISTRY" -tag "$TAG" -arch "$GOARCH"
