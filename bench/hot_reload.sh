#!/bin/sh
# Hot reload under load: 8 tasks loop on GET against a child host while its
# service file is rewritten 20 times (--watch). Prints the time from the
# file being written to the new code serving (median, max), the requests
# served and the failures (must be 0). The --watch debounce is 100 ms.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_BIN=${TAMARCO_HOST:-$ROOT/build/tamarco-host}
cd "$ROOT"
"$HOST_BIN" test spec/reload_load_spec.lua | grep "hot reload:"
