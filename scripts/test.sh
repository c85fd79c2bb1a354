#!/bin/sh
# Builds tamarco-host and runs the whole test suite on a fresh Debian 12
# machine (as root): installs missing packages, builds, starts redis-server,
# etcd and rabbitmq-server on loopback in a temporary directory (and an etcd
# cluster and Redis with sentinels for the failover specs), runs the C
# tests (ctest) and the busted specs inside the host, then does the same with
# an AddressSanitizer + UndefinedBehaviorSanitizer build, runs every fuzz
# target for a fixed number of inputs (scripts/fuzz.sh --ci), and stops the
# servers. Exit status 0 only when everything passed.
set -eu
cd "$(dirname "$0")/.."

scripts/install-deps.sh

jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs"

# The suite must leave /tmp as it found it (checked at the end; set
# TAMARCO_SKIP_TMP_CHECK=1 on a machine where other work writes to /tmp).
tmp_before=$(ls -A /tmp | sort)

services_dir=$(mktemp -d /tmp/tamarco-services.XXXXXX)
cleanup() { scripts/test-services.sh stop "$services_dir" || true; }
trap cleanup EXIT INT TERM
scripts/test-services.sh start "$services_dir" >/dev/null
# The clusters the failover specs need, once for the whole run: a 3-member
# etcd, Redis master + replica + 3 sentinels, and a 3-node RabbitMQ.
scripts/test-services.sh start-cluster etcd "$services_dir" >/dev/null
scripts/test-services.sh start-cluster redis-sentinel "$services_dir" >/dev/null
scripts/test-services.sh start-cluster rabbitmq "$services_dir" >/dev/null
. "$services_dir/env.sh"

echo "== C tests"
(cd build && ctest --output-on-failure)
echo "== specs"
build/tamarco-host test -o utfTerminal spec services

if [ "${TAMARCO_SKIP_SANITIZERS:-0}" != 1 ]; then
    echo "== C tests and specs under AddressSanitizer and UndefinedBehaviorSanitizer"
    cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DTAMARCO_SANITIZE=ON >/dev/null
    cmake --build build-asan -j"$jobs"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
    export ASAN_OPTIONS="abort_on_error=0:detect_leaks=1"
    (cd build-asan && ctest --output-on-failure)
    # The RabbitMQ cluster lost a node to the first pass's fault spec: this
    # pass's amqp_cluster_spec starts a fresh cluster of its own.
    env -u TAMARCO_TEST_AMQP_CLUSTER -u TAMARCO_TEST_AMQP_CLUSTER_DIR \
        build-asan/tamarco-host test -o utfTerminal spec services
fi
if [ "${TAMARCO_SKIP_FUZZ:-0}" != 1 ]; then
    echo "== fuzz targets (libFuzzer, a fixed number of runs each)"
    scripts/fuzz.sh --ci
fi
cleanup
trap - EXIT INT TERM
if [ "${TAMARCO_SKIP_TMP_CHECK:-0}" != 1 ]; then
    printf '%s\n' "$tmp_before" > build/tmp_before.txt
    left=$(ls -A /tmp | sort | comm -13 build/tmp_before.txt -)
    if [ -n "$left" ]; then
        echo "== the test suite left files in /tmp:" >&2
        echo "$left" >&2
        exit 1
    fi
fi
echo "== all tests passed"
