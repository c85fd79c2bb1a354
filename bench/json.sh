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
if [ ! -x "$BUILD_DIR/tamarco-host" ]; then
    cmake -B "$BUILD_DIR" -S "$ROOT" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
fi
cmake --build "$BUILD_DIR" -j2 --target tamarco-host >/dev/null
cd "$ROOT"
TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION TAMARCO__SYSTEM__LOGGING__STDOUT=false \
    "$BUILD_DIR/tamarco-host" run bench/json_bench.lua
