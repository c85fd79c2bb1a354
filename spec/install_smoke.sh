#!/bin/sh
# Installs the build into a temporary prefix and runs an example with the
# installed binary from another directory: the installed host must find its
# Lua modules and loadable bindings without environment variables.
set -eu
build_dir=$1
source_dir=$2
prefix=$(mktemp -d /tmp/tamarco-install.XXXXXX)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build_dir" --prefix "$prefix" >/dev/null
cp "$source_dir/services/examples/lifecycle/service.lua" "$prefix/service.lua"
cd /
unset TAMARCO_LUA_DIR
out="$prefix/out.log"
# the report server on a free port: nothing else may hold 5747 for this test
TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0 \
    "$prefix/bin/tamarco-host" run "$prefix/service.lua" >"$out" 2>&1 &
pid=$!
i=0
while [ $i -lt 600 ] && ! grep -q "service started" "$out"; do sleep 0.05; i=$((i + 1)); done
kill -TERM $pid 2>/dev/null || { cat "$out"; echo "the installed host exited before it started"; exit 1; }
status=0
wait $pid || status=$?
cat "$out"
[ $status -eq 0 ] || { echo "installed host exited with $status"; exit 1; }
grep -q "service stopped" "$out" || { echo "installed host did not stop cleanly"; exit 1; }
# the installed host finds its installed modules (not the source tree's)
# and its loadable bindings
cat > "$prefix/probe_spec.lua" <<LUA
describe("the installed host", function()
    it("loads its own modules and loadable bindings", function()
        assert.are.equal("$prefix/share/tamarco-host/lua", require("tamarco.c.process").lua_dir())
        assert.is_table(require "tamarco.c.http_client")
    end)
    it("loads its modules precompiled (named by their path below the Lua directory)", function()
        assert.are.equal("@tamarco/core/tasks.lua", debug.getinfo(require("tamarco.core.tasks").sleep, "S").source)
    end)
end)
LUA
# every installed module has its bytecode
for source in $(cd "$prefix/share/tamarco-host/lua" && find . -name '*.lua' | sed 's|^\./||'); do
    key=$(echo "$source" | tr / %)
    [ -s "$prefix/share/tamarco-host/lua_bytecode/$key.ljbc" ] || { echo "no bytecode for $source"; exit 1; }
done
"$prefix/bin/tamarco-host" test "$prefix/probe_spec.lua"
echo "installed host OK"
