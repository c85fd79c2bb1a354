#!/bin/sh
# The framework's JSON codec (tamarco.json) against lua-cjson 2.1.0, in the
# same host and the same run: decode and encode MB/s on three payloads (an
# API body, a 100 KB array of records, text with escapes and non-ASCII),
# the ratio tamarco.json / cjson, and whether each keeps [], {} and 1.0
# through a round trip.
#
#   sh bench/json.sh                       # 2 s per measurement, best of 5 rounds
#   SECONDS_PER_CASE=3 sh bench/json.sh
#   BUILD_DIR=build sh bench/json.sh
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
. "$ROOT/bench/lib.sh"
bench_build_host
cd "$ROOT"
TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION TAMARCO__SYSTEM__LOGGING__STDOUT=false \
    "$HOST_BIN" run bench/json_bench.lua
