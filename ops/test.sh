#!/usr/bin/env bash
# Runs every ketenbus test on a fresh machine: installs and starts the real peers the tests
# talk to (tansu as the Kafka-protocol broker, Python's confluent-kafka + fastavro as an
# independent reader, Prometheus/promtool, Postfix/swaks/Dovecot, the npm `fhir` validator,
# curl and python3 for README's quick start, Debian's chromium with Python's playwright for
# the console),
# checks formatting and lints, builds, and runs the whole workspace's tests. Slow installs are
# cached under ~/.cache/ketenbus.
#
#   bash ops/test.sh            everything (what CI runs)
#   bash ops/test.sh -- FILTER  only tests whose name contains FILTER (peers still started)
set -euo pipefail
cd "$(dirname "$0")/.."
filter=()
if [[ ${1:-} == "--" ]]; then shift; filter=("$@"); fi

step() { echo "==> $*" >&2; }
started=$SECONDS

step "real peers"
bash ops/kafka/tansu.sh install
kafka_port=${KETENBUS_TEST_KAFKA_PORT:-19092}
bash ops/kafka/tansu.sh stop "$kafka_port" >/dev/null 2>&1 || true
export KETENBUS_TEST_KAFKA
KETENBUS_TEST_KAFKA=$(bash ops/kafka/tansu.sh start "$kafka_port")
# The two-node test gets a tansu of its own: tansu 0.6 keeps the settings of a group's first
# member for every later one, and kafka.rs forms the same router group.
nodes_port=$((kafka_port + 1))
bash ops/kafka/tansu.sh stop "$nodes_port" >/dev/null 2>&1 || true
export KETENBUS_TEST_KAFKA_NODES
KETENBUS_TEST_KAFKA_NODES=$(bash ops/kafka/tansu.sh start "$nodes_port")
trap 'bash ops/kafka/tansu.sh stop "$kafka_port" >/dev/null 2>&1 || true; bash ops/kafka/tansu.sh stop "$nodes_port" >/dev/null 2>&1 || true' EXIT
export KETENBUS_TEST_PYTHON
KETENBUS_TEST_PYTHON=$(bash tests/python/setup.sh)
# Debian packages (one apt at a time, before tests run in parallel) and the npm validator.
sh ops/prometheus/setup.sh
sh ops/browser/setup.sh
bash ops/mail/setup.sh
bash ops/quickstart/setup.sh
bash tests/node/setup.sh

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --locked -p ketenbus --bin ketenbus

step "tests"
cargo test --workspace --locked -- "${filter[@]}"
step "all tests passed in $((SECONDS - started)) s"
