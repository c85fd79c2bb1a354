#!/usr/bin/env bash
# bench/settings_latency.sh: how long a change in etcd takes to reach a
# running service's `on_settings_change` (etcd watch through the JSON
# gateway -> settings store -> hook). No peer: prints median and p99 of two
# measurements, over CHANGES changes each:
#
#   1. etcdctl: the time from starting `etcdctl put` to the hook being called
#      in the service (wall clocks of the same machine). This includes
#      etcdctl's own start-up, so the median of `etcdctl put` alone (start to
#      exit) is printed next to it.
#   2. in-process: the service puts the value itself with tamarco.etcd
#      (HTTP to the gateway) and waits for its own hook: put -> hook, on the
#      monotonic clock, without any process start-up.
#
#   bench/settings_latency.sh                    # starts its own etcd
#   TAMARCO_TEST_ETCD_HOST=127.0.0.1 TAMARCO_TEST_ETCD_PORT=2379 CHANGES=100 \
#       TAMARCO_HOST=build/tamarco-host bench/settings_latency.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
CHANGES=${CHANGES:-100}
[ -x "$HOST_BIN" ] || { echo "no host binary at $HOST_BIN (build first or set TAMARCO_HOST)" >&2; exit 1; }
command -v etcdctl >/dev/null || { echo "etcdctl is needed (apt-get install etcd-client)" >&2; exit 1; }

TMP=$(mktemp -d)
OWN_SERVICES=
SERVICE_PID=
cleanup() {
    [ -n "$SERVICE_PID" ] && kill "$SERVICE_PID" 2>/dev/null || true
    [ -n "$OWN_SERVICES" ] && "$ROOT/scripts/test-services.sh" stop "$OWN_SERVICES" >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap "exit 1" INT TERM HUP PIPE

if [ -z "${TAMARCO_TEST_ETCD_PORT:-}" ]; then
    OWN_SERVICES=$(mktemp -d /tmp/tamarco-services.XXXXXX)
    TAMARCO_SERVICES=etcd "$ROOT/scripts/test-services.sh" start "$OWN_SERVICES" >/dev/null
    . "$OWN_SERVICES/env.sh"
fi
HOST=${TAMARCO_TEST_ETCD_HOST:-127.0.0.1}
PORT=$TAMARCO_TEST_ETCD_PORT
ENDPOINT="http://$HOST:$PORT"
SVC=latency_$$
KEY=/system/microservices/$SVC/counter
export ETCDCTL_API=3

cat > "$TMP/service.lua" <<EOF
local tamarco = require "tamarco"
local timer = require "tamarco.c.timer"
local scheduler = require "tamarco.c.scheduler"
local svc = tamarco.service { name = "$SVC" }
local out = assert(io.open("$TMP/hook.log", "w"))
local waiting
function svc:on_settings_change(key, value)
    if not key:find("counter", 1, true) then return end
    local hr, wall = timer.hrtime(), timer.time()
    out:write(("%s %.6f %.0f\n"):format(tostring(value), wall, hr))
    out:flush()
    if waiting and waiting.value == value and not waiting.at then
        waiting.at = hr
        if waiting.suspended then scheduler.wake(waiting.co) end
    end
end
function svc:post_start()
    print("BENCH-READY")
    io.stdout:flush()
end
-- in-process mode: started by a key the driver writes
svc:task("inprocess", function(self)
    while not self.settings:get("run_inprocess", false) do tamarco.sleep(50) end
    local etcd = require("tamarco.clients.etcd").new { host = "$HOST", port = $PORT }
    local samples = {}
    for i = 1, $CHANGES do
        local value = "inproc-" .. i
        local w = { value = value, co = scheduler.current() }
        waiting = w
        local t0 = timer.hrtime()
        assert(etcd:put("$KEY", '"' .. value .. '"'))
        if not w.at then w.suspended = true; scheduler.suspend() end
        samples[#samples + 1] = w.at - t0
        tamarco.sleep(5)
    end
    local f = assert(io.open("$TMP/inproc.log", "w"))
    for _, ns in ipairs(samples) do f:write(("%.0f\n"):format(ns)) end
    f:close()
    print("BENCH-INPROC-DONE")
    io.stdout:flush()
end)
return svc
EOF

etcdctl --endpoints="$ENDPOINT" del --prefix "/system/microservices/$SVC/" >/dev/null
TAMARCO_ETCD_HOST=$HOST TAMARCO_ETCD_PORT=$PORT TAMARCO_YML_FILE= \
TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION \
TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0 \
    "$HOST_BIN" run "$TMP/service.lua" > "$TMP/service.out" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 200); do grep -q BENCH-READY "$TMP/service.out" 2>/dev/null && break; sleep 0.05; done
grep -q BENCH-READY "$TMP/service.out" || { cat "$TMP/service.out"; echo "service did not start" >&2; exit 1; }

# 1. etcdctl put -> hook
: > "$TMP/puts.log"
for i in $(seq "$CHANGES"); do
    t0=$(date +%s.%N)
    etcdctl --endpoints="$ENDPOINT" put "$KEY" "$i" >/dev/null
    t1=$(date +%s.%N)
    echo "$i $t0 $t1" >> "$TMP/puts.log"
    for _ in $(seq 100); do grep -q "^$i " "$TMP/hook.log" && break; sleep 0.01; done
done

# 2. in-process put -> hook
etcdctl --endpoints="$ENDPOINT" put "/system/microservices/$SVC/run_inprocess" true >/dev/null
for _ in $(seq 600); do grep -q BENCH-INPROC-DONE "$TMP/service.out" && break; sleep 0.05; done
grep -q BENCH-INPROC-DONE "$TMP/service.out" || { cat "$TMP/service.out"; echo "in-process run did not finish" >&2; exit 1; }
kill "$SERVICE_PID"; wait "$SERVICE_PID" 2>/dev/null || true; SERVICE_PID=
etcdctl --endpoints="$ENDPOINT" del --prefix "/system/microservices/$SVC/" >/dev/null

/usr/bin/python3 - "$TMP" "$CHANGES" <<'EOF'
import sys, statistics
tmp, changes = sys.argv[1], int(sys.argv[2])
hooks = {}
for line in open(tmp + "/hook.log"):
    value, wall, hr = line.split()
    hooks.setdefault(value, float(wall))
e2e, ctl = [], []
for line in open(tmp + "/puts.log"):
    i, t0, t1 = line.split()
    ctl.append((float(t1) - float(t0)) * 1000)
    if i in hooks:
        e2e.append((hooks[i] - float(t0)) * 1000)
inproc = [int(l) / 1e6 for l in open(tmp + "/inproc.log")]
def pct(xs, p):
    xs = sorted(xs); k = min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))
    return xs[k]
print(f"settings change latency, {changes} changes each (etcd on loopback):")
print(f"  etcdctl put -> on_settings_change : median {statistics.median(e2e):7.2f} ms   p99 {pct(e2e, 99):7.2f} ms   ({len(e2e)}/{changes} seen)")
print(f"    (etcdctl put alone, start->exit  : median {statistics.median(ctl):7.2f} ms   p99 {pct(ctl, 99):7.2f} ms)")
print(f"  in-process put -> on_settings_change: median {statistics.median(inproc):7.2f} ms   p99 {pct(inproc, 99):7.2f} ms   ({len(inproc)} changes)")
if len(e2e) != changes:
    sys.exit(1)
EOF
