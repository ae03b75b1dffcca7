#!/usr/bin/env bash
# SMTP listener benchmark: messages/s accepted with a durable acknowledgement (250 only once
# the message is on the embedded log, fsynced), side by side in one run with Postfix's
# smtp-sink (protocol only, nothing stored: the upper bound here) and Python's aiosmtpd
# (a handler that only answers 250). The client for all three is Postfix's smtp-source.
#
#   bash ops/mail/bench.sh [SESSIONS] [MESSAGES] [SIZE]     defaults: 20 20000 2048
#   KETENBUS_BIN=target/release/ketenbus bash ops/mail/bench.sh   (skip the build)
#
# Builds `ketenbus` in release mode, installs the peers (ops/mail/setup.sh --bench), starts
# everything on loopback ports and stops it again.
set -euo pipefail
cd "$(dirname "$0")/../.."
sessions=${1:-20}
messages=${2:-20000}
size=${3:-2048}

bash ops/mail/setup.sh --bench >&2
# KETENBUS_BIN=path uses an existing build instead.
if [ -z "${KETENBUS_BIN:-}" ]; then
  cargo build --release -p ketenbus >&2
fi
bin=${KETENBUS_BIN:-${CARGO_TARGET_DIR:-target}/release/ketenbus}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

sink_port=$(free_port)
smtp-sink -u nobody "127.0.0.1:$sink_port" 256 >/dev/null 2>&1 &
pids+=($!)

aio_port=$(free_port)
cat > "$work/aio.py" <<'EOF'
import asyncio, sys
from aiosmtpd.controller import Controller
class Ok:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"
c = Controller(Ok(), hostname="127.0.0.1", port=int(sys.argv[1]))
c.start()
try:
    asyncio.get_event_loop().run_forever()
finally:
    c.stop()
EOF
python3 "$work/aio.py" "$aio_port" &
pids+=($!)

kb_port=$(free_port)
http_port=$(free_port)
cat > "$work/ketenbus.toml" <<EOF
data_dir = "$work/data"
[http]
listen = "127.0.0.1:$http_port"
[mail.smtp]
listen = "127.0.0.1:$kb_port"
max_connections = 1024
EOF
# A throwaway audit key for this run (the audit trail needs one; see README, Audit trail).
KETENBUS_AUDIT_KEY=${KETENBUS_AUDIT_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')} \
  KETENBUS_LOG=warn "$bin" run --config "$work/ketenbus.toml" 2>"$work/ketenbus.log" &
pids+=($!)

wait_port "$sink_port"; wait_port "$aio_port"; wait_port "$kb_port"

# Prints one line per server and leaves its messages/s in $rate.
run() {
  local name=$1 port=$2
  local start end
  start=$(date +%s.%N)
  smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@sender.test -t gp@lms.example.test "127.0.0.1:$port" >/dev/null 2>&1
  end=$(date +%s.%N)
  rate=$(python3 -c "print(round($messages/($end-$start)))")
  python3 -c "d=$end-$start; print(f'{\"$name\":<34} {$messages} msgs x {$size} B, {$sessions} sessions: {d:6.2f} s  {$messages/d:8.0f} msgs/s')"
}

# The machine's other load moves every figure; the ratio to smtp-sink in the same run moves less.
echo "smtp-source -s $sessions -m $messages -l $size (loopback, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
run "postfix smtp-sink (nothing stored)" "$sink_port"; sink_rate=$rate
run "ketenbus (durable ack, embedded)" "$kb_port"; kb_rate=$rate
# Whether the router kept up: letter events made by the time the load ended.
routed=$(curl -s "http://127.0.0.1:$http_port/metrics" | awk '/^ketenbus_router_normalised_events_total/ {s+=$2} END {print s+0}')
run "python aiosmtpd (answer only)" "$aio_port"
echo "ketenbus / smtp-sink in this run: $(python3 -c "print(f'{100*$kb_rate/$sink_rate:.1f}%')")"
stored=$(curl -s "http://127.0.0.1:$http_port/metrics" | awk '/^ketenbus_ingest_received_messages_total/ && /smtp/ {s+=$2} END {print s+0}')
echo "ketenbus messages on the log (metric ketenbus_ingest_received_messages_total{connector=smtp}): ${stored:-unknown}"
echo "ketenbus events normalised when its load ended (ketenbus_router_normalised_events_total): ${routed:-unknown}"
