#!/bin/sh
# CPU work three ways (services/examples/native): SHA-256 of a buffer in pure
# Lua, through LuaJIT's FFI into C, and in C offloaded to libuv's thread pool.
# Prints MB/s per way, the ratios FFI/Lua and offload/Lua, and the longest
# time the loop went without turning (what offloading is for).
#
#   sh bench/native.sh                     # 64 KiB buffer, 2 s per way
#   SIZE=1048576 SECONDS_PER_WAY=5 CONCURRENCY=2 sh bench/native.sh
#   BUILD_DIR=build-release sh bench/native.sh
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
if [ ! -x "$BUILD_DIR/tamarco-host" ]; then
    cmake -B "$BUILD_DIR" -S "$ROOT" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
fi
cmake --build "$BUILD_DIR" -j2 --target tamarco-host native_hash >/dev/null
cd "$ROOT"
TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION TAMARCO__SYSTEM__LOGGING__STDOUT=false \
    "$BUILD_DIR/tamarco-host" run bench/native_bench.lua
