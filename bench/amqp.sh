#!/usr/bin/env bash
# bench/amqp.sh: push-with-confirm plus consume-and-ack of N persistent
# 200-byte messages through one RabbitMQ broker, in the same run, for
#   tamarco   tamarco-host's AMQP resource: WINDOW tasks calling
#             svc.amqp:push (each returns when the broker confirmed), then a
#             pull consumer with prefetch PREFETCH whose handler returns at
#             once (acked after it returns);
#   pika      Debian's python3-pika, BlockingConnection with
#             confirm_delivery() (each publish waits for its confirm), then
#             basic_consume with the same prefetch and one basic_ack each;
#   C limit   a minimal librabbitmq program (bench/peers/amqp_c_limit.c):
#             WINDOW unconfirmed publishes in flight, then the same prefetch,
#             one basic.ack per message - the practical limit of the library.
# Each runs against its own durable queue (deleted afterwards). Prints the
# seconds and msg/s of both phases, the overall rate (N / (push + pull)) and
# the ratios. Targets (issue 4): tamarco >= 3x pika, >= 0.8x the C limit.
#
#   bench/amqp.sh [N]            # default N=20000 (the issue's figure: 100000)
#   N=100000 WINDOW=100 PREFETCH=100 ROUNDS=3 TAMARCO_HOST=build/tamarco-host bench/amqp.sh
#
# Uses the broker in TAMARCO_TEST_AMQP_HOST/PORT when set; otherwise starts
# one with scripts/test-services.sh and stops it at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
N=${1:-${N:-20000}}
SIZE=${SIZE:-200}
WINDOW=${WINDOW:-100}
PREFETCH=${PREFETCH:-100}
ROUNDS=${ROUNDS:-3}
PY=/usr/bin/python3

[ -x "$HOST_BIN" ] || { echo "no host binary at $HOST_BIN (build first or set TAMARCO_HOST)" >&2; exit 1; }
if ! "$PY" -c 'import pika' 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq python3-pika >/dev/null; fi
    "$PY" -c 'import pika' || { echo "python3-pika is missing (apt-get install python3-pika)" >&2; exit 1; }
fi

