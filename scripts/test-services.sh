#!/bin/bash
# Starts and stops real redis-server, etcd and rabbitmq-server on 127.0.0.1,
# in a temporary directory, for tamarco-host's integration tests.
#
# Usage:
#   scripts/test-services.sh start [DIR]
#       Creates DIR (default: mktemp -d /tmp/tamarco-services.XXXXXX), picks
#       free loopback ports, starts the servers, waits until each answers,
#       writes DIR/env.sh and prints its `export` lines on stdout (so
#       `eval "$(scripts/test-services.sh start)"` works). Human-readable
#       lines ("redis at 127.0.0.1:P", ...) go to stderr.
#   scripts/test-services.sh stop DIR
#       Stops every server started in DIR, waits for them to exit, removes DIR.
#   scripts/test-services.sh start-X|stop-X|restart-X DIR   (X: redis etcd rabbitmq)
#       Stops/starts one server, keeping its port and data directory.
#   scripts/test-services.sh status DIR
#       Shows which servers of DIR are running; exits 1 if one is down.
#   scripts/test-services.sh start-cluster etcd|redis-sentinel|rabbitmq DIR
#       Adds a cluster to DIR (made by `start`, or a new one): a 3-member
#       etcd (members m1 m2 m3), a Redis master + replica + 3 sentinels
#       (members master replica s1 s2 s3; master name "tamarco"), or a
#       3-node RabbitMQ (n1 n2 n3, joined to n1, an Erlang cookie of its own).
#       `stop DIR` stops it with the rest.
#   scripts/test-services.sh start-member|stop-member|kill-member KIND MEMBER DIR
#       Starts again (same ports, same data) / stops / SIGKILLs one member.
#
# Environment:
#   TAMARCO_SERVICES         servers to start (default "redis etcd rabbitmq")
#   TAMARCO_SERVICES_TIMEOUT seconds to wait for a server to answer (default 90)
#
# DIR/env.sh exports TAMARCO_SERVICES_DIR and TAMARCO_TEST_{REDIS,ETCD,AMQP}_{HOST,PORT};
# with clusters also TAMARCO_TEST_ETCD_CLUSTER (h:p,h:p,h:p),
# TAMARCO_TEST_REDIS_SENTINELS (h:p,h:p,h:p), TAMARCO_TEST_REDIS_SENTINEL_MASTER,
# TAMARCO_TEST_AMQP_CLUSTER (h:p,h:p,h:p) and TAMARCO_TEST_AMQP_CLUSTER_DIR.
# RabbitMQ: user guest/guest, vhost /.
#
# Layout of DIR: one sub-directory per server holding its port(s), a run.sh
# that starts it in the foreground (start-X reuses it), its pid file, its log
# and its data. RabbitMQ gets a private epmd on its own loopback port, so the
# script never touches (or depends on) a system epmd. redis runs with
# --save '', so restart-redis comes back empty; etcd and rabbitmq keep their
# data (durable queues, persistent messages) across stop-X/start-X.
# rabbitmqctl against the broker (as root):
#   (. DIR/rabbitmq/rabbitmq.env; /usr/lib/rabbitmq/bin/rabbitmqctl list_queues)

# Paths made here never contain blanks (see check_dir_name): lists of files
# and of services are passed as words.
# shellcheck disable=SC2046,SC2013

# Run with bash even when invoked as `sh scripts/test-services.sh`.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

PROG=test-services
ALL_SERVICES="redis etcd rabbitmq"
TIMEOUT=${TAMARCO_SERVICES_TIMEOUT:-90}
HOST=127.0.0.1
MARKER=.tamarco-services
PORT_MIN=20000   # below Linux's ephemeral range (32768-60999), so outgoing
PORT_MAX=32000   # connections do not grab the ports between pick and bind
RMQ_USER=rabbitmq

log() { echo "$PROG: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '5,32p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- helpers

# alive PID: the process exists and is not a zombie.
alive() {
    local st
    [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# is_ours PID PATTERN: PID is alive and its command line contains PATTERN
# (guards against killing a recycled pid).
is_ours() {
    alive "$1" || return 1
    tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"
}

readpid() { if [ -s "$1" ]; then tr -dc 0-9 < "$1"; fi; }

# stop_pid PID PATTERN NAME: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pid() {
    local pid=$1 pat=$2 name=$3
    is_ours "$pid" "$pat" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "warning: $name (pid $pid) is still alive"
}

# Local ports of every TCP socket (any state), from /proc (no ss needed).
used_ports() {
    local f addr
    for f in /proc/net/tcp /proc/net/tcp6; do
        [ -r "$f" ] || continue
        while read -r _ addr _; do
            case "$addr" in *:*) echo $((16#${addr##*:})) ;; esac
        done < "$f"
    done
}

# port_listening PORT: some socket listens on PORT (state 0A = LISTEN).
port_listening() {
    local hex f
    hex=$(printf '%04X' "$1")
    for f in /proc/net/tcp /proc/net/tcp6; do
        [ -r "$f" ] || continue
        awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { found = 1 } END { exit !found }' "$f" && return 0
    done
    return 1
}

PICKED=" "
# pick_port: sets REPLY to a random free port, distinct from those picked before.
pick_port() {
    local used p
    used=" $(used_ports | tr '\n' ' ')"
    for _ in $(seq 500); do
        p=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % (PORT_MAX - PORT_MIN)))
        case "$used$PICKED" in *" $p "*) continue ;; esac
        PICKED="$PICKED$p "
        REPLY=$p
        return 0
    done
    die "no free port found in $PORT_MIN-$PORT_MAX"
}

# wait_port_free PORT: after a stop, wait until nothing listens on PORT.
wait_port_free() {
    for _ in $(seq 100); do
        port_listening "$1" || return 0
        sleep 0.1
    done
    log "warning: port $1 is still in use"
}

show_log() {
    local f shown=0
    for f in "$@"; do
        [ -s "$f" ] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2
        echo "-----" >&2
        shown=1
    done
    [ "$shown" = 1 ] || log "(no log output yet in: $*)"
}

