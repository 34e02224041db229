#!/bin/sh
# toolmods: keeps the tools module small, so that the README's first command
# (go tool -modfile=tools/go.mod task demo) builds go-task quickly on a
# fresh machine (issue 12).
#
# Counts the modules tools/go.mod requires (what the first build downloads
# and compiles) and the modules of its graph (go list -m all: go.mod files
# read), fails above the bounds, and checks that the pinned go-task reads
# the Taskfile (task --list, the default task).
#
# Measured: go-task v3.38.0 requires 27 modules, 44 in the graph;
# v3.45.5 required 58, 169 in the graph (go-git, u-root, compressors for
# remote Taskfiles); v3.54.0 required 125, 378 in the graph (cloud storage
# SDKs, gRPC, OpenTelemetry).
#
#   sh scripts/toolmods.sh           the check (run by task lint)
#   sh scripts/toolmods.sh --fresh   also times the first `task demo` with
#                                    empty module and build caches (heavy:
#                                    downloads and builds everything)
set -eu
cd "$(dirname "$0")/.."

MAX_REQUIRED=${MAX_REQUIRED:-32}
MAX_GRAPH=${MAX_GRAPH:-55}

required=$(awk '
	/^require \(/ { block = 1; next }
	block && /^\)/ { block = 0; next }
	block && NF && $1 !~ /^\/\// { n++ }
	/^require [^(]/ { n++ }
	END { print n + 0 }' tools/go.mod)
graph=$(go list -m -modfile=tools/go.mod all | sed 1d | wc -l)
task=$(go list -m -modfile=tools/go.mod -f '{{.Version}}' github.com/go-task/task/v3)
echo "toolmods: go-task $task: $required modules required by tools/go.mod (max $MAX_REQUIRED), $graph in its graph (max $MAX_GRAPH)"

fail=0
if [ "$required" -gt "$MAX_REQUIRED" ]; then
	echo "toolmods: tools/go.mod requires $required modules, more than $MAX_REQUIRED: pin a go-task release from before remote Taskfiles (v3.38.x)" >&2
	fail=1
fi
if [ "$graph" -gt "$MAX_GRAPH" ]; then
	echo "toolmods: tools/go.mod's module graph has $graph modules, more than $MAX_GRAPH" >&2
	fail=1
fi

# The entry point works with the pinned version.
go tool -modfile=tools/go.mod task --list >/dev/null || { echo "toolmods: task --list fails with go-task $task" >&2; fail=1; }
go tool -modfile=tools/go.mod task --silent >/dev/null || { echo "toolmods: the default task fails with go-task $task" >&2; fail=1; }

if [ "${1:-}" = "--fresh" ]; then
	tmp=$(mktemp -d)
	trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
	echo "toolmods: first run of task demo, GOMODCACHE=$tmp/mod GOCACHE=$tmp/build"
	GOMODCACHE=$tmp/mod GOCACHE=$tmp/build GOFLAGS=-modcacherw \
		/usr/bin/time -f 'toolmods: first task demo: %e s wall, %U s user, %S s system, max RSS %M KiB' \
		go tool -modfile=tools/go.mod task demo >"$tmp/demo.log" 2>&1 || { tail -20 "$tmp/demo.log" >&2; exit 1; }
	tail -1 "$tmp/demo.log"
	echo "toolmods: module zips downloaded: $(find "$tmp/mod/cache/download" -name '*.zip' | wc -l) ($(du -sh "$tmp/mod" | cut -f1) module cache, $(du -sh "$tmp/build" | cut -f1) build cache)"
fi
exit $fail
