#!/bin/sh
# The microservice hot path: GET /user/{id} -> Redis GET user:<id> -> JSON
# ({"id":"42","name":"..."}), one process each, on loopback, measured with
# wrk in the same run against
#   (a) Node 20's http + ioredis with enableAutoPipelining (npm-installed
#       into a temporary directory, removed at the end),
#   (b) nginx + Debian's Lua module, RESP over an ngx.socket.tcp cosocket
#       with setkeepalive (bench/peers/e2e_nginx.conf),
#   (c) Python aiohttp + redis.asyncio (Debian's python3-redis).
# Unpinned, then pinned (servers on CPU 1; wrk and redis-server on CPU 0).
# All servers listen at once and are measured in turn, ROUNDS times, so that
# a change in what else runs on the machine falls on every server alike.
# Prints the median requests/s and p99 of each server over the rounds, its
# RSS, and the ratios ours / theirs: requests/s as the median of the rounds'
# ratios (each round's listed), p99 and RSS of the medians.
#
#   sh bench/e2e.sh                    # 3 rounds of wrk -t2 -c50 -d5s --latency
#   ROUNDS=5 DURATION=10s CONNECTIONS=100 sh bench/e2e.sh
#   MODES="0" sh bench/e2e.sh          # unpinned only ("1": pinned only)
#   PEERS="node nginx" sh bench/e2e.sh # a subset of node nginx aiohttp
#   BUILD_DIR=build-release sh bench/e2e.sh
#
# Needs wrk, redis-server, nginx-light, libnginx-mod-http-lua,
# python3-aiohttp, python3-redis, nodejs and npm (installed with apt-get
# when run as root) and the npm registry for ioredis.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
MODES=${MODES:-0 1}
PEERS=${PEERS:-node nginx aiohttp}
URL_PATH=/user/42

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing="$missing libnginx-mod-http-lua"
/usr/bin/python3 -c "import aiohttp" 2>/dev/null || missing="$missing python3-aiohttp"
/usr/bin/python3 -c "import redis.asyncio" 2>/dev/null || missing="$missing python3-redis"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
bench_install "$missing"

bench_build_host

bench_workdir bench

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port)
OUR_PORT=$(free_port)
NODE_PORT=$(free_port)
NGINX_PORT=$(free_port)
AIOHTTP_PORT=$(free_port)

case " $PEERS " in *" node "*)
    echo "installing ioredis into $WORK/node ..."
    mkdir -p "$WORK/node"
    (cd "$WORK/node" && npm init -y >/dev/null 2>&1 &&
        npm install --no-audit --no-fund --silent ioredis >"$WORK/npm.log" 2>&1) ||
        { cat "$WORK/npm.log" >&2; exit 1; }
esac

cat > "$WORK/service.lua" <<'LUA'
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"
local redis = require "tamarco.resources.redis"

local svc = tamarco.service { name = "e2e", resources = { api = http.server(), cache = redis.client() } }

svc.api:get("/user/{id}", function(req)
    local id = req.params.id
    local name, err = svc.cache:get("user:" .. id)
    if err then return 500, { error = err } end
    if name == nil then return 404, { error = "not found" } end
    return 200, { id = id, name = name }
end)

return svc
LUA
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
    cache:
      host: 127.0.0.1
      port: $REDIS_PORT
    tamarco_http_report_server:
      port: 0
YML

errors() { awk '/Socket errors|Non-2xx/ { sub(/^ +/, ""); printf "%s; ", $0 }' "$1"; }

# check NAME PORT: the server answers the expected body
check() {
    body=$(curl -fs "http://127.0.0.1:$2$URL_PATH" | sed 's/": /":/g; s/", "/","/g')
    case "$body" in
        *'"name":"Ada Lovelace"'*'"id":"42"'* | *'"id":"42"'*'"name":"Ada Lovelace"'*) ;;
        *) echo "$1 answered $body" >&2; exit 1 ;;
    esac
}

# bench ROUND NAME PORT: wrk against a started server, a line of results
bench() {
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        "http://127.0.0.1:$3$URL_PATH" > "$WORK/wrk-$2.txt"
    echo "$1 $2 $(bench_rps "$WORK/wrk-$2.txt") $(bench_p99_ms "$WORK/wrk-$2.txt")" >> "$WORK/results"
    e=$(errors "$WORK/wrk-$2.txt")
    [ -z "$e" ] || echo "$2: $e" >&2
}

