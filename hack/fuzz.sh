#!/usr/bin/env bash
# Runs every Fuzz target of the main module for FUZZTIME each (go test -fuzz
# takes one target of one package at a time). FUZZ_PKGS narrows the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-5s}
pkgs=${FUZZ_PKGS:-$(go list ./...)}
n=0
for pkg in $pkgs; do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	grep -lsq '^func Fuzz' "$dir"/*_test.go || continue
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz $pkg $target ($fuzztime)"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" >/tmp/fuzz-$$.log 2>&1 || {
			cat /tmp/fuzz-$$.log; rm -f /tmp/fuzz-$$.log
			echo "fuzz target $pkg $target failed; the failing input is under $dir/testdata/fuzz/$target" >&2
			exit 1
		}
		n=$((n + 1))
	done
done
rm -f /tmp/fuzz-$$.log
echo "fuzz: $n targets ran for $fuzztime each"
[ "$n" -gt 0 ] || { echo "fuzz: no targets found" >&2; exit 1; }
