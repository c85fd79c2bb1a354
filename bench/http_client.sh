#!/usr/bin/env bash
# bench/http_client.sh: requests/s of tamarco's HTTP client (libcurl multi on
# the host's loop, one task per connection) against curl's own
# `--parallel --parallel-max N`, both fetching the same number of URLs of a
# small static file from the same local nginx (python http.server when nginx
# cannot be installed), in the same run. Prints both rates and the ratio.
#
#   bench/http_client.sh                 # 50 tasks x 1000 GETs
#   TASKS=50 PER_TASK=1000 ROUNDS=3 TAMARCO_HOST=build/tamarco-host bench/http_client.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
TASKS=${TASKS:-50}
PER_TASK=${PER_TASK:-1000}
ROUNDS=${ROUNDS:-3}
TOTAL=$((TASKS * PER_TASK))

[ -x "$HOST_BIN" ] || { echo "no host binary at $HOST_BIN (build first or set TAMARCO_HOST)" >&2; exit 1; }

if ! command -v nginx >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq nginx-light >/dev/null 2>&1 || true
fi
command -v curl >/dev/null 2>&1 || apt-get install -y -qq curl >/dev/null

TMP=$(mktemp -d)
chmod 755 "$TMP"   # nginx workers run as www-data
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap "exit 1" INT TERM HUP PIPE   # so that the EXIT trap stops the server

PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$TMP/www" "$TMP/logs"
head -c 512 /dev/zero | tr '\0' 'x' > "$TMP/www/small.txt"
URL="http://127.0.0.1:$PORT/small.txt"

if command -v nginx >/dev/null 2>&1; then
    SERVER="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 1 worker"
    cat > "$TMP/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/body;
    proxy_temp_path $TMP/proxy;
    fastcgi_temp_path $TMP/fastcgi;
    uwsgi_temp_path $TMP/uwsgi;
    scgi_temp_path $TMP/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$PORT reuseport;
        root $TMP/www;
    }
}
EOF
    nginx -p "$TMP" -c "$TMP/nginx.conf" &
    SERVER_PID=$!
else
    SERVER="python3 http.server (nginx unavailable)"
    (cd "$TMP/www" && exec /usr/bin/python3 -m http.server --bind 127.0.0.1 "$PORT" >/dev/null 2>&1) &
    SERVER_PID=$!
fi
for _ in $(seq 100); do curl -sf -o /dev/null "$URL" && break; sleep 0.05; done
curl -sf -o /dev/null "$URL" || { echo "server did not start" >&2; cat "$TMP/logs/error.log" >&2 2>/dev/null; exit 1; }

# curl --parallel: one config file with TOTAL URLs.
for _ in $(seq "$TOTAL"); do printf 'url = "%s"\noutput = "/dev/null"\n' "$URL"; done > "$TMP/urls.cfg"
curl_rps() {
    local t0 t1
    t0=$(date +%s%N)
    curl -s --fail --parallel --parallel-immediate --parallel-max "$TASKS" -K "$TMP/urls.cfg" 2>/dev/null ||
        { echo "curl --parallel failed" >&2; exit 1; }
    t1=$(date +%s%N)
    awk -v n="$TOTAL" -v ns=$((t1 - t0)) 'BEGIN { printf "%.0f", n / (ns / 1e9) }'
}

# tamarco: TASKS tasks, each PER_TASK sequential GETs through one client.
cat > "$TMP/bench_spec.lua" <<EOF
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local client = require("tamarco.resources.http_client").new()
testing.timeout_ms = 600000
it("bench", function()
    testing.run(function()
        local url, tasks, per_task = "$URL", $TASKS, $PER_TASK
        assert(client:get(url) == 200)   -- warm-up
        local left, failures, me = tasks, 0, scheduler.current()
        local t0 = timer.hrtime()
        for _ = 1, tasks do
            local co = tamarco.spawn(function()
                for _ = 1, per_task do
                    local status, body = client:get(url)
                    if status ~= 200 or #body ~= 512 then failures = failures + 1 end
                end
            end)
            scheduler.on_exit(co, function() left = left - 1 if left == 0 then scheduler.wake(me) end end)
        end
        scheduler.suspend()
        local secs = (timer.hrtime() - t0) / 1e9
        io.stderr:write(("TAMARCO_RPS %.0f FAILURES %d\n"):format(tasks * per_task / secs, failures))
    end)
end)
EOF
tamarco_rps() {
    local out
    out=$(cd "$ROOT" && "$HOST_BIN" test "$TMP/bench_spec.lua" 2>&1 >/dev/null) || { echo "$out" >&2; exit 1; }
    local failures
    failures=$(echo "$out" | awk '/TAMARCO_RPS/ { print $4 }')
    [ "$failures" = 0 ] || { echo "tamarco client: $failures failed requests" >&2; exit 1; }
    echo "$out" | awk '/TAMARCO_RPS/ { print $2 }'
}

echo "server: $SERVER at $URL (512-byte file)"
echo "load: $TOTAL GETs per run, $TASKS concurrent; best of $ROUNDS rounds"
echo "libcurl: $(curl --version | head -1)"
best_t=0 best_c=0
for r in $(seq "$ROUNDS"); do
    t=$(tamarco_rps)
    c=$(curl_rps)
    echo "round $r: tamarco-host client ${t} req/s   curl --parallel ${c} req/s"
    [ "$t" -gt "$best_t" ] && best_t=$t
    [ "$c" -gt "$best_c" ] && best_c=$c
done
awk -v t="$best_t" -v c="$best_c" 'BEGIN {
    printf "tamarco-host http_client: %d req/s\n", t
    printf "curl --parallel-max:      %d req/s\n", c
    printf "ratio tamarco/curl:       %.2fx\n", t / c
}'
