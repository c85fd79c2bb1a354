#!/bin/sh
# What live introspection costs the hello service (services/hello):
#   1. requests/s with the /debug pages and the console on but unused
#      (--debug --console) against off, wrk, best of ROUNDS alternated runs;
#   2. the time of one GET /debug/tasks (JSON, with tracebacks) and of
#      ?format=text with TASKS live tasks (default 10 000) sleeping;
#   3. requests/s while /debug/profile samples at the default rate, against
#      the same service not profiled.
#   sh bench/debug_overhead.sh      DURATION=10s CONNECTIONS=50 ROUNDS=2 TASKS=10000
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
ROUNDS=${ROUNDS:-2}
TASKS=${TASKS:-10000}
PORT=${PORT:-18095}
REPORT_PORT=$((PORT + 1))
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
[ -x "$BUILD_DIR/tamarco-host" ] || cmake -B "$BUILD_DIR" -S "$ROOT" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
cmake --build "$BUILD_DIR" -j2 >/dev/null
PID=""
WORK=$(mktemp -d /tmp/tamarco-debug-bench.XXXXXX)
chmod 700 "$WORK"
trap '[ -z "$PID" ] || kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

# hello, plus TASKS tasks sleeping for an hour when SLEEPERS=1
cat > "$WORK/sleepers.lua" <<LUA
local tamarco = require "tamarco"
local svc = dofile("$ROOT/services/hello/service.lua")
function svc:post_start()
    for _ = 1, $TASKS do tamarco.spawn(function() tamarco.sleep(3600000) end) end
end
return svc
LUA

start() {   # $1: service file, then host options
    file=$1; shift
    XDG_RUNTIME_DIR=$WORK TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION TAMARCO__SYSTEM__LOGGING__STDOUT=false \
    TAMARCO__SYSTEM__RESOURCES__API__PORT=$PORT \
    TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=$REPORT_PORT \
        "$BUILD_DIR/tamarco-host" run "$file" "$@" >"$WORK/out.log" 2>&1 &
    PID=$!
    i=0
    until curl -sf "http://127.0.0.1:$PORT/hello/world" >/dev/null; do
        sleep 0.05; i=$((i + 1)); [ $i -lt 400 ] || { cat "$WORK/out.log"; exit 1; }
    done
}
stop() { kill -TERM $PID; wait $PID || true; PID=""; }
rps() { wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$PORT/hello/world" | awk '/Requests\/sec/ {print $2}'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > a ? b : a) }'; }
HELLO=$ROOT/services/hello/service.lua

# 1. on but unused
off=0; on=0; r=0
while [ $r -lt "$ROUNDS" ]; do
    start "$HELLO"; off=$(best "$off" "$(rps)"); stop
    start "$HELLO" --debug --console; on=$(best "$on" "$(rps)"); stop
    r=$((r + 1))
done
echo "hello, wrk -t1 -c$CONNECTIONS -d$DURATION, best of $ROUNDS:"
echo "  debug pages and console off      $off req/s"
echo "  on (--debug --console), unused   $on req/s"
awk -v a="$off" -v b="$on" 'BEGIN { printf "  ratio on/off %.3f\n", b / a }'

# 2. /debug/tasks with TASKS live tasks
start "$WORK/sleepers.lua" --debug
sleep 1
for format in json text; do
    query=""; [ $format = text ] && query="?format=text"
    total=0; n=5; i=0; size=0
    while [ $i -lt $n ]; do
        line=$(curl -s -o "$WORK/tasks.$format" -w "%{time_total} %{size_download}" "http://127.0.0.1:$REPORT_PORT/debug/tasks$query")
        total=$(awk -v a="$total" -v b="${line% *}" 'BEGIN { print a + b }')
        size=${line#* }
        i=$((i + 1))
    done
    awk -v t="$total" -v n=$n -v s="$size" -v k="$TASKS" -v f=$format \
        'BEGIN { printf "GET /debug/tasks (%s) with %d sleeping tasks: %.0f ms (mean of %d), %.1f MB\n", f, k, 1000 * t / n, n, s / 1048576 }'
done
grep -c '"sleep"' "$WORK/tasks.json" >/dev/null || { echo "the sleeping tasks were not listed"; exit 1; }
stop

# 3. profiling at the default rate while serving
seconds=$(echo "$DURATION" | sed 's/s$//')
start "$HELLO" --debug
plain=$(rps)
curl -s -o "$WORK/profile.folded" "http://127.0.0.1:$REPORT_PORT/debug/profile?seconds=$((seconds + 2))&format=folded" &
curl_pid=$!
sleep 1
profiled=$(rps)
wait $curl_pid
stop
samples=$(awk '{ n += $NF } END { print n + 0 }' "$WORK/profile.folded")
echo "profiling (default rate) while serving: $profiled req/s against $plain req/s not profiled ($samples samples)"
awk -v a="$plain" -v b="$profiled" 'BEGIN { printf "  ratio profiled/not %.3f\n", b / a }'
