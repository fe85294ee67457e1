#!/bin/sh
# Run every fuzz target in turn for SECONDS each (default 60).
# Usage: fuzz/run.sh [SECONDS]
# New inputs libFuzzer finds go to a scratch directory, so the seed corpus
# in fuzz/corpus/ stays small and hand-named. Crashes land in
# fuzz/artifacts/<target>/.
set -eu
seconds="${1:-60}"
case "$seconds" in
    ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in dest connect_head basic mux_frames hello config; do
    echo "== fuzz $target for ${seconds}s"
    mkdir -p "$scratch/$target"
    cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1
done
