#!/bin/sh
# Hello-world JSON over HTTP: tamarco-host (services/hello) against nginx
# with Debian's Lua module (content_by_lua_block, one worker), both on
# loopback, measured with wrk in the same run. Prints requests/s, p99 and
# the ratios (ours / theirs), and the resident memory of each server.
#
#   sh bench/http_hello.sh                 # wrk -t2 -c50 -d10s --latency
#   DURATION=30s CONNECTIONS=100 sh bench/http_hello.sh
#   BUILD_DIR=build-release sh bench/http_hello.sh
#   PIN=1 sh bench/http_hello.sh           # servers on CPU 1, wrk on CPU 0
#   BENCH_LUA_DIR=DIR sh bench/http_hello.sh  # run the service with another Lua tree
#
# Needs root the first time, to install wrk, nginx-light and
# libnginx-mod-http-lua with apt-get.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
OUR_PORT=${OUR_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
PIN=${PIN:-0}
URL_PATH=/hello/world

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing="$missing libnginx-mod-http-lua"
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing packages:$missing (run as root to install them)" >&2
        exit 1
    fi
    echo "installing:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

HOST_BIN=$BUILD_DIR/tamarco-host
if [ ! -x "$HOST_BIN" ]; then
    cmake -B "$BUILD_DIR" -S "$ROOT" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
fi
if ! cmake --build "$BUILD_DIR" --target tamarco-host -j"$(nproc)" >"$BUILD_DIR/bench-build.log" 2>&1; then
    [ -x "$HOST_BIN" ] || { cat "$BUILD_DIR/bench-build.log" >&2; exit 1; }
    echo "warning: the build failed (see $BUILD_DIR/bench-build.log); using the existing $HOST_BIN" >&2
fi

WORK=$(mktemp -d /tmp/tamarco-bench.XXXXXX)
chmod 755 "$WORK"
OUR_PID=""
NGINX_PID=""
cleanup() {
    [ -n "$OUR_PID" ] && kill "$OUR_PID" 2>/dev/null || true
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

server_cpu=""
wrk_cpu=""
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    server_cpu="taskset -c 1"
    wrk_cpu="taskset -c 0"
fi

# nginx with its Lua module, one worker
mkdir -p "$WORK/nginx/logs" "$WORK/nginx/client_body"
ln -s /usr/lib/nginx/modules "$WORK/nginx/modules"
sed -e "s|@PREFIX@|$WORK/nginx|g" -e "s|@PORT@|$NGINX_PORT|g" \
    "$ROOT/bench/http_hello_nginx.conf" > "$WORK/nginx/nginx.conf"
$server_cpu nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
NGINX_PID=$!

# the hello service
cat > "$WORK/settings.yml" <<YML
system:
  deploy_name: bench
  logging:
    profile: PRODUCTION
    stdout: true
  resources:
    api:
      host: 127.0.0.1
      port: $OUR_PORT
YML
$server_cpu env ${BENCH_LUA_DIR:+TAMARCO_LUA_DIR=$BENCH_LUA_DIR} "$HOST_BIN" run "$ROOT/services/hello/service.lua" --settings "$WORK/settings.yml" \
    > "$WORK/hello.log" 2>&1 &
OUR_PID=$!

wait_port() {
    i=0
    while ! curl -fs "http://127.0.0.1:$1$URL_PATH" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            echo "server on port $1 did not answer" >&2
            cat "$WORK/hello.log" "$WORK/nginx/error.log" 2>/dev/null >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}
wait_port "$OUR_PORT"
wait_port "$NGINX_PORT"

echo "tamarco: $(curl -s "http://127.0.0.1:$OUR_PORT$URL_PATH")"
echo "nginx:   $(curl -s "http://127.0.0.1:$NGINX_PORT$URL_PATH")"

# p99 from wrk's latency distribution, in milliseconds
p99_ms() {
    awk '$1 == "99%" {
        v = $2
        if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
    }' "$1"
}
rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }

run_wrk() {   # name port
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$2$URL_PATH" >/dev/null   # warm-up
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        "http://127.0.0.1:$2$URL_PATH" > "$WORK/wrk-$1.txt"
}
run_wrk tamarco "$OUR_PORT"
run_wrk nginx "$NGINX_PORT"

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -n1)
OUR_RSS=$(rss_kb "$OUR_PID")
NGINX_RSS=$(rss_kb "$NGINX_WORKER")

OUR_RPS=$(rps "$WORK/wrk-tamarco.txt")
NGINX_RPS=$(rps "$WORK/wrk-nginx.txt")
OUR_P99=$(p99_ms "$WORK/wrk-tamarco.txt")
NGINX_P99=$(p99_ms "$WORK/wrk-nginx.txt")
errors=$(grep -h -E "Socket errors|Non-2xx" "$WORK"/wrk-*.txt || true)

echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency http://127.0.0.1:PORT$URL_PATH (pinned: $PIN)"
printf '%-22s %12s %10s %10s\n' "server" "requests/s" "p99 ms" "RSS KiB"
printf '%-22s %12s %10s %10s\n' "tamarco-host (hello)" "$OUR_RPS" "$OUR_P99" "$OUR_RSS"
printf '%-22s %12s %10s %10s\n' "nginx+lua worker" "$NGINX_RPS" "$NGINX_P99" "$NGINX_RSS"
awk -v a="$OUR_RPS" -v b="$NGINX_RPS" -v c="$OUR_P99" -v d="$NGINX_P99" -v e="$OUR_RSS" -v f="$NGINX_RSS" 'BEGIN {
    printf "ratios (tamarco / nginx): requests/s %.2fx, p99 %.2fx, RSS %.2fx\n", a / b, c / d, e / f
}'
[ -n "$errors" ] && echo "$errors"
exit 0
