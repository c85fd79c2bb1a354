#!/bin/sh
# Installs the Debian 12 packages tamarco-host builds, tests and benchmarks with.
# Run as root. Only missing packages are installed; apt-get update runs once
# when something is missing.
set -eu

PACKAGES="
build-essential cmake pkg-config git
lua-ldoc
libluajit2-5.1-dev libuv1-dev lua-luv-dev libyaml-dev libcurl4-openssl-dev
librabbitmq-dev libhiredis-dev libhttp-parser-dev lua-cjson lua-busted
redis-server redis-sentinel redis-tools etcd-server etcd-client rabbitmq-server amqp-tools
curl openssl python3 procps prometheus
clang libclang-rt-14-dev
python3-pika
libedit-dev chromium
"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "install-deps: all packages present"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages:$missing -- run as root to install them" >&2
    exit 1
fi

echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Debian's packaged daemons must not start on install: the test scripts start
# their own instances on loopback in a temporary directory.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.tamarco
chmod 755 /usr/sbin/policy-rc.d.tamarco
restore_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    cp /usr/sbin/policy-rc.d.tamarco /usr/sbin/policy-rc.d
    restore_policy=1
fi
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
if [ "$restore_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
rm -f /usr/sbin/policy-rc.d.tamarco
