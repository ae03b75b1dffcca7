#!/usr/bin/env bash
# Side by side in one run: RabbitMQ's quorum queue with publisher confirms against ketenbus.
#
#   bash ops/bench/peers.sh
#
# 1. installs RabbitMQ from the Debian packages (rabbitmq-server, 3.10 on bookworm) without
#    letting the package's own service start, and builds rabbitmq-bench (bench/rabbitmq, lapin),
#    ketenbus-bench and ketenbus with --release under nice;
# 2. for each of three runs starts a fresh rabbitmq-server on loopback with a temporary data
#    directory, HOME, cookie and epmd port (no plugins), runs rabbitmq-bench against a durable
#    quorum queue with persistent messages and publisher confirms, and stops it: publish only
#    (durable accept rate), publish and consume (accepted to consumed, per message latency),
#    and the latency run at RATE msg/s offered;
# 3. runs ketenbus-bench (embedded engine: HTTP ingest -> log -> webhook) with the same count,
#    size and senders: publish only (--publish-only: no subscription, the durable accept
#    rate; every 202 follows the fsync of its message), once with one webhook POST per
#    event and once through the batch webhook (BATCH events per POST at most; figures per
#    event), the latency run at RATE msg/s, and LARGE (4x25MiB: four 25 MiB mails at once to a
#    raw webhook; ketenbus only) for the memory of large messages and what is given back;
#    Before each run of either broker it calls sync(1) and waits 2 s, so that what one run
#    wrote is on disk before the next starts, not written back during its measurements;
# 4. prints a table of both with the ratios ketenbus/RabbitMQ, and the peak RSS (VmHWM) of each
#    broker process over its life: RabbitMQ's beam.smp (read at the end of each run) and the
#    ketenbus process each ketenbus-bench run starts (sampled every 0.2 s).
#
# Environment: COUNT (30000), SIZE (2048 bytes), SENDERS (64 publishers: AMQP channels on one
# connection / concurrent HTTP senders), PREFETCH (256, RabbitMQ's consumer), RATE (1000),
# LAT_COUNT (10000 messages in the latency runs), BATCH (100 events per POST at most in the
# batch webhook run), LARGE (4x25MiB), AMQP_PORT (5679), EPMD_PORT (4375),
# CARGO_TARGET_DIR. Needs root for the install (or rabbitmq-server already installed).
# Everything it starts is stopped, and its temporary directory removed, on exit and on Ctrl-C.
# A benchmark, not a test: ops/test.sh does not run it.
set -euo pipefail

COUNT=${COUNT:-30000}
SIZE=${SIZE:-2048}
SENDERS=${SENDERS:-64}
PREFETCH=${PREFETCH:-256}
RATE=${RATE:-1000}
LAT_COUNT=${LAT_COUNT:-10000}
BATCH=${BATCH:-100}
LARGE=${LARGE:-4x25MiB}
AMQP_PORT=${AMQP_PORT:-5679}
EPMD_PORT=${EPMD_PORT:-4375}

root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
rmq_bin=/usr/lib/rabbitmq/bin/rabbitmq-server
work=$(mktemp -d "${TMPDIR:-/tmp}/ketenbus-peers.XXXXXX")
rmq_pid=""      # the rabbitmq-server script (beam.smp runs under it)
beam_pid=""     # RabbitMQ's Erlang VM
bench_pid=""    # the running rabbitmq-bench or ketenbus-bench
sampler_pid=""
policy_added=""

log() { printf 'peers.sh: %s\n' "$*" >&2; }

