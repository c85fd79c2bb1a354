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
# Prints requests/s, p99, RSS and the ratios ours / theirs.
#
#   sh bench/e2e.sh                    # wrk -t2 -c50 -d10s --latency
#   DURATION=30s CONNECTIONS=100 sh bench/e2e.sh
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
DURATION=${DURATION:-10s}
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

wait_port() {
    i=0
    while ! curl -fs "http://127.0.0.1:$1$URL_PATH" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 150 ]; then
            echo "server on port $1 did not answer" >&2
            cat "$WORK"/*.log "$WORK"/nginx/error.log 2>/dev/null >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}
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
errors() { awk '/Socket errors|Non-2xx/ { sub(/^ +/, ""); printf "%s; ", $0 }' "$1"; }
stop() { for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }

# bench NAME PORT PID_FOR_RSS: wrk against a started server, a line of results
bench() {
    body=$(curl -fs "http://127.0.0.1:$2$URL_PATH" | sed 's/": /":/g; s/", "/","/g')
    case "$body" in
        *'"name":"Ada Lovelace"'*'"id":"42"'* | *'"id":"42"'*'"name":"Ada Lovelace"'*) ;;
        *) echo "$1 answered $body" >&2; exit 1 ;;
    esac
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$2$URL_PATH" >/dev/null   # warm-up
    $wrk_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        "http://127.0.0.1:$2$URL_PATH" > "$WORK/wrk-$1.txt"
    echo "$1 $(rps "$WORK/wrk-$1.txt") $(p99_ms "$WORK/wrk-$1.txt") $(rss_kb "$3")" >> "$WORK/results"
    e=$(errors "$WORK/wrk-$1.txt")
    [ -z "$e" ] || echo "$1: $e" >&2
}

run_mode() {   # PIN
    server_cpu="" wrk_cpu="" redis_cpu=""
    if [ "$1" = 1 ]; then
        server_cpu="taskset -c 1" wrk_cpu="taskset -c 0" redis_cpu="taskset -c 0"
    fi
    : > "$WORK/results"
    $redis_cpu redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    redis=$!
    PIDS="$PIDS $redis"
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
        sleep 0.05
    done
    redis-cli -p "$REDIS_PORT" set user:42 "Ada Lovelace" >/dev/null

    $server_cpu "$HOST_BIN" run "$WORK/service.lua" --settings "$WORK/settings.yml" > "$WORK/tamarco.log" 2>&1 &
    pid=$!
    PIDS="$PIDS $pid"
    wait_port "$OUR_PORT"
    bench tamarco-host "$OUR_PORT" "$pid"
    stop "$pid"

    case " $PEERS " in *" node "*)
        $server_cpu env NODE_PATH="$WORK/node/node_modules" node "$ROOT/bench/peers/e2e_node.js" \
            "$NODE_PORT" "$REDIS_PORT" > "$WORK/node.log" 2>&1 &
        pid=$!
        PIDS="$PIDS $pid"
        wait_port "$NODE_PORT"
        bench node+ioredis "$NODE_PORT" "$pid"
        stop "$pid"
    esac

    case " $PEERS " in *" nginx "*)
        mkdir -p "$WORK/nginx/logs" "$WORK/nginx/client_body"
        ln -sfn /usr/lib/nginx/modules "$WORK/nginx/modules"
        sed -e "s|@PREFIX@|$WORK/nginx|g" -e "s|@PORT@|$NGINX_PORT|g" -e "s|@REDIS_PORT@|$REDIS_PORT|g" \
            "$ROOT/bench/peers/e2e_nginx.conf" > "$WORK/nginx/nginx.conf"
        $server_cpu nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
        pid=$!
        PIDS="$PIDS $pid"
        wait_port "$NGINX_PORT"
        bench nginx+lua "$NGINX_PORT" "$(pgrep -P "$pid" | head -n1)"
        stop "$pid"
    esac

    case " $PEERS " in *" aiohttp "*)
        $server_cpu /usr/bin/python3 "$ROOT/bench/peers/e2e_aiohttp.py" "$AIOHTTP_PORT" "$REDIS_PORT" \
            > "$WORK/aiohttp.log" 2>&1 &
        pid=$!
        PIDS="$PIDS $pid"
        wait_port "$AIOHTTP_PORT"
        bench aiohttp+redis "$AIOHTTP_PORT" "$pid"
        stop "$pid"
    esac
    stop "$redis"

    echo
    echo "== GET $URL_PATH -> redis GET -> JSON: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (pinned: $1)"
    awk '
        { name[NR] = $1; r[NR] = $2; p[NR] = $3; m[NR] = $4 }
        END {
            printf "%-16s %12s %10s %10s %16s\n", "server", "requests/s", "p99 ms", "RSS KiB", "ours/theirs req/s"
            for (i = 1; i <= NR; i++)
                printf "%-16s %12s %10s %10s %16s\n", name[i], r[i], p[i], m[i],
                    i == 1 ? "" : sprintf("%.2fx", r[1] / r[i])
            for (i = 2; i <= NR; i++)
                printf "ratios vs %-14s requests/s %.2fx, p99 %.2fx, RSS %.2fx\n", name[i] ":",
                    r[1] / r[i], p[1] / p[i], m[1] / m[i]
        }' "$WORK/results"
}

echo "machine: $(nproc) CPUs, $(uname -r); redis $(redis-server --version | awk '{print $3}'); node $(node --version 2>/dev/null)"
for mode in $MODES; do
    [ "$mode" = 1 ] && [ "$(nproc)" -lt 2 ] && continue
    run_mode "$mode"
done
exit 0
