#!/bin/sh
# Memory across hot reloads: a child host runs the hello service and reloads
# its code on SIGHUP, one reload at a time; prints the process RSS and the Lua
# heap (from the memory resource) after 1, 100 and 300 reloads, and the
# ratios to the first.
#
#   sh bench/reload_memory.sh
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
[ -x "$HOST_BIN" ] || { echo "build first: no $HOST_BIN" >&2; exit 1; }
WORK=$(mktemp -d /tmp/tamarco-reload-memory.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$WORK"' EXIT
cp "$ROOT/services/hello/service.lua" "$WORK/service.lua"
log="$WORK/out.log"

TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION \
TAMARCO__SYSTEM__RESOURCES__API__PORT=0 \
TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0 \
TAMARCO__SYSTEM__RESOURCES__MEMORY__MICROSERVICES_WITH_MEMORY=all \
TAMARCO__SYSTEM__RESOURCES__MEMORY__INTERVAL_SECONDS=0.05 \
TAMARCO__SYSTEM__RESOURCES__MEMORY__FILE="$WORK/memory.jsonl" \
    "$HOST_BIN" run "$WORK/service.lua" >"$log" 2>&1 &
pid=$!
i=0
while ! grep -q "service started" "$log"; do
    i=$((i + 1)); [ $i -lt 200 ] || { cat "$log"; exit 1; }; sleep 0.05
done

reloads=0
reload_to() {
    while [ $reloads -lt "$1" ]; do
        reloads=$((reloads + 1))
        kill -HUP "$pid"
        while [ "$(grep -c 'service code reloaded' "$log")" -lt $reloads ]; do sleep 0.01; done
    done
    sleep 0.2   # a line or more from the memory resource
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; }
lua_kb() { tail -n 1 "$WORK/memory.jsonl" | sed 's/.*"lua_kb":\([0-9]*\).*/\1/'; }

reload_to 1;   rss1=$(rss_kb);   lua1=$(lua_kb)
reload_to 100; rss100=$(rss_kb); lua100=$(lua_kb)
reload_to 300; rss300=$(rss_kb); lua300=$(lua_kb)
printf 'after   1 reload : RSS %6d KiB, Lua heap %6d KiB\n' "$rss1" "$lua1"
printf 'after 100 reloads: RSS %6d KiB, Lua heap %6d KiB\n' "$rss100" "$lua100"
printf 'after 300 reloads: RSS %6d KiB, Lua heap %6d KiB\n' "$rss300" "$lua300"
awk -v a="$rss1" -v b="$rss100" -v c="$rss300" -v d="$lua1" -v e="$lua100" -v f="$lua300" 'BEGIN {
    printf "ratio RSS 100/1: %.2f, 300/1: %.2f; Lua heap 100/1: %.2f, 300/1: %.2f\n", b / a, c / a, e / d, f / d }'
