#!/bin/sh
# Logging throughput: records/s to a file and to a UDP (logstash) sink, the
# host against Python's standard logging doing the same, in one run. Prints
# the ratios (ours / theirs; target >= 10).
#
#   sh bench/logging_throughput.sh            # RECORDS=200000
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
[ -x "$HOST_BIN" ] || { echo "build first: no $HOST_BIN" >&2; exit 1; }
export RECORDS=${RECORDS:-200000}
TMP=$(mktemp -d /tmp/tamarco-logbench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
export UDP_PORT=${UDP_PORT:-25959}
cd "$ROOT"
ours=$(LOG_FILE="$TMP/ours.log" TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION \
    TAMARCO__SYSTEM__LOGGING__STDOUT=false "$HOST_BIN" run bench/logging_bench.lua 2>&1 >/dev/null | grep records/s)
theirs=$(LOG_FILE="$TMP/python.log" /usr/bin/python3 bench/peers/logging_python.py 2>&1 | grep records/s)
echo "$ours"
echo "$theirs"
printf '%s\n%s\n' "$ours" "$theirs" | awk '
    /tamarco-host file/ { of = $3 } /tamarco-host udp/ { ou = $3 }
    /python file/ { pf = $3 } /python udp/ { pu = $3 }
    END { printf "ratio file ours/python: %.1fx\nratio udp ours/python: %.1fx (target >= 10)\n", of / pf, ou / pu }'
