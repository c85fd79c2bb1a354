#!/bin/sh
# Hello-world JSON over HTTP: tamarco-host (services/hello) against nginx
# with Debian's Lua module (content_by_lua_block) and Python aiohttp, all on
# loopback, measured with wrk in the same run, with one worker each and then
# two (tamarco-host --workers 2, nginx worker_processes 2, two aiohttp
# processes on one port). The three servers listen at once and are measured
# in turn, ROUNDS times, so that a change in what else runs on the machine
# falls on every server alike. Prints the median requests/s and p99 of each
# server over the rounds, the ratios (ours / theirs: requests/s as the
# median of the rounds' ratios, each round's listed; p99 of the medians), and
# the resident memory of each server (per worker).
#
#   sh bench/http_hello.sh                 # 3 rounds of wrk -t2 -c50 -d5s --latency
#   ROUNDS=5 DURATION=10s CONNECTIONS=100 sh bench/http_hello.sh
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
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
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


bench_workers() {   # N
    n=$1
    : > "$WORK/results-$n"
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
    bench_wait_http "$OUR_PORT" "$URL_PATH"

    # nginx + Lua
    mkdir -p "$WORK/nginx$n/logs" "$WORK/nginx$n/client_body"
    ln -sf /usr/lib/nginx/modules "$WORK/nginx$n/modules"
    sed -e "s|@PREFIX@|$WORK/nginx$n|g" -e "s|@PORT@|$NGINX_PORT|g" -e "s|worker_processes 1;|worker_processes $n;|" \
        "$ROOT/bench/http_hello_nginx.conf" > "$WORK/nginx$n/nginx.conf"
    $server_cpu nginx -p "$WORK/nginx$n" -c "$WORK/nginx$n/nginx.conf" &
    ngx=$!
    PIDS="$PIDS $ngx"
    bench_wait_http "$NGINX_PORT" "$URL_PATH"

    # aiohttp: n processes on one port
    aio=""
    i=0
    while [ $i -lt "$n" ]; do
        $server_cpu /usr/bin/python3 "$ROOT/bench/peers/hello_aiohttp.py" "$AIOHTTP_PORT" > "$WORK/aiohttp.log" 2>&1 &
        aio="$aio $!"
        i=$((i + 1))
    done
    PIDS="$PIDS $aio"
    bench_wait_http "$AIOHTTP_PORT" "$URL_PATH"
    sleep 0.5   # every worker listening

    for port in "$OUR_PORT" "$NGINX_PORT" "$AIOHTTP_PORT"; do
        $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port$URL_PATH" >/dev/null   # warm-up
    done
    round=1
    while [ "$round" -le "$ROUNDS" ]; do
        for server in "tamarco-host:$OUR_PORT" "nginx+lua:$NGINX_PORT" "aiohttp:$AIOHTTP_PORT"; do
            $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
                "http://127.0.0.1:${server#*:}$URL_PATH" > "$WORK/wrk.txt"
            echo "$round ${server%%:*} $(bench_rps "$WORK/wrk.txt") $(bench_p99_ms "$WORK/wrk.txt")" >> "$WORK/results-$n"
            grep -h -E "Socket errors|Non-2xx" "$WORK/wrk.txt" | sed "s/^/${server%%:*}: /" >&2 || true
        done
        round=$((round + 1))
    done

    if [ "$n" = 1 ]; then our_rss=$(bench_rss_kb "$our"); else our_rss=$(bench_rss_kb "$(pgrep -P "$our" | head -n1)"); fi
    ngx_rss=$(bench_rss_kb "$(pgrep -P "$ngx" | head -n1)")
    aio_rss=$(bench_rss_kb "$(echo $aio | cut -d' ' -f1)")
    bench_stop "$our" "$ngx" $aio

    echo
    echo "== $n worker(s): $ROUNDS rounds of wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency http://127.0.0.1:PORT$URL_PATH (pinned: $PIN)"
    awk -v rounds="$ROUNDS" -v rss_ours="$our_rss" -v rss_nginx="$ngx_rss" -v rss_aio="$aio_rss" '
        function median(a, n,    i, j, t) {   # sorts a[1..n]
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        { r[$2, $1] = $3; p[$2, $1] = $4 }
        END {
            split("tamarco-host nginx+lua aiohttp", names, " ")
            rss["tamarco-host"] = rss_ours; rss["nginx+lua"] = rss_nginx; rss["aiohttp"] = rss_aio
            for (i = 1; i <= 3; i++) {
                s = names[i]
                for (k = 1; k <= rounds; k++) { a[k] = r[s, k]; b[k] = p[s, k] }
                mr[s] = median(a, rounds); mp[s] = median(b, rounds)
            }
            printf "%-22s %12s %10s %14s\n", "server", "requests/s", "p99 ms", "RSS KiB/worker"
            for (i = 1; i <= 3; i++)
                printf "%-22s %12.0f %10.2f %14s\n", names[i] == "tamarco-host" ? "tamarco-host (hello)" : names[i],
                    mr[names[i]], mp[names[i]], rss[names[i]]
            for (i = 2; i <= 3; i++) {
                s = names[i]
                line = ""
                for (k = 1; k <= rounds; k++) { a[k] = r["tamarco-host", k] / r[s, k]; line = line sprintf(" %.2fx", a[k]) }
                ratio = median(a, rounds)
                line2 = ""
                for (k = 1; k <= rounds; k++) line2 = line2 sprintf(" %.2fx", p["tamarco-host", k] / p[s, k])
                printf "ratios vs %-11s requests/s %.2fx (rounds:%s), p99 %.2fx (rounds:%s)", s ":", ratio, line,
                    mp["tamarco-host"] / mp[s], line2
                if (s == "nginx+lua") printf ", RSS %.2fx", rss_ours / rss_nginx
                printf "\n"
            }
        }' "$WORK/results-$n"
}

bench_workers 1
bench_workers 2
exit 0
