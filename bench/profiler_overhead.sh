#!/bin/sh
# Requests/s of the hello service (services/hello) with the profiler
# resource off and on (jit.profile sampling every SAMPLE_MS ms, its file
# rewritten every second), measured with wrk; prints the ratio.
#   sh bench/profiler_overhead.sh        DURATION=10s CONNECTIONS=50 SAMPLE_MS=10
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
SAMPLE_MS=${SAMPLE_MS:-10}
PORT=${PORT:-18090}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
[ -x "$BUILD_DIR/tamarco-host" ] || cmake -B "$BUILD_DIR" -S "$ROOT" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
cmake --build "$BUILD_DIR" -j2 --target tamarco-host >/dev/null
PID=""
WORK=$(mktemp -d /tmp/tamarco-prof.XXXXXX)
trap '[ -z "$PID" ] || kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
# hello plus the profiler resource
sed 's|resources = { api = http.server() }|resources = { api = http.server(), profiler = require("tamarco.resources.profiler").new() }|' \
    "$ROOT/services/hello/service.lua" > "$WORK/service.lua"
grep -q profiler "$WORK/service.lua" || { echo "could not add the profiler to services/hello/service.lua"; exit 1; }
run() {   # $1: list of services with the profiler
    TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION TAMARCO__SYSTEM__LOGGING__STDOUT=false \
    TAMARCO__SYSTEM__RESOURCES__API__PORT=$PORT \
    TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=$((PORT + 1)) \
    TAMARCO__SYSTEM__RESOURCES__PROFILER__MICROSERVICES_WITH_PROFILER="$1" \
    TAMARCO__SYSTEM__RESOURCES__PROFILER__INTERVAL_SECONDS=1 \
    TAMARCO__SYSTEM__RESOURCES__PROFILER__SAMPLE_MS=$SAMPLE_MS \
    TAMARCO__SYSTEM__RESOURCES__PROFILER__FILE="$WORK/profile.txt" \
        "$BUILD_DIR/tamarco-host" run "$WORK/service.lua" >"$WORK/out.log" 2>&1 &
    PID=$!
    i=0
    until curl -sf "http://127.0.0.1:$PORT/hello/world" >/dev/null; do
        sleep 0.05; i=$((i + 1)); [ $i -lt 200 ] || { cat "$WORK/out.log"; exit 1; }
    done
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$PORT/hello/world" | awk '/Requests\/sec/ {print $2}'
    kill -TERM $PID; wait $PID || true
}
# alternate off/on ROUNDS times and keep the best of each (the machine is shared)
ROUNDS=${ROUNDS:-2}
off=0; on=0; r=0
while [ $r -lt "$ROUNDS" ]; do
    x=$(run none); off=$(awk -v a="$off" -v b="$x" 'BEGIN { print (b > a ? b : a) }')
    x=$(run hello); on=$(awk -v a="$on" -v b="$x" 'BEGIN { print (b > a ? b : a) }')
    r=$((r + 1))
done
echo "hello, wrk -t1 -c$CONNECTIONS -d$DURATION: profiler off $off req/s, on (every ${SAMPLE_MS} ms) $on req/s"
awk -v a="$off" -v b="$on" 'BEGIN { printf "ratio on/off %.3f (overhead %.1f%%)\n", b / a, 100 * (1 - b / a) }'
[ -s "$WORK/profile.txt" ] && { echo "top of the profile:"; sed -n 1,8p "$WORK/profile.txt"; }
