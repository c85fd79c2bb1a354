#!/bin/sh
# Generates the Lua API reference from the `---` doc comments of lua/tamarco
# with LDoc (Debian's lua-ldoc) into build/api-docs (or the directory given as argument),
# never into the repository: open build/api-docs/index.html.
set -eu
cd "$(dirname "$0")/.."
out=${1:-build/api-docs}
command -v ldoc >/dev/null || { echo "api-docs: ldoc not found (apt-get install lua-ldoc)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$(mktemp "${TMPDIR:-/tmp}/api-docs.XXXXXX")
trap 'rm -f "$log"' EXIT
# docs/ldoc_text.lua is the text format named in docs/config.ld.
# LDoc writes its built-in style and template into /tmp/ldoc<home directory>
# and leaves them there: removed afterwards unless they were there before.
ldoc_tmp="/tmp/ldoc$(printf '%s' "${HOME:-}" | tr '/\\: ' '____')"
ldoc_tmp_existed=0
[ -e "$ldoc_tmp" ] && ldoc_tmp_existed=1
status=0
LUA_PATH="$PWD/docs/?.lua;;" ldoc -c docs/config.ld -d "$out" . >"$log" 2>&1 || status=$?
[ "$ldoc_tmp_existed" = 1 ] || rm -rf "$ldoc_tmp"
# Not worth a line each: the section banners (a line of dashes, a title, a
# line of dashes) that LDoc takes for doc comments of nothing, and modules
# that only hold private functions.
grep -v -e "definition cannot be parsed" -e "contains no items" -e "^reading configuration" \
    -e "^changing to directory" -e "^output written to" "$log" >&2 || true
if [ "$status" -ne 0 ] || [ ! -s "$out/index.html" ]; then
    echo "api-docs: ldoc failed (exit $status)" >&2
    exit 1
fi
echo "API reference: $out/index.html"
