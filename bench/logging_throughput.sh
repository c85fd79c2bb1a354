#!/bin/sh
# Logging throughput: records/s to a file and to a UDP (logstash) sink, the
# host against Python's standard logging doing the same, in one run. Prints
# the ratios (ours / theirs; target >= 10).
#
#   sh bench/logging_throughput.sh            # RECORDS=200000 ROUNDS=5
#
# The two take turns ROUNDS times and each side's best round counts: on a
# shared machine a round is sometimes slowed by others, and taking turns
# keeps such a slowdown from landing on one side only.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
[ -x "$HOST_BIN" ] || { echo "build first: no $HOST_BIN" >&2; exit 1; }
export RECORDS=${RECORDS:-200000}
ROUNDS=${ROUNDS:-5}
TMP=$(mktemp -d /tmp/tamarco-logbench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
export UDP_PORT=${UDP_PORT:-25959}
cd "$ROOT"
# A bound socket on UDP_PORT stands for logstash: datagrams are queued (and
# dropped once its buffer is full) instead of bouncing back as ICMP port
# unreachable, which would cost both sides more than the logging itself.
/usr/bin/python3 -c "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('127.0.0.1', int(sys.argv[1])))
time.sleep(600)" "$UDP_PORT" &
listener=$!
trap 'kill $listener 2>/dev/null || true; rm -rf "$TMP"' EXIT
sleep 0.3
round=1
while [ "$round" -le "$ROUNDS" ]; do
    LOG_FILE="$TMP/ours.log" TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION \
        TAMARCO__SYSTEM__LOGGING__STDOUT=false "$HOST_BIN" run bench/logging_bench.lua 2>&1 >/dev/null |
        grep records/s | tee -a "$TMP/rates"
    LOG_FILE="$TMP/python.log" /usr/bin/python3 bench/peers/logging_python.py 2>&1 |
        grep records/s | tee -a "$TMP/rates"
    round=$((round + 1))
done
awk '
    function best(name, rate) { if (rate > b[name]) b[name] = rate }
    /tamarco-host file/ { best("of", $3) } /tamarco-host udp/ { best("ou", $3) }
    /python file/ { best("pf", $3) } /python udp/ { best("pu", $3) }
    END {
        printf "best: tamarco-host file %.0f, udp %.0f; python file %.0f, udp %.0f records/s\n", b["of"], b["ou"], b["pf"], b["pu"]
        printf "ratio file ours/python: %.1fx (target >= 10)\nratio udp ours/python: %.1fx (target >= 10)\n", b["of"] / b["pf"], b["ou"] / b["pu"]
    }' "$TMP/rates"
