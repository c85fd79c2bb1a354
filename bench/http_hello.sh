#!/bin/sh
# Hello-world JSON over HTTP: tamarco-host (services/hello) against nginx
# with Debian's Lua module (content_by_lua_block) and Python aiohttp, all on
# loopback, measured with wrk in the same run, with one worker each and then
# two (tamarco-host --workers 2, nginx worker_processes 2, two aiohttp
# processes on one port). Prints requests/s, p99 and the ratios (ours /
# theirs), and the resident memory of each server (per worker).
#
#   sh bench/http_hello.sh                 # wrk -t2 -c50 -d10s --latency
#   DURATION=30s CONNECTIONS=100 sh bench/http_hello.sh
#   BUILD_DIR=build-release sh bench/http_hello.sh
#   PIN=1 sh bench/http_hello.sh           # servers on CPU 1, wrk on CPU 0
#   BENCH_LUA_DIR=DIR sh bench/http_hello.sh  # run the service with another Lua tree
#
# Needs root the first time, to install wrk, nginx-light,
# libnginx-mod-http-lua and python3-aiohttp with apt-get.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
OUR_PORT=${OUR_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
AIOHTTP_PORT=${AIOHTTP_PORT:-18082}
PIN=${PIN:-0}
URL_PATH=/hello/world

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing="$missing libnginx-mod-http-lua"
/usr/bin/python3 -c "import aiohttp" 2>/dev/null || missing="$missing python3-aiohttp"
bench_install "$missing"

bench_build_host

bench_workdir bench

server_cpu=""
wrk_cpu=""
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    server_cpu="taskset -c 1"
    wrk_cpu="taskset -c 0"
fi

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
    tamarco_http_report_server:
      port: 0
YML

wait_port() {
    i=0
    while ! curl -fs "http://127.0.0.1:$1$URL_PATH" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 150 ]; then
            echo "server on port $1 did not answer" >&2
            cat "$WORK"/*.log "$WORK"/nginx*/error.log 2>/dev/null >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}
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
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
run_wrk() {   # file port
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$2$URL_PATH" >/dev/null   # warm-up
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        "http://127.0.0.1:$2$URL_PATH" > "$1"
}
stop() { for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }

bench_workers() {   # N
    n=$1
    # tamarco-host
    if [ "$n" = 1 ]; then
        $server_cpu env ${BENCH_LUA_DIR:+TAMARCO_LUA_DIR=$BENCH_LUA_DIR} "$HOST_BIN" run \
            "$ROOT/services/hello/service.lua" --settings "$WORK/settings.yml" > "$WORK/hello.log" 2>&1 &
    else
        $server_cpu env ${BENCH_LUA_DIR:+TAMARCO_LUA_DIR=$BENCH_LUA_DIR} "$HOST_BIN" run \
            "$ROOT/services/hello/service.lua" --settings "$WORK/settings.yml" --workers "$n" > "$WORK/hello.log" 2>&1 &
    fi
    our=$!
    PIDS="$PIDS $our"
    wait_port "$OUR_PORT"
    sleep 0.5   # every worker listening
    run_wrk "$WORK/wrk-tamarco-$n.txt" "$OUR_PORT"
    if [ "$n" = 1 ]; then our_rss=$(rss_kb "$our"); else our_rss=$(rss_kb "$(pgrep -P "$our" | head -n1)"); fi
    stop "$our"

    # nginx + Lua
    mkdir -p "$WORK/nginx$n/logs" "$WORK/nginx$n/client_body"
    ln -sf /usr/lib/nginx/modules "$WORK/nginx$n/modules"
    sed -e "s|@PREFIX@|$WORK/nginx$n|g" -e "s|@PORT@|$NGINX_PORT|g" -e "s|worker_processes 1;|worker_processes $n;|" \
        "$ROOT/bench/http_hello_nginx.conf" > "$WORK/nginx$n/nginx.conf"
    $server_cpu nginx -p "$WORK/nginx$n" -c "$WORK/nginx$n/nginx.conf" &
    ngx=$!
    PIDS="$PIDS $ngx"
    wait_port "$NGINX_PORT"
    run_wrk "$WORK/wrk-nginx-$n.txt" "$NGINX_PORT"
    ngx_rss=$(rss_kb "$(pgrep -P "$ngx" | head -n1)")
    stop "$ngx"

    # aiohttp: n processes on one port
    aio=""
    i=0
    while [ $i -lt "$n" ]; do
        $server_cpu /usr/bin/python3 "$ROOT/bench/peers/hello_aiohttp.py" "$AIOHTTP_PORT" > "$WORK/aiohttp.log" 2>&1 &
        aio="$aio $!"
        i=$((i + 1))
    done
    PIDS="$PIDS $aio"
    wait_port "$AIOHTTP_PORT"
    sleep 0.5
    run_wrk "$WORK/wrk-aiohttp-$n.txt" "$AIOHTTP_PORT"
    aio_rss=$(rss_kb "$(echo $aio | cut -d' ' -f1)")
    stop $aio

    echo
    echo "== $n worker(s): wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency http://127.0.0.1:PORT$URL_PATH (pinned: $PIN)"
    printf '%-22s %12s %10s %14s\n' "server" "requests/s" "p99 ms" "RSS KiB/worker"
    printf '%-22s %12s %10s %14s\n' "tamarco-host (hello)" "$(rps "$WORK/wrk-tamarco-$n.txt")" "$(p99_ms "$WORK/wrk-tamarco-$n.txt")" "$our_rss"
    printf '%-22s %12s %10s %14s\n' "nginx+lua" "$(rps "$WORK/wrk-nginx-$n.txt")" "$(p99_ms "$WORK/wrk-nginx-$n.txt")" "$ngx_rss"
    printf '%-22s %12s %10s %14s\n' "python aiohttp" "$(rps "$WORK/wrk-aiohttp-$n.txt")" "$(p99_ms "$WORK/wrk-aiohttp-$n.txt")" "$aio_rss"
    awk -v a="$(rps "$WORK/wrk-tamarco-$n.txt")" -v b="$(rps "$WORK/wrk-nginx-$n.txt")" -v c="$(rps "$WORK/wrk-aiohttp-$n.txt")" \
        -v d="$(p99_ms "$WORK/wrk-tamarco-$n.txt")" -v e="$(p99_ms "$WORK/wrk-nginx-$n.txt")" -v f="$(p99_ms "$WORK/wrk-aiohttp-$n.txt")" \
        -v g="$our_rss" -v h="$ngx_rss" 'BEGIN {
        printf "ratios vs nginx+lua: requests/s %.2fx, p99 %.2fx, RSS %.2fx\n", a / b, d / e, g / h
        printf "ratios vs aiohttp:   requests/s %.2fx, p99 %.2fx\n", a / c, d / f
    }'
    grep -h -E "Socket errors|Non-2xx" "$WORK"/wrk-*-"$n".txt || true
}

bench_workers 1
bench_workers 2
exit 0
