#!/usr/bin/env bash
# bench/redis_get.sh: GETs per second through tamarco's Redis resource (50
# tasks looping GET on ONE resource: one connection, commands of concurrent
# tasks pipelined automatically) against two redis-benchmark runs on the
# same redis-server, in the same run:
#   -c 50 -P 1 -t get   50 connections, one command in flight each
#                       (what 50 clients without pipelining get)
#   -c 1 -P 50 -t get   one connection, 50 commands per write: the wire's
#                       limit for our pattern (one auto-pipelined connection)
# Prints the rates and the ratios ours/theirs.
#
#   bench/redis_get.sh                          # 50 tasks, 500 000 GETs each side
#   TASKS=50 TOTAL=500000 ROUNDS=3 TAMARCO_HOST=build/tamarco-host bench/redis_get.sh
#
# Starts its own redis-server on a free loopback port in a temp dir (set
# REDIS_PORT to use a running one instead). Both sides GET the same key,
# `key:__rand_int__` (redis-benchmark's key without -r), holding a 3-byte
# value (redis-benchmark's default data size), so both get bulk replies.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
TASKS=${TASKS:-50}
TOTAL=${TOTAL:-500000}
ROUNDS=${ROUNDS:-1}
PER_TASK=$((TOTAL / TASKS))
TOTAL=$((PER_TASK * TASKS))

[ -x "$HOST_BIN" ] || { echo "no host binary at $HOST_BIN (build first or set TAMARCO_HOST)" >&2; exit 1; }
for cmd in redis-server redis-benchmark redis-cli; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "$cmd not found (apt-get install redis-server redis-tools)" >&2; exit 1; }
done

TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap "exit 1" INT TERM HUP PIPE   # so that the EXIT trap stops the server

if [ -z "${REDIS_PORT:-}" ]; then
    REDIS_PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
        --logfile "$TMP/redis.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
        sleep 0.05
    done
fi
[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] || { echo "redis-server did not start" >&2; exit 1; }
redis-cli -p "$REDIS_PORT" set 'key:__rand_int__' xxx >/dev/null

cat > "$TMP/bench_spec.lua" <<EOF
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local redis = require "tamarco.resources.redis"
testing.timeout_ms = 600000
it("bench", function()
    testing.run(function()
        local cache = assert(redis.client():connect_to { host = "127.0.0.1", port = $REDIS_PORT })
        local key, tasks, per_task = "key:__rand_int__", $TASKS, $PER_TASK
        assert(cache:get(key) == "xxx")   -- warm-up
        local left, failures, me = tasks, 0, scheduler.current()
        local t0 = timer.hrtime()
        for _ = 1, tasks do
            local co = tamarco.spawn(function()
                for _ = 1, per_task do
                    if cache:get(key) ~= "xxx" then failures = failures + 1 end
                end
            end)
            scheduler.on_exit(co, function() left = left - 1 if left == 0 then scheduler.wake(me) end end)
        end
        scheduler.suspend()
        local secs = (timer.hrtime() - t0) / 1e9
        io.stderr:write(("TAMARCO_RPS %.0f FAILURES %d\n"):format(tasks * per_task / secs, failures))
        cache:close()
    end)
end)
EOF

tamarco_rps() {
    local out failures
    out=$(cd "$ROOT" && "$HOST_BIN" test "$TMP/bench_spec.lua" 2>&1 >/dev/null) || { echo "$out" >&2; exit 1; }
    failures=$(echo "$out" | awk '/TAMARCO_RPS/ { print $4 }')
    [ "$failures" = 0 ] || { echo "tamarco redis: $failures failed GETs" >&2; echo "$out" >&2; exit 1; }
    echo "$out" | awk '/TAMARCO_RPS/ { print $2 }'
}

peer_rps() {   # CONNECTIONS PIPELINE
    # "GET: 123456.79 requests per second, p50=..." (older versions: no p50)
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$1" -P "$2" -t get -n "$TOTAL" -q 2>/dev/null |
        tr '\r' '\n' | awk '/^GET: [0-9.]+ requests per second/ { printf "%.0f", $2 }'
}

echo "redis: $(redis-server --version | awk '{print $3}') at 127.0.0.1:$REDIS_PORT"
echo "load: $TOTAL GETs per side, $TASKS concurrent (tasks on one resource vs redis-benchmark connections)"
best_t=0 best_p=0 best_w=0
for r in $(seq "$ROUNDS"); do
    t=$(tamarco_rps)
    p=$(peer_rps "$TASKS" 1)
    w=$(peer_rps 1 "$TASKS")
    [ -n "$p" ] && [ -n "$w" ] || { echo "could not parse redis-benchmark's output" >&2; exit 1; }
    echo "round $r: tamarco-host ${t} req/s   redis-benchmark -c $TASKS -P 1: ${p} req/s   -c 1 -P $TASKS: ${w} req/s"
    [ "$t" -gt "$best_t" ] && best_t=$t
    [ "$p" -gt "$best_p" ] && best_p=$p
    [ "$w" -gt "$best_w" ] && best_w=$w
done
awk -v t="$best_t" -v p="$best_p" -v w="$best_w" -v n="$TASKS" 'BEGIN {
    printf "tamarco-host redis (%d tasks, 1 connection): %d req/s\n", n, t
    printf "redis-benchmark -c %d -P 1 -t get:           %d req/s   ratio %.2fx\n", n, p, t / p
    printf "redis-benchmark -c 1 -P %d -t get:           %d req/s   ratio %.2fx (same wire pattern)\n", n, w, t / w
}'
