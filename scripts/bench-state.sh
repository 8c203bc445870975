#!/bin/sh
# Snapshot/restore and live-migration benchmark (see scripts/bench-state.py and
# docs/benchmarks.md). Builds the release binary first.
set -e
cd "$(dirname "$0")/.."
swift build -c release --product hostvisor >/dev/null
exec python3 scripts/bench-state.py "$@"