run_mode() {   # PIN
    server_cpu="" wrk_cpu="" redis_cpu=""
    if [ "$1" = 1 ]; then
        server_cpu="taskset -c 1" wrk_cpu="taskset -c 0" redis_cpu="taskset -c 0"
    fi
    : > "$WORK/results"
    : > "$WORK/servers"
    $redis_cpu redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    redis=$!
    PIDS="$PIDS $redis"
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
        sleep 0.05
    done
    redis-cli -p "$REDIS_PORT" set user:42 "Ada Lovelace" >/dev/null

    # every server listens from now on: NAME PORT PID_FOR_RSS PID_TO_STOP per line
    $server_cpu "$HOST_BIN" run "$WORK/service.lua" --settings "$WORK/settings.yml" > "$WORK/tamarco.log" 2>&1 &
    pid=$!
    PIDS="$PIDS $pid"
    bench_wait_http "$OUR_PORT" "$URL_PATH"
    echo "tamarco-host $OUR_PORT $pid $pid" >> "$WORK/servers"

    case " $PEERS " in *" node "*)
        $server_cpu env NODE_PATH="$WORK/node/node_modules" node "$ROOT/bench/peers/e2e_node.js" \
            "$NODE_PORT" "$REDIS_PORT" > "$WORK/node.log" 2>&1 &
        pid=$!
        PIDS="$PIDS $pid"
        bench_wait_http "$NODE_PORT" "$URL_PATH"
        echo "node+ioredis $NODE_PORT $pid $pid" >> "$WORK/servers"
    esac

    case " $PEERS " in *" nginx "*)
        mkdir -p "$WORK/nginx/logs" "$WORK/nginx/client_body"
        ln -sfn /usr/lib/nginx/modules "$WORK/nginx/modules"
        sed -e "s|@PREFIX@|$WORK/nginx|g" -e "s|@PORT@|$NGINX_PORT|g" -e "s|@REDIS_PORT@|$REDIS_PORT|g" \
            "$ROOT/bench/peers/e2e_nginx.conf" > "$WORK/nginx/nginx.conf"
        $server_cpu nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
        pid=$!
        PIDS="$PIDS $pid"
        bench_wait_http "$NGINX_PORT" "$URL_PATH"
        echo "nginx+lua $NGINX_PORT $(pgrep -P "$pid" | head -n1) $pid" >> "$WORK/servers"
    esac

    case " $PEERS " in *" aiohttp "*)
        $server_cpu /usr/bin/python3 "$ROOT/bench/peers/e2e_aiohttp.py" "$AIOHTTP_PORT" "$REDIS_PORT" \
            > "$WORK/aiohttp.log" 2>&1 &
        pid=$!
        PIDS="$PIDS $pid"
        bench_wait_http "$AIOHTTP_PORT" "$URL_PATH"
        echo "aiohttp+redis $AIOHTTP_PORT $pid $pid" >> "$WORK/servers"
    esac

    while read -r name port _ _; do
        check "$name" "$port"
        $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port$URL_PATH" >/dev/null   # warm-up
    done < "$WORK/servers"
    round=1
    while [ "$round" -le "$ROUNDS" ]; do
        while read -r name port _ _; do bench "$round" "$name" "$port"; done < "$WORK/servers"
        round=$((round + 1))
    done
    : > "$WORK/rss"
    while read -r name _ rss_pid stop_pid; do
        echo "$name $(bench_rss_kb "$rss_pid")" >> "$WORK/rss"
        bench_stop "$stop_pid"
    done < "$WORK/servers"
    bench_stop "$redis"

    echo
    echo "== GET $URL_PATH -> redis GET -> JSON: $ROUNDS rounds of wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (pinned: $1)"
    awk -v rounds="$ROUNDS" '
        function median(a, n,    i, j, t) {   # sorts a[1..n]
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        FILENAME ~ /rss$/ { rss[$1] = $2; next }
        {
            if (!($2 in seen)) { seen[$2] = 1; order[++ns] = $2 }
            r[$2, $1] = $3; p[$2, $1] = $4
        }
        END {
            for (i = 1; i <= ns; i++) {
                s = order[i]
                for (k = 1; k <= rounds; k++) { a[k] = r[s, k]; b[k] = p[s, k] }
                mr[s] = median(a, rounds); mp[s] = median(b, rounds)
            }
            ours = order[1]
            for (i = 2; i <= ns; i++) {
                s = order[i]
                for (k = 1; k <= rounds; k++) a[k] = r[ours, k] / r[s, k]
                ratio[s] = median(a, rounds)
            }
            printf "%-16s %12s %10s %10s %16s\n", "server", "requests/s", "p99 ms", "RSS KiB", "ours/theirs req/s"
            for (i = 1; i <= ns; i++) {
                s = order[i]
                printf "%-16s %12.0f %10.2f %10s %16s\n", s, mr[s], mp[s], rss[s],
                    i == 1 ? "" : sprintf("%.2fx", ratio[s])
            }
            for (i = 2; i <= ns; i++) {
                s = order[i]
                line = ""
                for (k = 1; k <= rounds; k++) line = line sprintf(" %.2fx", r[ours, k] / r[s, k])
                printf "ratios vs %-14s requests/s %.2fx (rounds:%s), p99 %.2fx, RSS %.2fx\n", s ":",
                    ratio[s], line, mp[ours] / mp[s], rss[ours] / rss[s]
            }
        }' "$WORK/results" "$WORK/rss"
}

echo "machine: $(nproc) CPUs, $(uname -r); redis $(redis-server --version | awk '{print $3}'); node $(node --version 2>/dev/null)"
for mode in $MODES; do
    [ "$mode" = 1 ] && [ "$(nproc)" -lt 2 ] && continue
    run_mode "$mode"
done
exit 0
