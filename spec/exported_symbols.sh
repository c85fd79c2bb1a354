#!/bin/bash
# The host binary exports exactly the functions include/tamarco.h declares
# (TAMARCO_API): extensions and FFI code link against those and nothing else.
# The loadable bindings (MODULE_DIR/*.so) call into the host through those
# functions only: one that needs another would fail to load at run time.
# Usage: exported_symbols.sh HOST_BINARY TAMARCO_H [MODULE_DIR]
set -euo pipefail
binary=$1 header=$2 modules=${3:-}
declared=$(sed -n 's/^TAMARCO_API[^(]*[ *]\(tamarco_[a-z0-9_]*\)(.*/\1/p' "$header" | sort -u)
# Defined, global, dynamic functions and data; the C runtime's own (_start,
# _init, _IO_stdin_used, __data_start, ...) and main are not ours.
exported=$(nm -D --defined-only "$binary" | awk '$2 ~ /^[TDBRV]$/ { print $3 }' |
    grep -v -e '^_' -e '^main$' -e '@' | sort -u)
if [ -n "$modules" ]; then
    for module in "$modules"/*.so; do
        needed=$(nm -D --undefined-only "$module" | awk '{ print $2 }' | grep '^tamarco_' | sort -u || true)
        missing=$(comm -23 <(echo "$needed") <(echo "$exported") | grep . || true)
        if [ -n "$missing" ]; then
            echo "exported_symbols: $module needs host functions the binary does not export:" >&2
            echo "$missing" >&2
            exit 1
        fi
    done
fi
if [ "$declared" = "$exported" ]; then
    echo "exported_symbols: $(wc -l <<< "$exported") symbols, exactly those of $header"
    exit 0
fi
echo "exported_symbols: the binary's exports differ from $header" >&2
echo "  column 1: declared, not exported; column 2: exported, not declared" >&2
comm -3 <(echo "$declared") <(echo "$exported") >&2
exit 1