stop_pid() { # pid: TERM, wait up to 20 s, then KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? child
    trap - EXIT INT TERM
    [[ -n $sampler_pid ]] && kill "$sampler_pid" 2>/dev/null || true
    if [[ -n $bench_pid ]]; then
        # ketenbus-bench's broker: a TERM to the bench skips its Drop, so stop the child first.
        for child in $(pgrep -P "$bench_pid" -x ketenbus || true); do stop_pid "$child"; done
        stop_pid "$bench_pid"
    fi
    stop_pid "$rmq_pid"
    stop_pid "$beam_pid"
    if [[ -n $rmq_pid ]]; then
        ERL_EPMD_PORT=$EPMD_PORT epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    fi
    [[ -n $policy_added ]] && rm -f /usr/sbin/policy-rc.d
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

# --- 1. install and build -------------------------------------------------------------------
if [[ ! -x $rmq_bin ]]; then
    [[ $(id -u) == 0 ]] || { log "rabbitmq-server is not installed; run as root to install it"; exit 1; }
    log "installing rabbitmq-server from the Debian packages (its service kept from starting)"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends rabbitmq-server >"$work/apt.log" 2>&1 ||
        { apt-get update >>"$work/apt.log" 2>&1 &&
            apt-get install -y --no-install-recommends rabbitmq-server >>"$work/apt.log" 2>&1; } ||
        { tail -20 "$work/apt.log" >&2; exit 1; }
    # Should the service have started anyway (no policy-rc.d honoured), stop and disable it.
    if command -v systemctl >/dev/null && systemctl is-enabled rabbitmq-server >/dev/null 2>&1; then
        systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
    fi
    service rabbitmq-server stop >/dev/null 2>&1 || true
    [[ -n $policy_added ]] && rm -f /usr/sbin/policy-rc.d && policy_added=""
fi
rmq_version=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo unknown)

log "building rabbitmq-bench, ketenbus-bench and ketenbus (release, nice)"
(cd "$root" && nice cargo build --release --quiet \
    -p ketenbus -p ketenbus-tests -p ketenbus-bench-rabbitmq)

# --- 2. RabbitMQ ------------------------------------------------------------------------------
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
amqp="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"

