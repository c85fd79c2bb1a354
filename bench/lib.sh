# Shared by the benchmark scripts (sourced; ROOT and BUILD_DIR set first).

# bench_install MISSING: installs the Debian packages named in MISSING (as
# root), or stops with the list when not root.
bench_install() {
    [ -n "$1" ] || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "missing packages:$1 (run as root to install them)" >&2
        exit 1
    fi
    echo "installing:$1"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $1 >/dev/null
}

# bench_build_host: a Release tamarco-host in BUILD_DIR, as HOST_BIN. A build
# that fails falls back to an existing binary, with a warning.
bench_build_host() {
    HOST_BIN=$BUILD_DIR/tamarco-host
    if [ ! -x "$HOST_BIN" ]; then
        cmake -B "$BUILD_DIR" -S "$ROOT" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
    fi
    if ! cmake --build "$BUILD_DIR" --target tamarco-host -j"$(nproc)" >"$BUILD_DIR/bench-build.log" 2>&1; then
        [ -x "$HOST_BIN" ] || { cat "$BUILD_DIR/bench-build.log" >&2; exit 1; }
        echo "warning: the build failed (see $BUILD_DIR/bench-build.log); using the existing $HOST_BIN" >&2
    fi
}

# bench_workdir NAME: WORK, a temporary directory (mode 755: servers that drop
# privileges read it), removed at exit with every pid in PIDS killed.
bench_workdir() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tamarco-$1.XXXXXX")
    chmod 755 "$WORK"
    PIDS=""
    trap bench_cleanup EXIT
    trap 'exit 1' INT TERM HUP
}

bench_cleanup() {
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

# bench_wait_http PORT PATH: waits (15 s at most) until the server on PORT
# answers PATH; else shows the servers' logs in WORK and stops.
bench_wait_http() {
    i=0
    while ! curl -fs "http://127.0.0.1:$1$2" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 150 ]; then
            echo "server on port $1 did not answer" >&2
            cat "$WORK"/*.log "$WORK"/nginx*/error.log 2>/dev/null >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

# bench_p99_ms FILE: the 99th percentile of a `wrk --latency` report, in ms.
bench_p99_ms() {
    awk '$1 == "99%" {
        v = $2
        if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
    }' "$1"
}

# bench_rps FILE: requests/s of a wrk report.
bench_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }

# bench_rss_kb PID: the process's resident memory in KiB.
bench_rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# bench_stop PID...: ends these processes and waits for them.
bench_stop() { for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
