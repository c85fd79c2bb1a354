#!/bin/sh
# Builds and runs the libFuzzer targets of fuzz/ (clang, ASan, UBSan).
#
#   scripts/fuzz.sh TARGET SECONDS   fuzz one target (yaml, json, log_encode, ...)
#                                    for SECONDS; new inputs are kept in
#                                    build-fuzz/corpus/TARGET
#   scripts/fuzz.sh --ci             every target for a fixed number of runs
#                                    (TAMARCO_FUZZ_RUNS, default 20000 each),
#                                    starting from the checked-in seeds
#   scripts/fuzz.sh --list           the targets
#
# Everything it writes stays in build-fuzz/ (BUILD_DIR to change it): the
# build, the working corpus, crash artifacts (build-fuzz/artifacts/TARGET/),
# and temporary files (TMPDIR is pointed there). A crash makes it exit 1 and
# prints the artifact to replay: build-fuzz/fuzz/fuzz_TARGET ARTIFACT.
set -eu
cd "$(dirname "$0")/.."
root=$(pwd)
build=${BUILD_DIR:-$root/build-fuzz}

usage() {
    echo "usage: scripts/fuzz.sh TARGET SECONDS | --ci | --list" >&2
    exit 2
}
[ $# -ge 1 ] || usage

mkdir -p "$build/tmp"
export TMPDIR="$build/tmp"
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

targets() {
    sed -n 's/^tamarco_add_fuzzer(\([a-z0-9_]*\) .*/\1/p' "$root/fuzz/CMakeLists.txt"
}

build_targets() {
    if [ ! -f "$build/CMakeCache.txt" ]; then
        CC=${CC:-clang} cmake -S "$root" -B "$build" -DTAMARCO_FUZZ=ON -DBUILD_TESTING=OFF \
            -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    fi
    for t in "$@"; do set -- "$@" --target "fuzz_$t"; shift; done
    cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)" "$@" >/dev/null
}

# run TARGET WORK_CORPUS libFuzzer-options...
run() {
    t=$1
    work=$2
    shift 2
    mkdir -p "$work" "$build/artifacts/$t"
    seeds=""
    [ -d "$root/fuzz/corpus/$t" ] && seeds="$root/fuzz/corpus/$t"
    # the first corpus directory is where libFuzzer adds inputs: never the seeds
    (cd "$build" && "$build/fuzz/fuzz_$t" "$@" -artifact_prefix="$build/artifacts/$t/" \
        -print_final_stats=1 "$work" $seeds)
}

case "$1" in
--list)
    targets
    ;;
--ci)
    runs=${TAMARCO_FUZZ_RUNS:-20000}
    all=$(targets)
    # shellcheck disable=SC2086
    build_targets $all
    for t in $all; do
        echo "== fuzz $t: $runs runs"
        log="$build/fuzz-$t.log"
        # from the seeds only, so that every CI run does the same amount of work
        rm -rf "$build/ci-corpus/$t"
        if ! run "$t" "$build/ci-corpus/$t" -runs="$runs" -max_len=8192 -timeout=25 >"$log" 2>&1; then
            tail -n 60 "$log" >&2
            echo "fuzz: $t failed; artifacts in $build/artifacts/$t/" >&2
            exit 1
        fi
        grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
    done
    ;;
-*)
    usage
    ;;
*)
    [ $# -eq 2 ] || usage
    t=$1
    seconds=$2
    targets | grep -qx "$t" || { echo "fuzz: unknown target '$t' (scripts/fuzz.sh --list)" >&2; exit 2; }
    build_targets "$t"
    run "$t" "$build/corpus/$t" -max_total_time="$seconds" -max_len=8192 -timeout=25
    ;;
esac
