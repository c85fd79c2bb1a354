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