start_rabbit() { # a fresh node with an empty data directory $work/rabbitmq-NAME
    local rmq=$work/rabbitmq-$1 i
    if (exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT") 2>/dev/null; then
        log "port $AMQP_PORT is taken: set AMQP_PORT"
        exit 1
    fi
    mkdir -p "$rmq/home" "$rmq/mnesia" "$rmq/log"
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$rmq/home/.erlang.cookie"
    chmod 400 "$rmq/home/.erlang.cookie"
    echo '[].' >"$rmq/enabled_plugins"
    echo '# ops/bench/peers.sh: RabbitMQ defaults' >"$rmq/rabbitmq.conf"
    log "starting RabbitMQ $rmq_version on 127.0.0.1:$AMQP_PORT (data in $rmq)"
    env HOME="$rmq/home" \
        RABBITMQ_NODENAME="ketenbus-peers@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_PORT" \
        RABBITMQ_DIST_PORT="$((AMQP_PORT + 20000))" \
        ERL_EPMD_PORT="$EPMD_PORT" \
        RABBITMQ_MNESIA_BASE="$rmq/mnesia" \
        RABBITMQ_LOG_BASE="$rmq/log" \
        RABBITMQ_PID_FILE="$rmq/pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$rmq/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$rmq/rabbitmq.conf" \
        "$rmq_bin" >"$rmq/stdout.log" 2>&1 &
    rmq_pid=$!
    for ((i = 0; ; i++)); do
        if ! kill -0 "$rmq_pid" 2>/dev/null; then
            log "rabbitmq-server exited:"; tail -30 "$rmq/stdout.log" >&2; exit 1
        fi
        [[ -z $beam_pid && -s $rmq/pid ]] && beam_pid=$(cat "$rmq/pid")
        (exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT") 2>/dev/null && break
        ((i < 600)) || { log "RabbitMQ did not listen within 120 s"; tail -30 "$rmq/stdout.log" >&2; exit 1; }
        sleep 0.2
    done
    # rabbitmq-server (the script) runs beam.smp in a child shell; RabbitMQ writes beam's pid.
    for ((i = 0; i < 50; i++)); do [[ -s $rmq/pid ]] && break; sleep 0.2; done
    beam_pid=$(cat "$rmq/pid")
    [[ $(cat "/proc/$beam_pid/comm") == beam.smp ]] || { log "no beam.smp at pid $beam_pid"; exit 1; }
}

stop_rabbit() {
    stop_pid "$rmq_pid"
    stop_pid "$beam_pid"
    ERL_EPMD_PORT=$EPMD_PORT epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    rmq_pid="" beam_pid=""
}

settle() { # before each run of either broker: the last run's writes on disk, not in this one's
    sync
    sleep 2
}

rabbit() { # name, args...: rabbitmq-bench against a fresh node; its result line in
    # $work/NAME.out, the node's peak RSS (since it started) in NAME.rss
    local name=$1; shift
    settle
    start_rabbit "$name"
    "$target/release/rabbitmq-bench" --amqp "$amqp" --size "$SIZE" --senders "$SENDERS" \
        --prefetch "$PREFETCH" "$@" >"$work/$name.out" 2>"$work/$name.err" &
    bench_pid=$!
    wait "$bench_pid" || { log "rabbitmq-bench $name failed:"; cat "$work/$name.err" >&2; exit 1; }
    bench_pid=""
    hwm_kb "$beam_pid" >"$work/$name.rss"
    stop_rabbit
    cat "$work/$name.out" >&2
}
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
rabbit r_pub --mode publish --count "$COUNT"
rabbit r_e2e --mode e2e --count "$COUNT"
rabbit r_lat --mode e2e --count "$LAT_COUNT" --rate "$RATE"

# --- 3. ketenbus ------------------------------------------------------------------------------
sample() { # parent pid, file: the largest VmHWM of its ketenbus children, every 0.2 s
    local max=0 pid v
    while kill -0 "$1" 2>/dev/null; do
        for pid in $(pgrep -P "$1" -x ketenbus || true); do
            v=$(hwm_kb "$pid" 2>/dev/null || true)
            [[ -n $v ]] && ((v > max)) && max=$v && echo "$max" >"$2"
        done
        sleep 0.2
    done
}
keten() { # name, args...
    local name=$1; shift
    settle
    echo 0 >"$work/$name.rss"
    TMPDIR=$work KETENBUS_BIN="$target/release/ketenbus" "$target/release/ketenbus-bench" \
        --engine embedded --size "$SIZE" --senders "$SENDERS" "$@" \
        >"$work/$name.out" 2>"$work/$name.err" &
    bench_pid=$!
    sample "$bench_pid" "$work/$name.rss" &
    sampler_pid=$!
    wait "$bench_pid" || { log "ketenbus-bench $name failed:"; tail -30 "$work/$name.err" >&2; exit 1; }
    bench_pid=""
    wait "$sampler_pid" || true
    sampler_pid=""
    cat "$work/$name.out" >&2
}
keten k_pub --count "$COUNT" --publish-only
keten k_e2e --count "$COUNT"
keten k_batch --count "$COUNT" --batch "$BATCH"
keten k_lat --count "$LAT_COUNT" --rate "$RATE"
keten k_large --large "$LARGE"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 4. the table -----------------------------------------------------------------------------
get() { # file key: the value of key=value in the result line, units stripped
    grep -o "\b$2=[0-9.]*" "$work/$1.out" | head -1 | cut -d= -f2
}
k_rate() { # ketenbus-bench prints "delivered=N in Ts => R msg/s"
    sed -n 's/.*=> \([0-9]*\) msg\/s.*/\1/p' "$work/$1.out"
}
mb() { awk -v k="$1" 'BEGIN { printf "%.0f MB", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
k_acc=$(awk -v n="$COUNT" -v t="$(get k_e2e accepted_in)" 'BEGIN { printf "%.0f", n / t }')
k_e2e_rate=$(k_rate k_e2e)
k_batch_rate=$(k_rate k_batch)
row() { printf '| %s | %s | %s | %s |\n' "$@"; }

echo
echo "ketenbus vs RabbitMQ $rmq_version quorum queue: $COUNT messages of $SIZE bytes, $SENDERS senders;"
echo "one machine, brokers and load generators sharing its $(nproc) cores."
echo "load average before $load_before, after $load_after. Ratio: ketenbus / RabbitMQ."
echo
row "" "RabbitMQ quorum queue, publisher confirms (rabbitmq-bench)" "ketenbus (ketenbus-bench)" "ratio"
row "---" "---" "---" "---"
row "durable accept, publish only" "$(get r_pub accept_rate) msg/s" "$(get k_pub accept_rate) msg/s" \
    "$(ratio "$(get k_pub accept_rate)" "$(get r_pub accept_rate)")"
row "durable accept, publish only, p50 / p99 (confirm / 202)" \
    "$(get r_pub confirm_p50) / $(get r_pub confirm_p99) ms" \
    "$(get k_pub accept_p50) / $(get k_pub accept_p99) ms" ""
row "durable accept, while delivering" "$(get r_e2e accept_rate) msg/s" "$k_acc msg/s (ingest)" \
    "$(ratio "$k_acc" "$(get r_e2e accept_rate)")"
row "end to end (accepted to consumed/delivered)" "$(get r_e2e e2e_rate) msg/s" "$k_e2e_rate msg/s" \
    "$(ratio "$k_e2e_rate" "$(get r_e2e e2e_rate)")"
row "end to end, p50 / p99 per message" "$(get r_e2e e2e_p50) / $(get r_e2e e2e_p99) ms" \
    "$(get k_e2e p50) / $(get k_e2e p99) ms" ""
row "end to end, per event in batches of up to $BATCH (batch webhook)" "$(get r_e2e e2e_rate) msg/s" \
    "$k_batch_rate msg/s" "$(ratio "$k_batch_rate" "$(get r_e2e e2e_rate)")"
row "end to end in batches, p50 / p99 per event" "$(get r_e2e e2e_p50) / $(get r_e2e e2e_p99) ms" \
    "$(get k_batch p50) / $(get k_batch p99) ms" ""
row "at $RATE msg/s offered: accept p50 / p99 (confirm / 202)" \
    "$(get r_lat confirm_p50) / $(get r_lat confirm_p99) ms" \
    "$(get k_lat accept_p50) / $(get k_lat accept_p99) ms" \
    "$(ratio "$(get k_lat accept_p99)" "$(get r_lat confirm_p99)") (p99)"
row "at $RATE msg/s offered: end to end p50 / p99" \
    "$(get r_lat e2e_p50) / $(get r_lat e2e_p99) ms" \
    "$(get k_lat p50) / $(get k_lat p99) ms" \
    "$(ratio "$(get k_lat p99)" "$(get r_lat e2e_p99)") (p99)"
row "peak RSS, $COUNT publish only" "$(mb "$(cat "$work/r_pub.rss")") (beam.smp)" \
    "$(mb "$(cat "$work/k_pub.rss")") (ketenbus)" \
    "$(ratio "$(cat "$work/k_pub.rss")" "$(cat "$work/r_pub.rss")")"
row "peak RSS, $COUNT end to end" "$(mb "$(cat "$work/r_e2e.rss")") (beam.smp)" \
    "$(mb "$(cat "$work/k_e2e.rss")") (ketenbus)" \
    "$(ratio "$(cat "$work/k_e2e.rss")" "$(cat "$work/r_e2e.rss")")"
row "peak RSS, $COUNT end to end in batches" "$(mb "$(cat "$work/r_e2e.rss")") (beam.smp)" \
    "$(mb "$(cat "$work/k_batch.rss")") (ketenbus)" \
    "$(ratio "$(cat "$work/k_batch.rss")" "$(cat "$work/r_e2e.rss")")"
row "peak RSS, $LARGE at once to a raw webhook (RSS 10 s after)" "-" \
    "$(mb "$(cat "$work/k_large.rss")") ($(get k_large rss_10s_after) MB after)" ""
row "peak RSS, latency run" "$(mb "$(cat "$work/r_lat.rss")")" "$(mb "$(cat "$work/k_lat.rss")")" \
    "$(ratio "$(cat "$work/k_lat.rss")" "$(cat "$work/r_lat.rss")")"
