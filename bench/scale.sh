#!/bin/sh
# Cost as work grows, each part a table and a plot (gnuplot PNG) in
# bench/results/:
#   conns  resident memory per idle keep-alive connection, 100 to 10 000
#          connections (one GET answered on each, then idle), for
#          tamarco-host (services/hello), nginx + Lua module and Node's http;
#          a fresh server per step, (RSS with N - RSS before) / N
#   tasks  memory per sleeping task, 1 000 to 1 000 000: tamarco tasks in
#          tamarco.sleep, Node async functions awaiting a timer promise,
#          Python asyncio tasks in asyncio.sleep; (RSS with N - RSS with 0) / N
#   rps    requests/s and p99 of the hello service from 1 to 1 000
#          concurrent connections (wrk), tamarco-host against nginx and Node
#   amqp   consume + ack rate: bench/amqp.sh (tamarco, pika, the C loop) and
#          Node's amqplib (npm, into a temporary directory) on the same broker
#
#   sh bench/scale.sh                       # every part
#   PARTS="conns rps" sh bench/scale.sh
#   CONNS="100 1000 10000" TASKS="1000 100000" sh bench/scale.sh
#   DURATION=5s sh bench/scale.sh           # per wrk step of the rps part
#
# Raises its open-file limit (root may raise the hard limit). Needs wrk,
# nginx-light, libnginx-mod-http-lua, nodejs, npm, gnuplot (apt-get when
# run as root and missing). Writes only into bench/results/.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
BUILD_DIR=${BUILD_DIR:-$ROOT/build-bench}
RESULTS=$ROOT/bench/results
PARTS=${PARTS:-conns tasks rps amqp}
CONNS=${CONNS:-100 1000 3000 10000}
TASKS=${TASKS:-1000 10000 100000 1000000}
RPS_CONNS=${RPS_CONNS:-1 10 50 100 300 1000}
DURATION=${DURATION:-5s}
AMQP_N=${AMQP_N:-20000}

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing="$missing libnginx-mod-http-lua"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v gnuplot >/dev/null 2>&1 || missing="$missing gnuplot"
bench_install "$missing"

bench_build_host

# 10 000 connections on each side of loopback, plus the servers' own
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -H -n)"

WORK=$(mktemp -d /tmp/tamarco-scale.XXXXXX)
chmod 755 "$WORK"
PIDS=""
cleanup() {
    exec 3>&- 2>/dev/null || true
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP
mkdir -p "$RESULTS"
STAMP="$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(uname -r)"

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_line() {   # FILE PATTERN
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le 1200 ] || { echo "no '$2' in $1" >&2; cat "$1" >&2; exit 1; }
        sleep 0.1
    done
}
# plot FILE.dat TITLE XLABEL YLABEL LOGX COLUMNS...: a PNG next to the table
plot() {
    dat=$1 title=$2 xlabel=$3 ylabel=$4 logx=$5
    shift 5
    cmd="set terminal pngcairo size 800,500; set output '${dat%.dat}.png'; set title '$title'"
    cmd="$cmd; set xlabel '$xlabel'; set ylabel '$ylabel'; set key left top; set grid"
    [ "$logx" = 1 ] && cmd="$cmd; set logscale x"
    col=2 sep="; plot"
    for name in "$@"; do
        cmd="$cmd$sep '$dat' using 1:$col with linespoints title '$name'"
        col=$((col + 1)) sep=","
    done
    gnuplot -e "$cmd"
}

# ---- servers of the hello service ----
start_server() {   # NAME PORT -> sets SERVER_PID (the process holding the connections)
    case $1 in
    tamarco-host)
        cat > "$WORK/hello.yml" <<YML
system:
  logging: { profile: PRODUCTION, stdout: true }
  resources:
    api: { host: 127.0.0.1, port: $2, max_connections: 20000 }
    tamarco_http_report_server: { port: 0 }
YML
        "$HOST_BIN" run "$ROOT/services/hello/service.lua" --settings "$WORK/hello.yml" > "$WORK/tamarco.log" 2>&1 &
        SERVER_PID=$!
        PIDS="$PIDS $SERVER_PID"
        ;;
    nginx)
        rm -rf "$WORK/nginx"
        mkdir -p "$WORK/nginx/logs" "$WORK/nginx/client_body"
        ln -sfn /usr/lib/nginx/modules "$WORK/nginx/modules"
        sed -e "s|@PREFIX@|$WORK/nginx|g" -e "s|@PORT@|$2|g" \
            -e "s|worker_connections 4096;|worker_connections 20000;|" \
            -e "s|^worker_processes 1;|worker_processes 1;\nworker_rlimit_nofile 30000;|" \
            "$ROOT/bench/http_hello_nginx.conf" > "$WORK/nginx/nginx.conf"
        nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
        master=$!
        PIDS="$PIDS $master"
        bench_wait_http "$2" /hello/world
        SERVER_PID=$(pgrep -P "$master" | head -n1)
        SERVER_STOP=$master
        return
        ;;
    node)
        node "$ROOT/bench/peers/hello_node.js" "$2" > "$WORK/node.log" 2>&1 &
        SERVER_PID=$!
        PIDS="$PIDS $SERVER_PID"
        ;;
    esac
    SERVER_STOP=$SERVER_PID
    bench_wait_http "$2" /hello/world
}

