#!/usr/bin/env bash
# Runs every Fuzz target of the main module for FUZZTIME each (go test -fuzz
# takes one target of one package at a time). FUZZ_PKGS narrows the packages.
#
# Go 1.26's fuzz coordinator can fail a run with a bare "context deadline
# exceeded" at the -fuzztime boundary without any failing input (golang/go#75804,
# fixed in Go 1.27). Such a run is retried; a failure that wrote a reproducer,
# panicked or failed an assertion is never retried.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-5s}
pkgs=${FUZZ_PKGS:-$(go list ./...)}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# deadline_flake tells whether a failed run's log is only the toolchain race.
deadline_flake() {
	grep -q 'context deadline exceeded' "$log" &&
		! grep -qE 'Failing input written|panic:|_test\.go:[0-9]+:' "$log"
}

n=0
for pkg in $pkgs; do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	grep -lsq '^func Fuzz' "$dir"/*_test.go || continue
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		for try in 1 2 3; do
			echo "fuzz $pkg $target ($fuzztime)"
			if go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" >"$log" 2>&1; then
				break
			fi
			if deadline_flake && [ "$try" -lt 3 ]; then
				echo "fuzz: $target hit the fuzztime deadline race (golang/go#75804, no failing input); retrying"
				continue
			fi
			cat "$log"
			echo "fuzz target $pkg $target failed; a failing input, if any, is under $dir/testdata/fuzz/$target" >&2
			exit 1
		done
		n=$((n + 1))
	done
done
echo "fuzz: $n targets ran for $fuzztime each"
[ "$n" -gt 0 ] || { echo "fuzz: no targets found" >&2; exit 1; }
