#!/bin/sh
# Builds the .deb with CPack and installs it with the real dpkg into a
# temporary root, then runs the hello example and a generated project
# (with a C extension built against the installed CMake package) from there.
#
#   sh spec/deb_package.sh BUILD_DIR SOURCE_DIR      (ctest -R deb_package)
#
# Why not `dpkg --root=TMP -i`: --root chroots into TMP for maintainer
# scripts and checks Depends against TMP's own (empty) package database, so
# every dependency would have to be forced. Instead this uses
# `dpkg --instdir=TMP/root --admindir=TMP/admin -i` with a copy of this
# machine's package database: dpkg then checks the package's Depends
# against the Debian 12 packages really installed here (a misspelt or
# missing dependency fails the install, with no --force-depends), unpacks
# under TMP/root and records the package only in TMP/admin. The system is
# not touched. A fresh Debian 12 (no build dependencies) needs a container:
#   docker run --rm -v $PWD:/deb debian:12 sh -c \
#     'apt-get update && apt-get install -y /deb/tamarco-host_*.deb && tamarco-host version'
set -eu
build_dir=$(cd "$1" && pwd)
source_dir=$(cd "$2" && pwd)
work=$(mktemp -d /tmp/tamarco-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT

(cd "$work" && cpack -G DEB --config "$build_dir/CPackConfig.cmake" -B "$work/out" >"$work/cpack.log" 2>&1) \
    || { cat "$work/cpack.log"; exit 1; }
deb=$(ls "$work"/out/tamarco-host_*.deb)
echo "built $(basename "$deb") ($(du -k "$deb" | cut -f1) kB)"

depends=$(dpkg-deb -f "$deb" Depends)
for pkg in libluajit2-5.1-2 libuv1 lua-luv libyaml-0-2 libcurl4 librabbitmq4 libhiredis0.14 libhttp-parser2.9 lua-cjson lua-busted; do
    echo "$depends" | grep -q "\\b$pkg\\b" || { echo "Depends lacks $pkg: $depends"; exit 1; }
done
dpkg-deb -c "$deb" >"$work/contents"
grep -q './usr/bin/tamarco-host$' "$work/contents" || { echo "no /usr/bin/tamarco-host in the package"; exit 1; }
grep -q './usr/include/tamarco-host/tamarco.h$' "$work/contents" || { echo "no tamarco.h in the package"; exit 1; }

# install with dpkg into a temporary root, dependencies checked against this machine
mkdir -p "$work/root" "$work/admin/info" "$work/admin/updates" "$work/admin/triggers"
cp /var/lib/dpkg/status "$work/admin/status"
: > "$work/admin/available"
force=""
[ "$(id -u)" = 0 ] || force="--force-not-root"
dpkg $force --instdir="$work/root" --admindir="$work/admin" --force-script-chrootless -i "$deb" >"$work/dpkg.log" 2>&1 \
    || { cat "$work/dpkg.log"; exit 1; }
dpkg --admindir="$work/admin" -s tamarco-host | grep -q "^Status: install ok installed" \
    || { echo "dpkg does not list tamarco-host as installed"; exit 1; }
host="$work/root/usr/bin/tamarco-host"
unset TAMARCO_LUA_DIR
cd /
"$host" version

# the hello example from the installed tree
# a port the kernel has just handed out as free
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
report=0
out="$work/hello.log"
TAMARCO__SYSTEM__RESOURCES__API__PORT=$port TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=$report \
    "$host" run "$source_dir/services/hello/service.lua" >"$out" 2>&1 &
pid=$!
i=0
while [ $i -lt 600 ] && ! grep -q "service started" "$out"; do sleep 0.05; i=$((i + 1)); done
body=$(curl -sf "http://127.0.0.1:$port/hello/world" || true)
kill -TERM $pid 2>/dev/null || { cat "$out"; echo "the installed host exited before it was stopped"; exit 1; }
status=0
wait $pid || status=$?
[ "$body" = '{"message":"hello world"}' ] || { cat "$out"; echo "hello answered '$body'"; exit 1; }
[ $status -eq 0 ] || { cat "$out"; echo "hello exited with $status"; exit 1; }

# a generated project with a C extension, built against the installed package
"$host" new service deb-check --dir "$work/project" --with-c-extension >/dev/null
(cd "$work/project" && "$host" test) >"$work/test.log" 2>&1 || { cat "$work/test.log"; exit 1; }
grep -q "TamarcoHost_DIR:.*=$work/root/usr/lib" "$work/project/build/CMakeCache.txt" \
    || { grep TamarcoHost_DIR "$work/project/build/CMakeCache.txt"; echo "the extension did not use the installed package"; exit 1; }
tail -1 "$work/test.log"
echo "deb package OK"
