#!/usr/bin/env bash
# Install, start and stop tansu, a Kafka-protocol broker, for the Kafka-engine tests.
#
#   ops/kafka/tansu.sh install      build tansu 0.6.0 into ~/.cache (once; about 11 minutes)
#   ops/kafka/tansu.sh start PORT   run it on 127.0.0.1:PORT with memory storage (installs
#                                   first when missing); prints the bootstrap address
#   ops/kafka/tansu.sh stop [PORT]  stop the broker on PORT, or every broker this script started
#   ops/kafka/tansu.sh status       list the brokers this script started
#
# Environment:
#   KETENBUS_CACHE      cache directory (default ~/.cache/ketenbus)
#   KETENBUS_TANSU_DIR  where pid and log files go (default /tmp/ketenbus-tansu)
#
# tansu does not auto-create topics: clients create them through the admin API.
# tansu 0.6 quirks a client must work around (start prints the ketenbus settings for them):
# - a fetch from offset N returns only record batches that start at N or later, and
#   ListOffsets(latest) answers the last batch's base offset + 1: produce one record per
#   batch (librdkafka batch.num.messages=1) or consumers skip records after a restart;
# - a fetch waits the full fetch.wait.max.ms even when records arrive: keep it small;
# - a consumer group keeps the session timeout of the member that first joined it, for every
#   later member (coordinator/group/administrator.rs, join): a group name reused on one broker
#   by clients with another session_timeout notices a dead member only after the first one's;
# - it raises a partition's high watermark before it writes the batch it reserved the offset
#   for: a fetch in between, with a later batch from another producer already written, skips
#   the late one (ketenbus's Kafka consumer reads such a hole again: bus/kafka/holes.rs).
set -euo pipefail

VERSION=0.6.0
CACHE=${KETENBUS_CACHE:-$HOME/.cache/ketenbus}
ROOT=$CACHE/tansu-$VERSION
BIN=$ROOT/bin/tansu
RUN_DIR=${KETENBUS_TANSU_DIR:-/tmp/ketenbus-tansu}

say() { echo "tansu.sh: $*" >&2; }
die() { say "$*"; exit 1; }

install() {
    if [[ -x $BIN ]]; then
        say "tansu $VERSION already installed at $BIN"
        return 0
    fi
    mkdir -p "$CACHE"
    # One install at a time: a second caller waits for the first and then finds the binary.
    exec 9>"$CACHE/tansu-install.lock"
    if ! flock -n 9; then
        say "another tansu install is running (log: $CACHE/tansu-install.log); waiting for it"
        flock 9
    fi
    if [[ -x $BIN ]]; then
        say "tansu $VERSION installed by the other run at $BIN"
        return 0
    fi
    say "building tansu $VERSION into $ROOT (about 11 minutes on 2 cores; log: $CACHE/tansu-install.log)"
    local started=$SECONDS
    if ! cargo install "tansu@$VERSION" --locked --features dynostore --root "$ROOT" \
        >"$CACHE/tansu-install.log" 2>&1; then
        tail -n 30 "$CACHE/tansu-install.log" >&2
        die "cargo install tansu@$VERSION failed (log: $CACHE/tansu-install.log)"
    fi
    say "installed tansu $VERSION in $((SECONDS - started)) s"
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pid_alive() {
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null
}

start() {
    local port=${1:-}
    [[ $port =~ ^[0-9]+$ ]] || die "usage: $0 start PORT"
    local pidfile=$RUN_DIR/tansu-$port.pid log=$RUN_DIR/tansu-$port.log
    mkdir -p "$RUN_DIR"
    if [[ -f $pidfile ]] && pid_alive "$(cat "$pidfile")" && port_open "$port"; then
        say "already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
        echo "127.0.0.1:$port"
        return 0
    fi
    port_open "$port" && die "port $port is taken by another process"
    [[ -x $BIN ]] || install

    setsid "$BIN" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ \
        >"$log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$pidfile"

    local deadline=$((SECONDS + 30))
    until port_open "$port"; do
        if ! pid_alive "$pid"; then
            tail -n 20 "$log" >&2
            rm -f "$pidfile"
            die "tansu exited before listening on port $port (log: $log)"
        fi
        if ((SECONDS >= deadline)); then
            kill "$pid" 2>/dev/null || true
            rm -f "$pidfile"
            die "tansu did not listen on port $port within 30 s (log: $log)"
        fi
        sleep 0.1
    done
    say "started on 127.0.0.1:$port (pid $pid, log $log)"
    say "ketenbus [bus.kafka] for it: bootstrap_servers = \"127.0.0.1:$port\", replication_factor = 1,"
    say "  properties = { \"batch.num.messages\" = \"1\", \"fetch.wait.max.ms\" = \"10\" }"
    say "  (tansu 0.6 cannot fetch from inside a record batch, and answers a fetch only when"
    say "  fetch.wait.max.ms has passed, even when records arrived: it bounds consumer latency)"
    echo "127.0.0.1:$port"
}

stop_one() {
    local pidfile=$1 pid
    pid=$(cat "$pidfile")
    if pid_alive "$pid"; then
        kill "$pid"
        for _ in $(seq 50); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        pid_alive "$pid" && kill -9 "$pid"
        say "stopped pid $pid ($(basename "$pidfile" .pid))"
    fi
    rm -f "$pidfile"
}

stop() {
    local port=${1:-}
    if [[ -n $port ]]; then
        [[ -f $RUN_DIR/tansu-$port.pid ]] || { say "nothing started on port $port"; return 0; }
        stop_one "$RUN_DIR/tansu-$port.pid"
        return 0
    fi
    shopt -s nullglob
    for f in "$RUN_DIR"/tansu-*.pid; do
        stop_one "$f"
    done
}

status() {
    shopt -s nullglob
    for f in "$RUN_DIR"/tansu-*.pid; do
        local port=${f##*/tansu-}
        port=${port%.pid}
        if pid_alive "$(cat "$f")"; then
            echo "127.0.0.1:$port pid $(cat "$f") running"
        else
            echo "127.0.0.1:$port pid $(cat "$f") dead"
        fi
    done
}

case ${1:-} in
install) install ;;
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
status) status ;;
*) die "usage: $0 install | start PORT | stop [PORT] | status" ;;
esac