SERVERS="tamarco-host nginx node"

part_conns() {
    out=$RESULTS/scale_connections.dat
    echo "# KiB of RSS per idle keep-alive connection ($STAMP)" > "$out"
    echo "# connections $SERVERS" >> "$out"
    for n in $CONNS; do
        line="$n"
        for server in $SERVERS; do
            port=$(free_port)
            start_server "$server" "$port"
            sleep 0.3
            before=$(bench_rss_kb "$SERVER_PID")
            rm -f "$WORK/hold" "$WORK/clients.out"
            mkfifo "$WORK/hold"
            /usr/bin/python3 "$ROOT/bench/peers/idle_clients.py" "$port" "$n" /hello/world \
                < "$WORK/hold" > "$WORK/clients.out" 2>&1 &
            clients=$!
            exec 3>"$WORK/hold"
            wait_line "$WORK/clients.out" ready
            sleep 0.5
            after=$(bench_rss_kb "$SERVER_PID")
            exec 3>&-
            wait "$clients" 2>/dev/null || true
            bench_stop "$SERVER_STOP"
            line="$line $(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN { printf "%.2f", (a - b) / n }')"
        done
        echo "$line" >> "$out"
    done
    echo
    echo "== memory per idle keep-alive connection (KiB), $STAMP"
    sed -e 1d -e "s/^# //" "$out" | column -t
    tail -n1 "$out" | awk '{ printf "at %s connections: tamarco-host/nginx %.2fx, tamarco-host/node %.2fx\n", $1, $2 / $3, $2 / $4 }'
    plot "$out" "RSS per idle keep-alive connection" connections "KiB per connection" 1 $SERVERS
}

part_tasks() {
    out=$RESULTS/scale_tasks.dat
    echo "# bytes of RSS per sleeping task ($STAMP)" > "$out"
    echo "# tasks tamarco-host node-promises python-asyncio" >> "$out"
    cat > "$WORK/sleepers.lua" <<'LUA'
local tamarco = require "tamarco"
local n = tonumber(os.getenv("SLEEPERS"))
local svc = tamarco.service { name = "sleepers", report_server = false }
local function sleeper() tamarco.sleep(3600 * 1000) end
function svc:post_start()
    tamarco.spawn(function()
        for _ = 1, n do tamarco.spawn(sleeper) end
        tamarco.sleep(300)
        collectgarbage()
        local f = io.open("/proc/self/status")
        local rss = f:read("*a"):match("VmRSS:%s+(%d+)")
        f:close()
        io.stdout:write("RSS ", rss, "\n")
        io.stdout:flush()
    end)
end
return svc
LUA
    printf 'system:\n  logging: { profile: PRODUCTION, stdout: false }\n' > "$WORK/sleepers.yml"
    sleepers_rss() {   # WHO N
        rm -f "$WORK/sleepers.out"
        case $1 in
        tamarco-host) SLEEPERS=$2 "$HOST_BIN" run "$WORK/sleepers.lua" --settings "$WORK/sleepers.yml" > "$WORK/sleepers.out" 2>&1 & ;;
        node) node "$ROOT/bench/peers/sleepers_node.js" "$2" > "$WORK/sleepers.out" 2>&1 & ;;
        python) /usr/bin/python3 "$ROOT/bench/peers/sleepers_asyncio.py" "$2" > "$WORK/sleepers.out" 2>&1 & ;;
        esac
        pid=$!
        PIDS="$PIDS $pid"
        wait_line "$WORK/sleepers.out" "^RSS"
        bench_stop "$pid"
        awk '/^RSS/ { print $2 }' "$WORK/sleepers.out"
    }
    base_t=$(sleepers_rss tamarco-host 0) base_n=$(sleepers_rss node 0) base_p=$(sleepers_rss python 0)
    for n in $TASKS; do
        t=$(sleepers_rss tamarco-host "$n") nd=$(sleepers_rss node "$n") p=$(sleepers_rss python "$n")
        awk -v n="$n" -v t="$t" -v bt="$base_t" -v nd="$nd" -v bn="$base_n" -v p="$p" -v bp="$base_p" \
            'BEGIN { printf "%d %.0f %.0f %.0f\n", n, (t - bt) * 1024 / n, (nd - bn) * 1024 / n, (p - bp) * 1024 / n }' >> "$out"
    done
    echo
    echo "== memory per sleeping task (bytes), $STAMP"
    sed -e 1d -e "s/^# //" "$out" | column -t
    tail -n1 "$out" | awk '{ printf "at %s tasks: tamarco-host/node %.2fx, tamarco-host/asyncio %.2fx\n", $1, $2 / $3, $2 / $4 }'
    plot "$out" "RSS per sleeping task" tasks "bytes per task" 1 tamarco-host node-promises python-asyncio
}