check_dir_name() {
    case "$1" in
        /*) ;;
        *) die "DIR must be an absolute path: $1" ;;
    esac
    case "$1" in
        *[!A-Za-z0-9._/+-]*) die "DIR may only contain letters, digits and ._/+-: $1" ;;
    esac
}

abs_dir() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

need_dir() {
    [ -n "${1:-}" ] || usage
    DIR=$(abs_dir "$1")
    DIR=${DIR%/}
    [ -f "$DIR/$MARKER" ] || die "$DIR is not a directory made by '$0 start'"
}

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found (install $2; see scripts/install-deps.sh)"
}

as_root() { [ "$(id -u)" = 0 ]; }

# launch NAME: runs DIR/NAME/run.sh in the background, in a session of its
# own, detached from our stdin/stdout (so `$(test-services.sh start)` returns).
launch() {
    local d="$DIR/$1"
    setsid /bin/sh "$d/run.sh" < /dev/null >> "$d/$1.log" 2>&1 &
}

deadline_passed() { [ "$SECONDS" -ge "$1" ]; }

# ---------------------------------------------------------------- redis

setup_redis() {
    local d="$DIR/redis"
    need_cmd redis-server redis-server
    need_cmd redis-cli redis-tools
    mkdir -p "$d/data"
    pick_port; echo "$REPLY" > "$d/port"
    cat > "$d/run.sh" <<EOF
#!/bin/sh
# Starts redis-server in the foreground (used by test-services.sh start-redis).
echo \$\$ > '$d/pid'
exec redis-server --port $REPLY --bind $HOST --save '' --appendonly no \\
    --dir '$d/data' --daemonize no --logfile '' --protected-mode yes
EOF
}

running_redis() { is_ours "$(readpid "$DIR/redis/pid")" redis-server; }

launch_redis() { rm -f "$DIR/redis/pid"; launch redis; }

# probe_redis: 0 = answers, 1 = not yet, 2 = process died
probe_redis() {
    local port; port=$(cat "$DIR/redis/port")
    [ "$(redis-cli -h $HOST -p "$port" ping 2>/dev/null)" = PONG ] && return 0
    [ -s "$DIR/redis/pid" ] && ! alive "$(readpid "$DIR/redis/pid")" && return 2
    return 1
}

stop_redis() {
    [ -d "$DIR/redis" ] || return 0
    stop_pid "$(readpid "$DIR/redis/pid")" redis-server redis
    wait_port_free "$(cat "$DIR/redis/port")"
}

logs_redis() { echo "$DIR/redis/redis.log"; }

# ---------------------------------------------------------------- etcd

setup_etcd() {
    local d="$DIR/etcd" port peer
    need_cmd etcd etcd-server
    need_cmd curl curl
    rm -rf "$d/data"   # a data dir remembers its peer URL: start fresh
    mkdir -p "$d"
    pick_port; port=$REPLY; echo "$port" > "$d/port"
    pick_port; peer=$REPLY; echo "$peer" > "$d/peer_port"
    cat > "$d/run.sh" <<EOF
#!/bin/sh
# Starts etcd in the foreground (used by test-services.sh start-etcd).
echo \$\$ > '$d/pid'
exec etcd --name default --data-dir '$d/data' \\
    --listen-client-urls http://$HOST:$port --advertise-client-urls http://$HOST:$port \\
    --listen-peer-urls http://$HOST:$peer --initial-advertise-peer-urls http://$HOST:$peer \\
    --initial-cluster default=http://$HOST:$peer --initial-cluster-state new \\
    --logger zap --log-outputs stderr
EOF
}

running_etcd() { is_ours "$(readpid "$DIR/etcd/pid")" etcd; }

launch_etcd() { rm -f "$DIR/etcd/pid"; launch etcd; }

probe_etcd() {
    local port; port=$(cat "$DIR/etcd/port")
    curl -fsS -m 2 "http://$HOST:$port/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    [ -s "$DIR/etcd/pid" ] && ! alive "$(readpid "$DIR/etcd/pid")" && return 2
    return 1
}

stop_etcd() {
    [ -d "$DIR/etcd" ] || return 0
    stop_pid "$(readpid "$DIR/etcd/pid")" etcd etcd
    wait_port_free "$(cat "$DIR/etcd/port")"
    wait_port_free "$(cat "$DIR/etcd/peer_port")"
}

logs_etcd() { echo "$DIR/etcd/etcd.log"; }

# ---------------------------------------------------------------- rabbitmq

rmq_server_bin() {
    if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        echo /usr/lib/rabbitmq/bin/rabbitmq-server
    else
        command -v rabbitmq-server
    fi
}

rmq_check_cmds() {
    need_cmd rabbitmq-server rabbitmq-server
    need_cmd epmd erlang-base
    if as_root; then
        id "$RMQ_USER" >/dev/null 2>&1 || die "user $RMQ_USER does not exist (install rabbitmq-server)"
    fi
}

# rmq_node_files D PORT DIST EPMD_PORT: writes the environment, scripts and
# directories of one broker node into D (DIR/rabbitmq, or a cluster node).
rmq_node_files() {
    local d=$1 port=$2 dist=$3 epmd=$4 bin su_cmd
    bin=$(rmq_server_bin)
    mkdir -p "$d/mnesia" "$d/log" "$d/home"
    echo "$port" > "$d/port"
    echo "$dist" > "$d/dist_port"
    echo "$epmd" > "$d/epmd_port"

    # Everything is inside $d; nothing from /etc/rabbitmq or /var/lib/rabbitmq is used.
    printf '[].\n' > "$d/enabled_plugins"
    : > "$d/rabbitmq-env.conf"
    cat > "$d/rabbitmq.conf" <<EOF
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
    cat > "$d/rabbitmq.env" <<EOF
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 LANG=C.UTF-8
export HOME='$d/home'
export RABBITMQ_NODENAME='tamarco$port@localhost'
export RABBITMQ_NODE_IP_ADDRESS=$HOST RABBITMQ_NODE_PORT=$port RABBITMQ_DIST_PORT=$dist
export ERL_EPMD_ADDRESS=$HOST ERL_EPMD_PORT=$epmd
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
export RABBITMQ_MNESIA_BASE='$d/mnesia' RABBITMQ_LOG_BASE='$d/log'
export RABBITMQ_LOGS='$d/log/rabbit.log'
export RABBITMQ_PID_FILE='$d/rabbitmq.pid'
export RABBITMQ_FEATURE_FLAGS_FILE='$d/feature_flags'
export RABBITMQ_ENABLED_PLUGINS_FILE='$d/enabled_plugins'
export RABBITMQ_CONFIG_FILE='$d/rabbitmq.conf'
export RABBITMQ_ADVANCED_CONFIG_FILE='$d/advanced.config'
export RABBITMQ_CONF_ENV_FILE='$d/rabbitmq-env.conf'
export ERL_CRASH_DUMP='$d/erl_crash.dump'
EOF
    # Runs as the rabbitmq user: the environment above, then the broker in
    # the foreground (the rabbitmq-server wrapper forwards SIGTERM).
    cat > "$d/server.sh" <<EOF
#!/bin/sh
. '$d/rabbitmq.env'
cd "\$HOME"
exec '$bin'
EOF
    # A private epmd on loopback; erl finds it through ERL_EPMD_PORT.
    cat > "$d/epmd.sh" <<EOF
#!/bin/sh
echo \$\$ > '$d/epmd.pid'
export ERL_EPMD_ADDRESS=$HOST
exec epmd -address $HOST -port $epmd
EOF
    if as_root; then
        # rabbitmq-server run by root drops to the rabbitmq user anyway; do it
        # ourselves so that we know the environment it gets.
        su_cmd="exec su $RMQ_USER -s /bin/sh -c 'exec /bin/sh $d/server.sh'"
    else
        su_cmd="exec /bin/sh '$d/server.sh'"
    fi
    cat > "$d/run.sh" <<EOF
#!/bin/sh
# Starts rabbitmq-server in the foreground (used by test-services.sh start-rabbitmq).
echo \$\$ > '$d/launcher.pid'
$su_cmd
EOF
    chmod 755 "$d" "$d/log" "$d/mnesia"
    chmod 700 "$d/home"
    chmod 644 "$d"/*.sh "$d/rabbitmq.env" "$d/rabbitmq.conf" "$d/rabbitmq-env.conf" "$d/enabled_plugins"
}

# rmq_own D: the broker runs as rabbitmq: D must belong to it, and every
# directory above D must be searchable by it (mktemp -d makes 700 dirs,
# /root is 700, ...).
rmq_own() {
    local d=$1
    as_root || return 0
    chown -R "$RMQ_USER:$RMQ_USER" "$d"
    if ! su "$RMQ_USER" -s /bin/sh -c "test -w '$d/mnesia' && test -r '$d/server.sh'" 2>/dev/null; then
        die "user $RMQ_USER cannot reach $d (a parent directory is not world-searchable?)"
    fi
}

setup_rabbitmq() {
    local d="$DIR/rabbitmq" port dist epmd
    rmq_check_cmds
    rm -rf "$d"
    pick_port; port=$REPLY
    pick_port; dist=$REPLY
    pick_port; epmd=$REPLY
    chmod 755 "$DIR"
    rmq_node_files "$d" "$port" "$dist" "$epmd"
    rmq_own "$d"
}

rmq_epmd_running() { is_ours "$(readpid "$DIR/rabbitmq/epmd.pid")" epmd; }

running_rabbitmq() { is_ours "$(readpid "$DIR/rabbitmq/rabbitmq.pid")" beam; }

launch_rabbitmq() {
    local d="$DIR/rabbitmq" epmd
    epmd=$(cat "$d/epmd_port")
    if ! rmq_epmd_running; then
        rm -f "$d/epmd.pid"
        setsid /bin/sh "$d/epmd.sh" < /dev/null >> "$d/epmd.log" 2>&1 &
        for _ in $(seq 100); do
            ERL_EPMD_PORT=$epmd epmd -names >/dev/null 2>&1 && break
            sleep 0.1
        done
        ERL_EPMD_PORT=$epmd epmd -names >/dev/null 2>&1 || { show_log "$d/epmd.log"; die "epmd did not start on $HOST:$epmd"; }
    fi
    rm -f "$d/rabbitmq.pid" "$d/launcher.pid"
    launch rabbitmq
}

rmq_check_amqp() {
    local port=$1 q="tamarco-services-check-$$"
    local conn=(--server="$HOST" --port="$port" --username=guest --password=guest --vhost=/)
    if command -v amqp-publish >/dev/null 2>&1 && command -v amqp-get >/dev/null 2>&1; then
        amqp-declare-queue "${conn[@]}" -q "$q" >/dev/null 2>&1 || return 1
        amqp-publish "${conn[@]}" -r "$q" -b ping >/dev/null 2>&1 || return 1
        [ "$(amqp-get "${conn[@]}" -q "$q" 2>/dev/null)" = ping ] || return 1
        amqp-delete-queue "${conn[@]}" -q "$q" >/dev/null 2>&1 || true
    else
        # No amqp-tools: the broker opens its AMQP port once it is ready.
        (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null || return 1
    fi
}

probe_rabbitmq() {
    local d="$DIR/rabbitmq" pid
    port_listening "$(cat "$d/port")" && rmq_check_amqp "$(cat "$d/port")" && return 0
    pid=$(readpid "$d/rabbitmq.pid")
    [ -z "$pid" ] && pid=$(readpid "$d/launcher.pid")
    [ -n "$pid" ] && ! alive "$pid" && return 2
    return 1
}

stop_rabbitmq() {
    local d="$DIR/rabbitmq"
    [ -d "$d" ] || return 0
    # The broker (beam.smp) by RABBITMQ_PID_FILE; SIGTERM makes it shut down
    # cleanly, then its rabbitmq-server wrapper and su exit too.
    stop_pid "$(readpid "$d/rabbitmq.pid")" beam rabbitmq
    stop_pid "$(readpid "$d/launcher.pid")" rabbitmq rabbitmq-launcher
    stop_pid "$(readpid "$d/epmd.pid")" epmd epmd
    wait_port_free "$(cat "$d/port")"
    wait_port_free "$(cat "$d/dist_port")"
    wait_port_free "$(cat "$d/epmd_port")"
}

logs_rabbitmq() {
    echo "$DIR/rabbitmq/rabbitmq.log"
    echo "$DIR/rabbitmq/log/rabbit.log"
    echo "$DIR/rabbitmq/epmd.log"
}

# ---------------------------------------------------------------- clusters
#
# `start-cluster KIND DIR` starts a cluster of KIND in DIR/KIND-cluster (DIR
# may be a directory made by `start`, or a new one), next to the single
# servers; `stop DIR` stops it with them. Each member has its own
# sub-directory (port, run.sh, pid, log, data) so that a fault spec can
# kill-member / start-member it. A kind is the set of functions
# cluster_<what>_<kind> (dashes in KIND become underscores) for what in
# setup launch probe probe_member stop stop_member members pattern env logs;
# DIR/clusters lists the kinds started.

cluster_dir() { echo "$DIR/$1-cluster"; }

# member_launch DIR/MEMBER: runs its run.sh in the background, in a session
# of its own (like launch).
member_launch() {
    rm -f "$1/pid"
    setsid /bin/sh "$1/run.sh" < /dev/null >> "$1/member.log" 2>&1 &
}

# ---- etcd: three members m1 m2 m3 on loopback (DESIGN §11)

ETCD_MEMBERS="m1 m2 m3"

cluster_setup_etcd() {
    local c m port peer initial=""
    need_cmd etcd etcd-server
    need_cmd curl curl
    c=$(cluster_dir etcd)
    rm -rf "$c"
    for m in $ETCD_MEMBERS; do
        mkdir -p "$c/$m"
        pick_port; echo "$REPLY" > "$c/$m/port"
        pick_port; echo "$REPLY" > "$c/$m/peer_port"
        initial="$initial${initial:+,}$m=http://$HOST:$REPLY"
    done
    for m in $ETCD_MEMBERS; do
        port=$(cat "$c/$m/port"); peer=$(cat "$c/$m/peer_port")
        # --initial-* only matter for the first start; a restarted member
        # (start-member) rejoins from its data directory.
        cat > "$c/$m/run.sh" <<EOF
#!/bin/sh
# Starts etcd cluster member $m in the foreground (test-services.sh start-member etcd $m).
echo \$\$ > '$c/$m/pid'
exec etcd --name $m --data-dir '$c/$m/data' \\
    --listen-client-urls http://$HOST:$port --advertise-client-urls http://$HOST:$port \\
    --listen-peer-urls http://$HOST:$peer --initial-advertise-peer-urls http://$HOST:$peer \\
    --initial-cluster $initial --initial-cluster-state new \\
    --initial-cluster-token tamarco-$(cat "$c/m1/peer_port") \\
    --logger zap --log-outputs stderr
EOF
    done
}

cluster_members_etcd() { echo "$ETCD_MEMBERS"; }

cluster_pattern_etcd() { echo etcd; }

cluster_launch_etcd() {
    local m c; c=$(cluster_dir etcd)
    for m in $ETCD_MEMBERS; do member_launch "$c/$m"; done
}

# cluster_probe_member_etcd MEMBER: 0 = healthy (it has a leader), 1 = not
# yet, 2 = died.
cluster_probe_member_etcd() {
    local d; d="$(cluster_dir etcd)/$1"
    curl -fsS -m 2 "http://$HOST:$(cat "$d/port")/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    [ -s "$d/pid" ] && ! alive "$(readpid "$d/pid")" && return 2
    return 1
}

cluster_probe_etcd() {
    local m rc
    for m in $ETCD_MEMBERS; do
        rc=0; cluster_probe_member_etcd "$m" || rc=$?
        [ "$rc" = 0 ] || return "$rc"
    done
}

cluster_stop_member_etcd() {
    local d; d="$(cluster_dir etcd)/$1"
    stop_pid "$(readpid "$d/pid")" etcd "etcd $1"
    wait_port_free "$(cat "$d/port")"
    wait_port_free "$(cat "$d/peer_port")"
}

cluster_stop_etcd() {
    local m
    for m in $ETCD_MEMBERS; do cluster_stop_member_etcd "$m"; done
}

cluster_env_etcd() {
    local m c list=""; c=$(cluster_dir etcd)
    for m in $ETCD_MEMBERS; do list="$list${list:+,}$HOST:$(cat "$c/$m/port")"; done
    echo "export TAMARCO_TEST_ETCD_CLUSTER=$list"
}

cluster_logs_etcd() {
    local m c; c=$(cluster_dir etcd)
    for m in $ETCD_MEMBERS; do echo "$c/$m/member.log"; done
}

# ---- redis-sentinel: a master, a replica and three sentinels watching
# them under the master name "tamarco" (quorum 2, master down after 1 s).

SENTINEL_MASTER=tamarco
REDIS_SENTINEL_MEMBERS="master replica s1 s2 s3"

cluster_setup_redis_sentinel() {
    local c m master port replicaof
    need_cmd redis-server redis-server
    need_cmd redis-sentinel redis-sentinel
    need_cmd redis-cli redis-tools
    c=$(cluster_dir redis-sentinel)
    rm -rf "$c"
    for m in $REDIS_SENTINEL_MEMBERS; do
        mkdir -p "$c/$m/data"
        pick_port; echo "$REPLY" > "$c/$m/port"
    done
    master=$(cat "$c/master/port")
    for m in master replica; do
        port=$(cat "$c/$m/port")
        replicaof=""
        [ "$m" = replica ] && replicaof="--replicaof $HOST $master"
        # After a failover the sentinels give whichever comes back its new
        # role (a returning old master becomes a replica of the new one).
        cat > "$c/$m/run.sh" <<EOF
#!/bin/sh
# Starts the redis $m in the foreground (test-services.sh start-member redis-sentinel $m).
echo \$\$ > '$c/$m/pid'
exec redis-server --port $port --bind $HOST --save '' --appendonly no \\
    --dir '$c/$m/data' --daemonize no --logfile '' --protected-mode yes $replicaof
EOF
    done
    for m in s1 s2 s3; do
        port=$(cat "$c/$m/port")
        # redis-sentinel rewrites its configuration file (replicas, other
        # sentinels, epochs): it lives in the member's directory.
        cat > "$c/$m/sentinel.conf" <<EOF
port $port
bind $HOST
daemonize no
logfile ""
dir $c/$m/data
sentinel monitor $SENTINEL_MASTER $HOST $master 2
sentinel down-after-milliseconds $SENTINEL_MASTER 1000
sentinel failover-timeout $SENTINEL_MASTER 5000
sentinel parallel-syncs $SENTINEL_MASTER 1
EOF
        cat > "$c/$m/run.sh" <<EOF
#!/bin/sh
# Starts sentinel $m in the foreground (test-services.sh start-member redis-sentinel $m).
echo \$\$ > '$c/$m/pid'
exec redis-sentinel '$c/$m/sentinel.conf'
EOF
    done
}

cluster_members_redis_sentinel() { echo "$REDIS_SENTINEL_MEMBERS"; }

cluster_pattern_redis_sentinel() { echo redis; }

cluster_launch_redis_sentinel() {
    local m c; c=$(cluster_dir redis-sentinel)
    for m in $REDIS_SENTINEL_MEMBERS; do member_launch "$c/$m"; done
}

redis_at() { redis-cli -h $HOST -p "$1" "${@:2}" 2>/dev/null; }

cluster_probe_member_redis_sentinel() {
    local d; d="$(cluster_dir redis-sentinel)/$1"
    [ "$(redis_at "$(cat "$d/port")" ping)" = PONG ] && return 0
    [ -s "$d/pid" ] && ! alive "$(readpid "$d/pid")" && return 2
    return 1
}

# Ready: every process answers, the replica is in sync, and every sentinel
# knows the replica and the two other sentinels (else a failover could not
# reach its quorum).
cluster_probe_redis_sentinel() {
    local c m rc info; c=$(cluster_dir redis-sentinel)
    for m in $REDIS_SENTINEL_MEMBERS; do
        rc=0; cluster_probe_member_redis_sentinel "$m" || rc=$?
        [ "$rc" = 0 ] || return "$rc"
    done
    redis_at "$(cat "$c/replica/port")" info replication | grep -q 'master_link_status:up' || return 1
    for m in s1 s2 s3; do
        info=" $(redis_at "$(cat "$c/$m/port")" sentinel master $SENTINEL_MASTER | tr '\r\n' '  ') "
        case "$info" in *" num-slaves 1 "*) ;; *) return 1 ;; esac
        case "$info" in *" num-other-sentinels 2 "*) ;; *) return 1 ;; esac
    done
}

cluster_stop_member_redis_sentinel() {
    local d; d="$(cluster_dir redis-sentinel)/$1"
    stop_pid "$(readpid "$d/pid")" redis "redis $1"
    wait_port_free "$(cat "$d/port")"
}

cluster_stop_redis_sentinel() {
    local m
    # the sentinels first: they would otherwise start a failover
    for m in s1 s2 s3 replica master; do cluster_stop_member_redis_sentinel "$m"; done
}

cluster_env_redis_sentinel() {
    local m c list=""; c=$(cluster_dir redis-sentinel)
    for m in s1 s2 s3; do list="$list${list:+,}$HOST:$(cat "$c/$m/port")"; done
    echo "export TAMARCO_TEST_REDIS_SENTINELS=$list TAMARCO_TEST_REDIS_SENTINEL_MASTER=$SENTINEL_MASTER"
}

cluster_logs_redis_sentinel() {
    local m c; c=$(cluster_dir redis-sentinel)
    for m in $REDIS_SENTINEL_MEMBERS; do echo "$c/$m/member.log"; done
}

# ---- any kind

cluster_fn() { echo "cluster_$1_${2//-/_}"; }

known_cluster() {
    declare -F "$(cluster_fn setup "$1")" >/dev/null 2>&1 || die "unknown cluster kind: $1"
}

started_clusters() { if [ -f "$DIR/clusters" ]; then cat "$DIR/clusters"; fi; }

stop_clusters() {
    local k
    for k in $(started_clusters); do
        if [ -d "$(cluster_dir "$k")" ]; then "$(cluster_fn stop "$k")"; fi
    done
    return 0
}

# ---------------------------------------------------------------- rabbitmq cluster
#
# DIR/rabbitmq-cluster: three nodes (n1 n2 n3) with their own ports and node
# names, one private epmd they share (nodes find each other through it), the
# same Erlang cookie in each node's HOME, joined to n1 with rabbitmqctl.
# DIR/rabbitmq-cluster/env.sh exports TAMARCO_TEST_AMQP_CLUSTER (h:p,h:p,h:p)
# and TAMARCO_TEST_AMQP_CLUSTER_DIR; node N's broker pid is in
# DIR/rabbitmq-cluster/nN/rabbitmq.pid and its AMQP port in .../nN/port.

RMQ_CLUSTER_NODES="n1 n2 n3"

rmq_ctl() {   # rmq_ctl NODE_DIR ARGS...: rabbitmqctl against that node
    local nd=$1
    shift
    (. "$nd/rabbitmq.env"; /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$RABBITMQ_NODENAME" "$@")
}

setup_rabbitmq_cluster() {
    local c="$DIR/rabbitmq-cluster" n port dist epmd cookie
    rmq_check_cmds
    rm -rf "$c"
    mkdir -p "$c"
    pick_port; epmd=$REPLY; echo "$epmd" > "$c/epmd_port"
    cookie=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for n in $RMQ_CLUSTER_NODES; do
        pick_port; port=$REPLY
        pick_port; dist=$REPLY
        rmq_node_files "$c/$n" "$port" "$dist" "$epmd"
        printf '%s' "$cookie" > "$c/$n/home/.erlang.cookie"
        chmod 400 "$c/$n/home/.erlang.cookie"
    done
    cat > "$c/epmd.sh" <<EOF
#!/bin/sh
echo \$\$ > '$c/epmd.pid'
export ERL_EPMD_ADDRESS=$HOST
exec epmd -address $HOST -port $epmd
EOF
    chmod 755 "$DIR" "$c"
    chmod 644 "$c/epmd.sh"
    for n in $RMQ_CLUSTER_NODES; do rmq_own "$c/$n"; done
}

launch_rabbitmq_cluster() {
    local c="$DIR/rabbitmq-cluster" n epmd
    epmd=$(cat "$c/epmd_port")
    setsid /bin/sh "$c/epmd.sh" < /dev/null >> "$c/epmd.log" 2>&1 &
    for _ in $(seq 100); do
        ERL_EPMD_PORT=$epmd epmd -names >/dev/null 2>&1 && break
        sleep 0.1
    done
    ERL_EPMD_PORT=$epmd epmd -names >/dev/null 2>&1 || { show_log "$c/epmd.log"; die "epmd did not start on $HOST:$epmd"; }
    for n in $RMQ_CLUSTER_NODES; do
        setsid /bin/sh "$c/$n/run.sh" < /dev/null >> "$c/$n/rabbitmq.log" 2>&1 &
    done
}

stop_rabbitmq_cluster() {
    local c="$DIR/rabbitmq-cluster" n
    [ -d "$c" ] || return 0
    for n in $RMQ_CLUSTER_NODES; do
        [ -d "$c/$n" ] || continue
        stop_pid "$(readpid "$c/$n/rabbitmq.pid")" beam "rabbitmq $n"
        stop_pid "$(readpid "$c/$n/launcher.pid")" rabbitmq "rabbitmq-launcher $n"
    done
    stop_pid "$(readpid "$c/epmd.pid")" epmd epmd
    for n in $RMQ_CLUSTER_NODES; do
        [ -f "$c/$n/port" ] && wait_port_free "$(cat "$c/$n/port")"
        [ -f "$c/$n/dist_port" ] && wait_port_free "$(cat "$c/$n/dist_port")"
    done
    return 0
}

# The kind "rabbitmq" (start-cluster rabbitmq): nodes n1 n2 n3 joined to n1.
# A node's broker pid is in nN/rabbitmq.pid; kill-member/start-member are
# not offered for it (a fault spec kills the broker by that pid).
cluster_setup_rabbitmq() { setup_rabbitmq_cluster; }
cluster_launch_rabbitmq() { launch_rabbitmq_cluster; }
cluster_members_rabbitmq() { echo "$RMQ_CLUSTER_NODES"; }
cluster_pattern_rabbitmq() { echo beam; }
cluster_stop_rabbitmq() { stop_rabbitmq_cluster; }
# three brokers start, then two of them restart to join the first
cluster_timeout_rabbitmq() { echo $((TIMEOUT * 3)); }

# 0 once every node answers and n2, n3 joined n1; 1 not yet; 2 a node died.
cluster_probe_rabbitmq() {
    local c n first pid
    c=$(cluster_dir rabbitmq)
    for n in $RMQ_CLUSTER_NODES; do
        pid=$(readpid "$c/$n/launcher.pid")
        if [ -n "$pid" ] && ! alive "$pid"; then return 2; fi
        port_listening "$(cat "$c/$n/port")" && rmq_check_amqp "$(cat "$c/$n/port")" || return 1
    done
    [ -f "$c/joined" ] && return 0
    first=$(. "$c/n1/rabbitmq.env"; echo "$RABBITMQ_NODENAME")
    for n in $RMQ_CLUSTER_NODES; do
        [ "$n" = n1 ] && continue
        # rabbitmqctl's chatter goes to the node's directory, not our stderr
        rmq_ctl "$c/$n" stop_app >>"$c/$n/rabbitmqctl.log" 2>&1
        rmq_ctl "$c/$n" join_cluster "$first" >>"$c/$n/rabbitmqctl.log" 2>&1 || {
            show_log "$c/$n/rabbitmqctl.log" "$c/$n/log/rabbit.log"; die "$n could not join $first"; }
        rmq_ctl "$c/$n" start_app >>"$c/$n/rabbitmqctl.log" 2>&1
    done
    : > "$c/joined"
    return 1
}

cluster_probe_member_rabbitmq() {
    local c; c=$(cluster_dir rabbitmq)
    port_listening "$(cat "$c/$1/port")" && rmq_check_amqp "$(cat "$c/$1/port")"
}

cluster_stop_member_rabbitmq() {
    local c; c=$(cluster_dir rabbitmq)
    stop_pid "$(readpid "$c/$1/rabbitmq.pid")" beam "rabbitmq $1"
    stop_pid "$(readpid "$c/$1/launcher.pid")" rabbitmq "rabbitmq-launcher $1"
}

cluster_env_rabbitmq() {
    local c n hosts=""; c=$(cluster_dir rabbitmq)
    for n in $RMQ_CLUSTER_NODES; do hosts="$hosts${hosts:+,}$HOST:$(cat "$c/$n/port")"; done
    echo "export TAMARCO_TEST_AMQP_CLUSTER=$hosts TAMARCO_TEST_AMQP_CLUSTER_DIR=$c"
}

cluster_logs_rabbitmq() {
    local c n; c=$(cluster_dir rabbitmq)
    for n in $RMQ_CLUSTER_NODES; do echo "$c/$n/rabbitmq.log"; echo "$c/$n/log/rabbit.log"; done
}

cmd_start_cluster() {
    local kind=$1 t0=$SECONDS rc deadline limit
    known_cluster "$kind"
    DIR=$(abs_dir "$2"); DIR=${DIR%/}
    check_dir_name "$DIR"
    if [ ! -f "$DIR/$MARKER" ]; then
        if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then die "$DIR exists and is not empty"; fi
        mkdir -p "$DIR"
        chmod 755 "$DIR"
        : > "$DIR/$MARKER"
        : > "$DIR/services"
    fi
    case " $(started_clusters | tr '\n' ' ') " in
        *" $kind "*) die "a $kind cluster was already started in $DIR (use '$0 stop $DIR' first)" ;;
    esac
    echo "$kind" >> "$DIR/clusters"
    START_OK=0
    trap 'if [ "$START_OK" = 0 ]; then log "start failed; stopping the $kind cluster"; "$(cluster_fn stop "$kind")"; log "logs kept in $(cluster_dir "$kind") (remove with: $0 stop $DIR)"; fi' EXIT
    trap 'exit 130' INT TERM HUP
    "$(cluster_fn setup "$kind")"
    "$(cluster_fn launch "$kind")"
    limit=$TIMEOUT
    if declare -F "$(cluster_fn timeout "$kind")" >/dev/null; then limit=$("$(cluster_fn timeout "$kind")"); fi
    deadline=$((SECONDS + limit))
    while :; do
        rc=0; "$(cluster_fn probe "$kind")" || rc=$?
        [ "$rc" = 0 ] && break
        if [ "$rc" = 2 ] || deadline_passed "$deadline"; then
            if [ "$rc" = 2 ]; then log "error: a $kind member exited during startup"
            else log "error: the $kind cluster was not ready within ${limit}s"; fi
            show_log $("$(cluster_fn logs "$kind")")
            exit 1
        fi
        sleep 0.25
    done
    START_OK=1
    trap - EXIT INT TERM HUP
    write_env
    log "$kind cluster started in $((SECONDS - t0))s: $("$(cluster_fn env "$kind")" | sed 's/^export //')"
    cat "$DIR/env.sh"
}

need_member() {
    local kind=$1 member=$2
    known_cluster "$kind"
    case " $(started_clusters | tr '\n' ' ') " in
        *" $kind "*) ;;
        *) die "no $kind cluster was started in $DIR" ;;
    esac
    case " $("$(cluster_fn members "$kind")") " in
        *" $member "*) ;;
        *) die "$kind has no member $member (members: $("$(cluster_fn members "$kind")"))" ;;
    esac
}

# start-member KIND MEMBER DIR: starts a stopped or killed member again
# (same ports, same data) and waits until it answers.
cmd_start_member() {
    local kind=$1 member=$2 d rc deadline
    need_dir "$3"
    need_member "$kind" "$member"
    d="$(cluster_dir "$kind")/$member"
    if is_ours "$(readpid "$d/pid")" "$("$(cluster_fn pattern "$kind")")"; then
        log "$kind $member is already running"
        return 0
    fi
    member_launch "$d"
    deadline=$((SECONDS + TIMEOUT))
    while :; do
        rc=0; "$(cluster_fn probe_member "$kind")" "$member" || rc=$?
        [ "$rc" = 0 ] && break
        if [ "$rc" = 2 ] || deadline_passed "$deadline"; then
            show_log "$d/member.log"
            die "$kind $member did not come back"
        fi
        sleep 0.1
    done
    log "$kind $member started"
}

# stop-member (SIGTERM, waits) / kill-member (SIGKILL) KIND MEMBER DIR
cmd_stop_member() {
    local kind=$1 member=$2 signal=$3 d pid
    need_dir "$4"
    need_member "$kind" "$member"
    d="$(cluster_dir "$kind")/$member"
    if [ "$signal" = KILL ]; then
        pid=$(readpid "$d/pid")
        if is_ours "$pid" "$("$(cluster_fn pattern "$kind")")"; then
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
        fi
        log "$kind $member killed"
    else
        "$(cluster_fn stop_member "$kind")" "$member"
        log "$kind $member stopped"
    fi
}

# ---------------------------------------------------------------- generic

port_of() { cat "$DIR/$1/port"; }

announce() { log "$1 at $HOST:$(port_of "$1")"; }

# wait_ready NAME...: waits until every server answers. Sets FAILED to the
# first one that did not and FAILED_HOW to "died" or "timeout".
wait_ready() {
    local s rc deadline
    deadline=$((SECONDS + TIMEOUT))
    FAILED="" FAILED_HOW=""
    for s in "$@"; do
        while :; do
            rc=0; "probe_$s" || rc=$?
            [ "$rc" = 0 ] && break
            if [ "$rc" = 2 ]; then FAILED=$s FAILED_HOW=died; return 1; fi
            if deadline_passed "$deadline"; then FAILED=$s FAILED_HOW=timeout; return 1; fi
            sleep 0.25
        done
    done
}

write_env() {
    local f="$DIR/env.sh" s
    {
        echo "export TAMARCO_SERVICES_DIR=$DIR"
        for s in $(cat "$DIR/services"); do
            case $s in
                redis) echo "export TAMARCO_TEST_REDIS_HOST=$HOST TAMARCO_TEST_REDIS_PORT=$(port_of redis)" ;;
                etcd) echo "export TAMARCO_TEST_ETCD_HOST=$HOST TAMARCO_TEST_ETCD_PORT=$(port_of etcd)" ;;
                rabbitmq) echo "export TAMARCO_TEST_AMQP_HOST=$HOST TAMARCO_TEST_AMQP_PORT=$(port_of rabbitmq)" ;;
            esac
        done
        for s in $(started_clusters); do "$(cluster_fn env "$s")"; done
    } > "$f.tmp"
    mv "$f.tmp" "$f"
    chmod 644 "$f"
}

stop_all() {
    local s
    stop_clusters
    # rabbitmq first: it is the slowest to stop.
    for s in rabbitmq etcd redis; do
        [ -d "$DIR/$s" ] && "stop_$s"
    done
    return 0
}

selected_services() {
    local want=${TAMARCO_SERVICES:-$ALL_SERVICES} s out=""
    for s in $want; do
        case " $ALL_SERVICES " in
            *" $s "*) case " $out " in *" $s "*) ;; *) out="$out $s" ;; esac ;;
            *) die "unknown service in TAMARCO_SERVICES: $s (known: $ALL_SERVICES)" ;;
        esac
    done
    [ -n "$out" ] || die "TAMARCO_SERVICES selects no service"
    echo "${out# }"
}

cmd_start() {
    local services s attempt t0
    services=$(selected_services)
    t0=$SECONDS
    if [ -n "${1:-}" ]; then
        DIR=$(abs_dir "$1"); DIR=${DIR%/}
        check_dir_name "$DIR"
        if [ -f "$DIR/$MARKER" ]; then
            for s in $ALL_SERVICES; do
                [ -d "$DIR/$s" ] && "running_$s" && die "$s is already running in $DIR (use '$0 stop $DIR' first)"
            done
            stop_all
            find "$DIR" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
        elif [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
            die "$DIR exists and is not empty"
        fi
        mkdir -p "$DIR"
    else
        DIR=$(mktemp -d /tmp/tamarco-services.XXXXXX)
        check_dir_name "$DIR"
    fi
    chmod 755 "$DIR"
    : > "$DIR/$MARKER"
    echo "$services" > "$DIR/services"

    # Whatever goes wrong from here on (a die, a signal), stop what was started.
    START_OK=0
    trap 'if [ "$START_OK" = 0 ]; then log "start failed; stopping the servers started in $DIR"; stop_all; log "logs kept in $DIR (remove with: $0 stop $DIR)"; fi' EXIT
    trap 'exit 130' INT TERM HUP

    for s in $services; do "setup_$s"; done
    for s in $services; do "launch_$s"; done
    attempt=1
    # shellcheck disable=SC2086  # $services is a word list
    while ! wait_ready $services; do
        # A server that died at once most likely lost its port to someone
        # else between pick and bind: try again on new ports, twice at most.
        if [ "$FAILED_HOW" = died ] && [ "$attempt" -lt 3 ] && \
           grep -qi 'in use\|eaddrinuse' $("logs_$FAILED") /dev/null 2>/dev/null; then
            log "$FAILED could not bind its port; retrying on other ports"
            "stop_$FAILED"
            "setup_$FAILED"
            "launch_$FAILED"
            attempt=$((attempt + 1))
            continue
        fi
        if [ "$FAILED_HOW" = died ]; then
            log "error: $FAILED exited during startup"
        else
            log "error: $FAILED did not answer within ${TIMEOUT}s"
        fi
        show_log $("logs_$FAILED")
        exit 1
    done
    START_OK=1
    trap - EXIT INT TERM HUP

    write_env
    for s in $services; do announce "$s"; done
    log "started in $((SECONDS - t0))s; env in $DIR/env.sh; stop with: $0 stop $DIR"
    cat "$DIR/env.sh"
}

cmd_stop() {
    need_dir "${1:-}"
    stop_all
    rm -rf "$DIR"
    log "stopped; removed $DIR"
}

cmd_start_one() {
    local s=$1
    need_dir "${2:-}"
    [ -d "$DIR/$s" ] || die "$s was not started in $DIR"
    if "running_$s"; then
        log "$s is already running"
        announce "$s"
        return 0
    fi
    "stop_$s"   # leftovers (epmd, launcher) and wait for the port
    "launch_$s"
    if ! wait_ready "$s"; then
        log "error: $s did not come back ($FAILED_HOW)"
        show_log $("logs_$s")
        "stop_$s"
        exit 1
    fi
    announce "$s"
}

cmd_stop_one() {
    local s=$1
    need_dir "${2:-}"
    [ -d "$DIR/$s" ] || die "$s was not started in $DIR"
    "stop_$s"
    log "$s stopped"
}

cmd_status() {
    local s m rc=0
    need_dir "${1:-}"
    for s in $(cat "$DIR/services"); do
        if "running_$s" && "probe_$s"; then
            log "$s at $HOST:$(port_of "$s"): up"
        else
            log "$s at $HOST:$(port_of "$s"): DOWN"
            rc=1
        fi
    done
    for s in $(started_clusters); do
        for m in $("$(cluster_fn members "$s")"); do
            if "$(cluster_fn probe_member "$s")" "$m"; then
                log "$s cluster member $m at $HOST:$(cat "$(cluster_dir "$s")/$m/port"): up"
            else
                log "$s cluster member $m at $HOST:$(cat "$(cluster_dir "$s")/$m/port"): DOWN"
                rc=1
            fi
        done
    done
    [ -f "$DIR/env.sh" ] && cat "$DIR/env.sh"
    return $rc
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
        start) [ $# -le 1 ] || usage; cmd_start "$@" ;;
        stop) [ $# -eq 1 ] || usage; cmd_stop "$1" ;;
        status) [ $# -eq 1 ] || usage; cmd_status "$1" ;;
        start-cluster) [ $# -eq 2 ] || usage; cmd_start_cluster "$1" "$2" ;;
        start-member) [ $# -eq 3 ] || usage; cmd_start_member "$1" "$2" "$3" ;;
        stop-member) [ $# -eq 3 ] || usage; cmd_stop_member "$1" "$2" TERM "$3" ;;
        kill-member) [ $# -eq 3 ] || usage; cmd_stop_member "$1" "$2" KILL "$3" ;;
        start-redis|start-etcd|start-rabbitmq)
            [ $# -eq 1 ] || usage; cmd_start_one "${cmd#start-}" "$1" ;;
        stop-redis|stop-etcd|stop-rabbitmq)
            [ $# -eq 1 ] || usage; cmd_stop_one "${cmd#stop-}" "$1" ;;
        restart-redis|restart-etcd|restart-rabbitmq)
            [ $# -eq 1 ] || usage
            cmd_stop_one "${cmd#restart-}" "$1"
            cmd_start_one "${cmd#restart-}" "$1" ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"