TMP=$(mktemp -d)
OWN_SERVICES=
cleanup() {
    if [ -n "$OWN_SERVICES" ]; then "$ROOT/scripts/test-services.sh" stop "$OWN_SERVICES" >/dev/null 2>&1 || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap "exit 1" INT TERM HUP PIPE

if [ -z "${TAMARCO_TEST_AMQP_HOST:-}" ]; then
    OWN_SERVICES=$(mktemp -d /tmp/tamarco-services.XXXXXX)
    TAMARCO_SERVICES=rabbitmq "$ROOT/scripts/test-services.sh" start "$OWN_SERVICES" >/dev/null
    . "$OWN_SERVICES/env.sh"
fi
AHOST=$TAMARCO_TEST_AMQP_HOST
APORT=$TAMARCO_TEST_AMQP_PORT

cc -O2 -o "$TMP/amqp_c_limit" "$ROOT/bench/peers/amqp_c_limit.c" -lrabbitmq

cat > "$TMP/settings.yml" <<EOF
system:
  logging:
    profile: PRODUCTION
  resources:
    amqp:
      host: "$AHOST"
      port: $APORT
EOF
cat > "$TMP/bench_service.lua" <<'EOF'
local tamarco = require "tamarco"
local amqp = require "tamarco.resources.amqp"
local tasks = require "tamarco.core.tasks"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"

local N = tonumber(os.getenv("BENCH_N"))
local SIZE = tonumber(os.getenv("BENCH_SIZE"))
local WINDOW = tonumber(os.getenv("BENCH_WINDOW"))
local PREFETCH = tonumber(os.getenv("BENCH_PREFETCH"))
local QUEUE = os.getenv("BENCH_QUEUE")

local svc = tamarco.service { name = "amqp_bench", resources = { amqp = amqp.client() }, report_server = false }

svc:task("bench", function()
    local body = ("x"):rep(SIZE)
    local sent = 0
    local t0 = timer.hrtime()
    local pushers = tasks.group()
    for w = 1, WINDOW do
        pushers:spawn("push" .. w, function()
            while sent < N do
                sent = sent + 1
                assert(svc.amqp:push(QUEUE, body, { codec = "raw" }))
            end
        end)
    end
    assert(pushers:wait())
    local push_s = (timer.hrtime() - t0) / 1e9

    local me = scheduler.current()
    local got, finished = 0, false
    t0 = timer.hrtime()
    assert(svc.amqp:pull(QUEUE, function(msg)
        got = got + 1
        if got == N then finished = true; scheduler.wake(me) end
    end, { codec = "raw", prefetch = PREFETCH }))
    while not finished do scheduler.suspend() end
    local pull_s = (timer.hrtime() - t0) / 1e9
    io.stdout:write(("push %.3f pull %.3f\n"):format(push_s, pull_s))
    io.stdout:flush()
    svc.amqp:delete_queue("push_pull", QUEUE)
    svc:stop_service("bench done")
end)

return svc
EOF

run_tamarco() {
    BENCH_N=$N BENCH_SIZE=$SIZE BENCH_WINDOW=$WINDOW BENCH_PREFETCH=$PREFETCH BENCH_QUEUE="bench_tamarco_$$_$1" \
        "$HOST_BIN" run "$TMP/bench_service.lua" --settings "$TMP/settings.yml" 2>"$TMP/tamarco.err" \
        | grep '^push ' || { cat "$TMP/tamarco.err" >&2; exit 1; }
}
run_pika() { "$PY" "$ROOT/bench/peers/amqp_pika.py" "$AHOST" "$APORT" "bench_pika_$$_$1" "$N" "$SIZE" "$PREFETCH"; }
run_c() { "$TMP/amqp_c_limit" "$AHOST" "$APORT" "bench_c_$$_$1" "$N" "$SIZE" "$WINDOW" "$PREFETCH"; }

# Rounds alternate the three contenders (the broker and the machine drift);
# each keeps its best (smallest push+pull) round: "push pull".
keep_best() {   # current_best new_line -> best "push pull"
    awk -v cur="$1" -v line="$2" 'BEGIN{
        split(line, L, " "); n = L[2] + L[4]
        if (cur == "") { print L[2], L[4]; exit }
        split(cur, C, " "); if (n < C[1] + C[2]) print L[2], L[4]; else print cur }'
}

echo "AMQP: $N persistent messages of $SIZE bytes, push with confirms then consume+ack;"
echo "      broker rabbitmq $AHOST:$APORT; window $WINDOW, prefetch $PREFETCH; best of $ROUNDS; $(nproc) cores"
C= T= P=
for r in $(seq 1 "$ROUNDS"); do
    C=$(keep_best "$C" "$(run_c "$r")")
    T=$(keep_best "$T" "$(run_tamarco "$r")")
    P=$(keep_best "$P" "$(run_pika "$r")")
done

report() {
    awk -v n="$N" -v name="$1" -v push="$2" -v pull="$3" 'BEGIN{
        printf "  %-10s push %7.2f s %8.0f msg/s   pull %7.2f s %8.0f msg/s   overall %8.0f msg/s\n",
            name, push, n/push, pull, n/pull, n/(push+pull) }'
}
report "C limit" $C
report "tamarco" $T
report "pika" $P
awk -v t="$T" -v p="$P" -v c="$C" 'BEGIN{
    split(t, T, " "); split(p, P, " "); split(c, C, " ")
    tt = T[1] + T[2]; pt = P[1] + P[2]; ct = C[1] + C[2]
    printf "  ratios (overall): tamarco/pika %.2fx (target >= 3), tamarco/C limit %.2fx (target >= 0.8)\n", pt/tt, ct/tt
    printf "  ratios (push):    tamarco/pika %.2fx, tamarco/C limit %.2fx\n", P[1]/T[1], C[1]/T[1]
    printf "  ratios (pull):    tamarco/pika %.2fx, tamarco/C limit %.2fx\n", P[2]/T[2], C[2]/T[2]
}'