part_rps() {
    out=$RESULTS/scale_rps.dat
    echo "# requests/s of the hello service by concurrent connections, wrk -d$DURATION ($STAMP)" > "$out"
    echo "# connections $SERVERS p99ms:tamarco-host p99ms:nginx p99ms:node" >> "$out"
    # all three listen at once (idle ones cost nothing); each step measures
    # them one after the other, so a change of the machine's load hits all
    ports="" stops=""
    for server in $SERVERS; do
        port=$(free_port)
        start_server "$server" "$port"
        ports="$ports $port" stops="$stops $SERVER_STOP"
    done
    for c in $RPS_CONNS; do
        t=2
        [ "$c" -lt 2 ] && t=1
        set -- $ports
        for server in $SERVERS; do
            port=$1
            shift
            wrk -t$t -c"$c" -d1s "http://127.0.0.1:$port/hello/world" >/dev/null
            wrk -t$t -c"$c" -d"$DURATION" --latency "http://127.0.0.1:$port/hello/world" > "$WORK/wrk.txt"
            r=$(awk '/^Requests\/sec:/ { print $2 }' "$WORK/wrk.txt")
            p=$(awk '$1 == "99%" { v = $2
                if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
                else if (v ~ /ms$/) { sub(/ms$/, "", v); print v }
                else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 } }' "$WORK/wrk.txt")
            echo "$server $c $r $p" >> "$WORK/rps.raw"
        done
    done
    bench_stop $stops
    for c in $RPS_CONNS; do
        awk -v c="$c" '$2 == c { r[$1] = $3; p[$1] = $4 }
            END { printf "%s %s %s %s %s %s %s\n", c, r["tamarco-host"], r["nginx"], r["node"],
                  p["tamarco-host"], p["nginx"], p["node"] }' "$WORK/rps.raw" >> "$out"
    done
    echo
    echo "== hello service: requests/s and p99 by concurrent connections, $STAMP"
    sed -e 1d -e "s/^# //" "$out" | column -t
    awk '!/^#/ { printf "%5s connections: tamarco-host/nginx %.2fx, tamarco-host/node %.2fx\n", $1, $2 / $3, $2 / $4 }' "$out"
    plot "$out" "hello service: requests/s by concurrent connections" connections "requests/s" 1 $SERVERS
}

part_amqp() {
    out=$RESULTS/scale_amqp.txt
    # a broker for both: the one in TAMARCO_TEST_AMQP_HOST/PORT or our own
    if [ -z "${TAMARCO_TEST_AMQP_PORT:-}" ]; then
        mkdir -p "$WORK/services"
        TAMARCO_SERVICES=rabbitmq "$ROOT/scripts/test-services.sh" start "$WORK/services" >/dev/null
        STOP_BROKER="$ROOT/scripts/test-services.sh stop $WORK/services"
        . "$WORK/services/env.sh"
    fi
    echo "installing amqplib into $WORK/node ..."
    mkdir -p "$WORK/node"
    (cd "$WORK/node" && npm init -y >/dev/null 2>&1 &&
        npm install --no-audit --no-fund --silent amqplib >"$WORK/npm.log" 2>&1) ||
        { cat "$WORK/npm.log" >&2; ${STOP_BROKER:-true}; exit 1; }
    amqp_out=$(ROUNDS=1 "$ROOT/bench/amqp.sh" "$AMQP_N" 2>&1) || { echo "$amqp_out" >&2; ${STOP_BROKER:-true}; exit 1; }
    node_out=$(NODE_PATH="$WORK/node/node_modules" node "$ROOT/bench/peers/amqp_node.js" \
        "amqp://guest:guest@${TAMARCO_TEST_AMQP_HOST:-127.0.0.1}:$TAMARCO_TEST_AMQP_PORT/" "$AMQP_N" 2>&1) ||
        { echo "$node_out" >&2; ${STOP_BROKER:-true}; exit 1; }
    ${STOP_BROKER:-true}
    {
        echo "# AMQP consume + ack, $AMQP_N persistent messages ($STAMP)"
        echo "$amqp_out"
        echo "$node_out"
        printf '%s\n%s\n' "$amqp_out" "$node_out" | awk '
            $1 == "tamarco" { tp = $10; to = $13 } $1 == "node" { np = $11; no = $14 }
            END { if (np && no) printf "  ratios vs node amqplib: pull (consume+ack) %.2fx, overall %.2fx\n", tp / np, to / no }'
    } > "$out"
    echo
    echo "== AMQP consume + ack, $STAMP"
    cat "$out"
}

echo "machine: $STAMP; open files: $(ulimit -n)"
for part in $PARTS; do
    "part_$part"
done
exit 0
