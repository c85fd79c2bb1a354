#!/bin/sh
# The metrics hot path (M ops/s per operation) and /metrics exposition in C
# against the same text built in Lua, printed with their ratio.
#
#   sh bench/metrics.sh            # N=2000000 calls per operation
#   N=10000000 BUILD_DIR=build-release sh bench/metrics.sh
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
. "$ROOT/bench/lib.sh"
bench_build_host
cd "$ROOT"
TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION TAMARCO__SYSTEM__LOGGING__STDOUT=false \
    "$HOST_BIN" run bench/metrics_bench.lua
