# meshlite build, test and run targets. Everything a fresh machine lacks is
# installed by .ci/run (apt) or by the hack/ scripts (pinned Go tools and
# binaries, cached under .cache/, which git ignores).

SHELL        := /bin/bash
.SHELLFLAGS  := -eu -o pipefail -c
GO           ?= go
BIN          := $(CURDIR)/bin
TOOLS        := $(CURDIR)/.cache/tools/bin
STATICCHECK  := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME     ?= 5s
# Stamped into binaries that have a main.version (meshctl version).
VERSION      ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

# name=package of every binary `make build` produces.
BINARIES := \
	istiod-lite=./istiod-lite \
	ztunnel=./ztunnel \
	waypoint=./waypoint \
	mesh-cni=./cni/cmd/mesh-cni \
	cni-agent=./cni/cmd/cni-agent \
	meshctl=./meshctl \
	sandbox=./e2e/cmd/sandbox \
	echo=./e2e/cmd/echo \
	meshinstall=./e2e/cmd/meshinstall

.PHONY: all build deps test test-unit test-e2e test-proto test-fuzz test-interop proto lint bench images demo down clean

all: build

build:
	@mkdir -p $(BIN)
	@for b in $(BINARIES); do \
		echo "go build $${b%%=*}"; \
		$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(BIN)/$${b%%=*} $${b#*=}; \
	done

# The pinned kube binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) and reference CNI plugins the sandbox runs; cached under .cache/.
deps:
	hack/kube-bins.sh
	hack/cni-plugins.sh

## test: everything CI runs (.ci/run calls this).
test: build test-proto test-unit test-fuzz test-interop test-e2e

UNIT_PKGS = $(shell $(GO) list ./... | grep -v '/e2e/')
E2E_PKGS ?= $(shell $(GO) list ./e2e/...)

# Unit and loopback integration tests (everything outside e2e/), with the race detector.
test-unit: deps
	$(GO) vet ./...
	$(GO) test -race -count=1 $(UNIT_PKGS)
	@# The race detector shrinks the tunnel transfer test; run it at full size (1 GiB) too.
	$(GO) test -count=1 -run 'TestTunnel_LargeTransferSHA256' -v ./internal/hbone | grep -E '^(=== RUN|--- |ok|FAIL|PASS)|MiB'

# The sandbox cluster and its end-to-end tests (root; real kube-apiserver, netns, iptables).
# They take a free sandbox instance (hack/with-sandbox.sh) and start it clean: a
# running one (say, from `make demo`) is removed first. E2E_PKGS=./e2e/meshtest runs one suite.
test-e2e: build deps
	hack/with-sandbox.sh sh -c '$(BIN)/sandbox down && $(GO) test -race -count=1 -p 1 -timeout 40m $(E2E_PKGS)'


# Fails when the committed generated code differs from what `make proto` makes.
test-proto:
	hack/proto.sh check

# Every FuzzXxx target, briefly (FUZZTIME each); seeds always run in test-unit.
test-fuzz:
	FUZZTIME=$(FUZZTIME) hack/fuzz.sh

# HBONE interop against Istio's own implementation (nested module).
test-interop: deps
	cd e2e/interop && $(GO) test -race -count=1 ./...

proto:
	hack/proto.sh

lint:
	$(GO) vet ./...
	@test -x $(TOOLS)/staticcheck || GOBIN=$(TOOLS) $(GO) install $(STATICCHECK)
	$(TOOLS)/staticcheck ./...
	cd e2e/interop && $(GO) vet ./... && $(TOOLS)/staticcheck ./...
	hack/helm.sh lint

# OCI image tarballs under out/images, built without a container engine.
images:
	hack/images.sh

# BENCHFLAGS=-short gives a smoke run; the bench takes a free sandbox instance.
bench: build deps
	hack/bench-tools.sh
	hack/with-sandbox.sh $(GO) run ./bench/cmd/bench $(if $(SCENARIO),-scenario $(SCENARIO),) $(BENCHFLAGS) -out bench

demo: build deps
	hack/demo.sh

down:
	@if [ -x $(BIN)/sandbox ]; then $(BIN)/sandbox down; fi

clean:
	rm -rf $(BIN) out
